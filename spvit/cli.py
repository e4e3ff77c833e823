"""The ``spvit`` command (also ``python -m spvit``): demo, compress, search, finetune, eval, deploy, bench, profile.

Configuration (:mod:`spvit.config`): built-in defaults, then ``--config file.yaml`` (flat keys named like the flags,
with underscores), then the flags given on the command line; the resolved config is saved in the run folder.
``--resume`` continues a run from its folder alone (its saved config); a changed setting is refused unless
``--allow-changes``. Bad input prints one ``spvit: error: ...`` line (once, on rank 0 under torchrun) and exits with
code 2; a failed write (a full disk) exits with 1; SIGINT / SIGTERM / SIGHUP stop cleanly (130 / 143 / 129) saying
how to continue; under torchrun, a rank whose peer died says so in one line (exit 1).
An unexpected failure while training (not the input's fault) is one line and exit code 1.
``SPVIT_TRACEBACK=1`` shows the Python traceback instead of the one line.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import math
import os
import signal
import sys
from typing import Dict, List, Optional

import torch
import torch.distributed as tdist

from . import _startup, compress, demo, finetune, hub, interrupts, optim, runs, search
from . import config as C
from . import distributed as D
from . import engine as E
from . import latency as L
from .checkpoints import load_finetuned
from .cli_parser import EXIT_BAD_INPUT, EXIT_IO, build_parser
from .data import DataConfig, DataError, build_datasets, build_loaders
from .deploy import deploy_checkpoint
from .export import check_onnx_dtype, export_for_format
from .flops import count_params, gflops
from .models import UnsupportedModelError
from .runs import RunError
from .timing import time_fn

DEBUG_ENV = "SPVIT_TRACEBACK"


# ----------------------------------------------------------------------------------------------------------------


def _flags(args: argparse.Namespace) -> Dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "config")}


def resolve_config(cls, args: argparse.Namespace):
    """The run's config: defaults (or, with --resume, the run's saved config), then --config, then the flags."""
    flags = _flags(args)
    config = getattr(args, "config", None)
    if not flags.get("resume"):
        return C.resolve(cls, flags, config)
    if flags.get("overwrite"):
        raise C.ConfigError("--overwrite and --resume exclude each other")
    if not flags.get("out"):
        raise C.ConfigError("--resume needs --out (the run folder to continue)")
    out = flags["out"]
    runs.check_out(out, resume=True)
    saved = C.load_saved(cls, os.path.join(out, "config.yaml"))
    cfg = C.resolve(cls, flags, config, base=C.without_run_control(saved))
    changed = C.changed_settings(saved, cfg)
    if changed and not cfg.allow_changes:
        what = ", ".join(f"{C.flag(k)} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise C.ConfigError(f"--resume: settings differ from the run's saved config ({what}); drop them to continue "
                            f"the run as it was, or pass --allow-changes to continue with them")
    if changed:
        print(f"note: resuming with changed settings: {', '.join(changed)} (config.yaml is updated)", flush=True)
    return cfg


def cmd_search(args) -> int:
    res = search.run(resolve_config(C.SearchConfig, args))
    _finish()
    if res["dist"].main and res.get("predicted_ms") is not None:
        print(f"predicted latency {res['predicted_ms']:.4g} ms (target {res['target_ms']:.4g} ms)")
    if res["dist"].main:
        print(f"architecture: {res['arch']} ({res['gflops']:.4g} of {res['dense_gflops']:.4g} GFLOPs, "
              f"val acc {res['val_acc1']:.2f})" if res["val_acc1"] is not None else f"architecture: {res['arch']}")
    return 0


def cmd_finetune(args) -> int:
    res = finetune.run(resolve_config(C.FinetuneConfig, args))
    _finish()
    if res["dist"].main:
        print(f"fine-tuned: {res['gflops']:.4g} GFLOPs, best val acc {res['best_acc1']:.2f}; "
              f"weights in {os.path.join(res['out'], 'best.pth')}")
    return 0


def _finish() -> None:
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def cmd_demo(args) -> int:
    flags = _flags(args)
    if flags.pop("resume", False):  # the demo is `spvit compress`: continue it as one
        if len(flags) > 1 or args.config or "out" not in flags:
            raise C.ConfigError("spvit demo --resume takes --out only (the run folder to continue)")
        summary = compress.cli_run({"out": flags["out"], "resume": True}, None, {"demo": demo.summary_hook})
        if "teacher_acc" in summary:
            D.log(demo.format_table(summary))
        return 0
    demo.run(C.resolve(C.DemoConfig, flags, args.config))
    return 0


def cmd_compress(args) -> int:
    s = compress.cli_run(_flags(args), args.config, {"demo": demo.summary_hook})
    if "achieved" in s:
        a = s["achieved"]
        sp = a["measured_speedup_spread"]
        print(f"measured speedup {a['measured_speedup']:.3f}x (spread {sp['min']:.3f}..{sp['max']:.3f}), "
              f"{a['dense_gflops']:.4g} -> {a['compressed_gflops']:.4g} GFLOPs, val acc {a['dense_val_acc']:.2f} -> "
              f"{a['compressed_val_acc']:.2f}; report: {os.path.join(args.out, 'report.md')}")
    return 0


def cmd_eval(args) -> int:
    cfg = C.resolve(C.EvalConfig, _flags(args), args.config)
    dist = D.init_distributed(cfg.device)
    if cfg.checkpoint:
        model, _ = load_finetuned(cfg.checkpoint)
        size = model.architecture.signature.img_size[0]
        if cfg.input_size is not None and cfg.input_size != size:
            raise RunError(f"--input-size {cfg.input_size}: the checkpoint's model takes {size}x{size} images")
        kwargs = None
    else:
        size = cfg.input_size or cfg.model_kwargs.get("img_size") or hub.timm_default_size(cfg.model)
        kwargs = dict(cfg.model_kwargs)
        if "img_size" not in kwargs and size != hub.timm_default_size(cfg.model):
            kwargs["img_size"] = size
        model = None
    dcfg = DataConfig(input_size=size, crop_pct=cfg.crop_pct)
    _, val = build_datasets(cfg.data, dcfg, need_train=False, eval_split="test")
    _, _, loader = build_loaders(None, val, cfg.batch_size, dist.world, dist.rank, num_workers=cfg.num_workers,
                                 eval_batch_size=cfg.batch_size)
    interrupts.quiet_workers(loader)
    if model is None:
        model = hub.build_timm_model(cfg.model, val.num_classes, cfg.pretrained, 0.0, kwargs)
    model.to(dist.device)
    r = E.evaluate(model, loader, dist, optim.amp_dtype(cfg.amp, dist.device))
    if dist.main:
        print(json.dumps({"acc1": r["acc1"], "acc5": r["acc5"], "loss": r["loss"], "gflops": gflops(model),
                          "params": count_params(model), "images": len(val)}))
    _finish()
    return 0


DEPLOY_FILES = ("deployed.pth", "arch.json", "model.pt2", "model.onnx")


def cmd_deploy(args) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise RunError(f"--out {args.out} exists and is not a folder")
    if os.path.isdir(args.out) and any(os.scandir(args.out)):
        if not args.overwrite:
            raise RunError(f"{args.out} exists and is not empty; pass --overwrite (replaces only "
                           f"{', '.join(DEPLOY_FILES)}) or choose another --out")
        others = sorted(e.name for e in os.scandir(args.out) if e.name not in DEPLOY_FILES)
        if others:
            raise RunError(f"--overwrite refused: {args.out} holds files spvit deploy did not write "
                           f"({', '.join(others[:3])}); choose another --out")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if getattr(args, "format", "torch") == "onnx":
        try:
            check_onnx_dtype(dtype)
        except ValueError as exc:
            raise C.ConfigError(f"--format onnx --dtype {args.dtype}: {exc}") from None
    deployed = deploy_checkpoint(args.checkpoint, model=args.model, dtype=dtype)  # validates before any write
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "deployed.pth")
    deployed.save(path)
    runs.write_json(deployed.architecture.to_dict(), os.path.join(args.out, "arch.json"))
    print(f"deployed (BN folded, FFNs compacted, fused kernels): {path}  "
          f"[{' '.join(deployed.architecture.attn_choices)}]  load with spvit.load_deployed()")
    if args.export:
        sig = deployed.architecture.signature
        example = torch.randn(1, sig.in_chans, *sig.img_size, dtype=dtype)
        buf = None
        try:
            ep = torch.export.export(deployed, (example,))
            buf = io.BytesIO()  # serialised in memory, then written atomically (a full disk is one clear error)
            torch.export.save(ep, buf)
        except Exception as exc:  # report, keep the saved model
            print(f"note: torch.export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                  f"{path} still loads with spvit.load_deployed")
            buf = None
        if buf is not None:
            pt2 = os.path.join(args.out, "model.pt2")
            data = buf.getbuffer()
            runs.atomic_write(pt2, lambda f: f.write(data))
            print(f"torch.export program: {pt2}")
    export_for_format(args, deployed, args.out)
    print(f"deployed model in {args.out}")
    return 0


def cmd_profile(args) -> int:
    if args.batch < 1:
        raise C.ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise C.ConfigError(f"--threads must be >= 1, got {args.threads}")
    if not math.isfinite(args.budget) or args.budget < 0 or args.min_reps < 1 or args.rounds < 1:
        raise C.ConfigError(f"--budget must be a finite number >= 0 (got {args.budget}), --min-reps and --rounds "
                            f">= 1")
    C.check_device(args.device)
    if os.path.exists(args.out) and not args.force:  # before minutes of measuring
        raise RunError(f"{args.out} exists; pass --force to replace it")
    device = D.init_distributed(args.device).device
    table = L.profile(args.model, device=device, dtype=args.dtype, batch=args.batch, threads=args.threads,
                      ffn_step=args.ffn_step, min_reps=args.min_reps, max_reps=max(100, args.min_reps),
                      budget_s=args.budget, model_kwargs=args.model_kwargs, show=args.progress, stat=args.stat,
                      clock=args.clock, rounds=args.rounds, context=args.context, steady_malloc=args.steady_malloc)
    table.save(args.out, force=args.force)
    print(table.summary())
    print(f"latency table: {args.out}")
    return 0


def bench_latency(args) -> int:
    """``spvit bench --latency-table``: predicted vs measured latency of the deployed model and of its dense model."""
    table = L.load_table(args.latency_table)
    device = D.init_distributed(args.device).device
    dtype = L.DTYPES[args.dtype or table.dtype]
    table.check_device(device, dtype)
    if args.batch_size_given and args.batch_size != table.batch:
        raise RunError(f"--batch-size {args.batch_size}: the latency table was measured at batch {table.batch}")
    deployed = deploy_checkpoint(args.checkpoint, dtype=dtype, device=device)
    table.check_model(deployed.signature, deployed.model_name)
    ck = runs.load_torch_file(args.checkpoint)
    kwargs = ck.get("model_kwargs") if isinstance(ck, dict) else None
    dense = L.dense_deployed(deployed.model_name, deployed.signature, device, dtype,
                             kwargs if kwargs is not None else L.timm_kwargs(deployed.signature))
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and table.device.get("threads"):
        torch.set_num_threads(int(table.device["threads"]))
    try:
        threads = torch.get_num_threads()
        r = L.compare(table, deployed, dense, rounds=int(table.meta.get("rounds", 1)), min_reps=args.iters,
                      steady_malloc=args.steady_malloc)
    finally:
        torch.set_num_threads(threads_before)
    where = f", {threads} thread(s)" if device.type == "cpu" else ""
    print(f"{table.device.get('name')} [{table.device.get('class')}], {table.dtype}, batch {table.batch}{where} "
          f"({table.meta.get('stat', 'median')} of >= {args.iters} calls, {table.meta.get('clock', 'wall')} clock)")
    print(f"{'':8s}{'predicted ms':>14s}{'measured ms':>14s}{'error':>8s}")
    print(f"{'dense':8s}{r['dense_predicted_ms']:14.3f}{r['dense_measured_ms']:14.3f}"
          f"{100 * (r['dense_predicted_ms'] / r['dense_measured_ms'] - 1):7.1f}%")
    print(f"{'pruned':8s}{r['predicted_ms']:14.3f}{r['measured_ms']:14.3f}{100 * r['error']:7.1f}%")
    print(f"speedup: predicted {r['predicted_speedup']:.3f}x, measured {r['measured_speedup']:.3f}x "
          f"({gflops(deployed):.4g} of {gflops(dense):.4g} GFLOPs)")
    return 0


def cmd_bench(args) -> int:
    if args.iters < 1:
        raise C.ConfigError(f"--iters must be >= 1, got {args.iters}")
    args.batch_size_given = args.batch_size is not None
    if args.batch_size is None:
        args.batch_size = 64
    if args.batch_size < 1:
        raise C.ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    C.check_device(args.device)
    if args.latency_table:
        return bench_latency(args)
    model, ck = load_finetuned(args.checkpoint)
    dist = D.init_distributed(args.device)
    dense = hub.build_timm_model(ck["model_name"], ck["num_classes"], None, 0.0, ck.get("model_kwargs")).eval()
    sig = model.architecture.signature
    gib = args.batch_size * sig.in_chans * sig.img_size[0] * sig.img_size[1] * 4 / 2**30
    if gib > BENCH_MAX_INPUT_GIB:
        raise RunError(f"--batch-size {args.batch_size}: the input batch alone would take {gib:.3g} GiB "
                       f"(limit {BENCH_MAX_INPUT_GIB} GiB); use a smaller batch")
    try:
        x = torch.randn(args.batch_size, sig.in_chans, *sig.img_size, device=dist.device)
    except (RuntimeError, MemoryError) as exc:  # out of memory on the device
        raise RunError(f"--batch-size {args.batch_size} does not fit in memory on {dist.device} "
                       f"({_one_line(exc)[:120]}); use a smaller batch") from None
    for name, m in (("dense", dense), ("pruned", model)):
        m.to(dist.device)
        with torch.no_grad():
            t = time_fn(lambda: m(x), dist.device, warmup=3, rep=args.iters)
        print(f"{name:>7s}: {gflops(m):.4g} GFLOPs  {t['ms']:.2f} ms/batch (median of {args.iters})  "
              f"{1e3 * args.batch_size / t['ms']:.0f} img/s")
    print("(eager PyTorch; kernel benchmarks: bench/ in the repository)")
    return 0


BENCH_MAX_INPUT_GIB = 8  # the images of one `spvit bench` batch


COMMANDS = {"demo": cmd_demo, "compress": cmd_compress, "search": cmd_search, "finetune": cmd_finetune,
            "eval": cmd_eval, "deploy": cmd_deploy,
            "bench": cmd_bench, "profile": cmd_profile}


def _say(msg: str) -> None:
    """One line on stderr, from rank 0 only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(f"spvit: {msg}", file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught"):  # re-raised from a DataLoader worker: its last line
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines) or type(exc).__name__


def _peer_lost(exc: BaseException, args: argparse.Namespace) -> Optional[str]:
    """Under torchrun, when another rank died: one line saying which and how to continue (None otherwise)."""
    if not interrupts.peer_lost(exc):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    other = f"rank {1 - rank}" if world == 2 else "another rank"
    out = getattr(args, "out", None)
    if out and os.path.isfile(os.path.join(out, runs.CHECKPOINT)):
        how = (f"the last checkpoint is kept: continue with `torchrun ... -m spvit {args.command} --out {out} "
               f"--resume` once every rank can run")
    else:
        how = "no checkpoint was written yet: start the run again"
    return f"rank {rank}: {other} of this torchrun job stopped (its connection closed; see its own output); {how}"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``spvit``; returns the exit code (2 on bad input, 1 on a failed write, 130/143 on a signal)."""
    args = build_parser().parse_args(argv)
    debug = os.environ.get(DEBUG_ENV) == "1"
    before = {sig: signal.getsignal(sig) for sig in interrupts.STOP_SIGNALS}
    try:
        interrupts.install_stop_handlers()
        return COMMANDS[args.command](args)
    except interrupts.Interrupted as exc:
        _say(str(exc))
        return 128 + exc.signum
    except KeyboardInterrupt:
        _say("interrupted before training began; nothing was saved to resume")
        return 128 + signal.SIGINT
    except E.TrainingError as exc:  # a failure while training, not the user's input
        if debug:
            raise
        _say(f"training failed: {_one_line(exc)}")
        return EXIT_IO
    except (DataError, runs.RunError, UnsupportedModelError, ValueError, FileNotFoundError, TypeError) as exc:
        if debug:
            raise
        _say(f"error: {_one_line(exc)}")
        return EXIT_BAD_INPUT
    except RuntimeError as exc:
        signum = interrupts.worker_killed_by_stop(exc)
        if signum is not None:  # a DataLoader worker killed by the same signal, heard of as the stop unwound
            _say(interrupts.outside_message(signum))
            return 128 + signum
        lost = None if debug else _peer_lost(exc, args)
        if lost is None:
            raise
        print(f"spvit: error: {lost}", file=sys.stderr, flush=True)  # from every rank: rank 0 may be the one lost
        return EXIT_IO
    except OSError as exc:  # a failed write (full disk, permissions): the previous files are intact
        if debug:
            raise
        _say(f"error: {_one_line(exc)}")
        # a symbolic-link loop is in the input (a data folder), never the result of a failed write
        return EXIT_BAD_INPUT if exc.errno == errno.ELOOP and not isinstance(exc, runs.RunIOError) else EXIT_IO
    finally:
        with contextlib.suppress(ValueError, TypeError):  # not the main thread, or a handler not set from Python
            for sig, handler in before.items():
                signal.signal(sig, handler)
            if any(h is _startup._on_signal for h in before.values()):  # the `spvit` command: it is ending
                _startup.finished()


if __name__ == "__main__":
    sys.exit(main())
