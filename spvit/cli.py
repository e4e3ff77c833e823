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

from ._version import __version__
from . import config as C
from . import _startup, demo, finetune, runs, search
from . import engine as E
from .data import DataConfig, DataError, build_datasets, build_loaders
from .deploy import deploy_checkpoint
from .export import add_format_argument, export_for_format
from .finetune import model_from_checkpoint
from .flops import count_params, gflops
from .models import UnsupportedModelError
from .timing import time_fn

EXIT_BAD_INPUT = 2
EXIT_IO = 1
S = argparse.SUPPRESS
DEBUG_ENV = "SPVIT_TRACEBACK"


def _json(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {s!r} ({exc})")


def _json_dict(s: str) -> Dict:
    v = _json(s)
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"img_size\": 32}}', got {s!r}")
    return v


def _optional_float(s: str):
    return None if s.lower() in ("none", "null", "") else float(s)


class Parser(argparse.ArgumentParser):
    """argparse with the package's one-line error format (exit code 2)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"spvit: error: {message} (see `{self.prog} --help`)\n")


def _add_run(g, demo: bool = False) -> None:
    g.add_argument("--out", default=S, help="run folder: created if new; an existing one is only continued "
                   "(--resume) or replaced (--overwrite)" + (" (default ./spvit_demo)" if demo else ""))
    g.add_argument("--overwrite", action="store_true", default=S,
                   help="replace the run in --out: removes only the files spvit wrote there, and only in a folder "
                        "spvit created (never ., $HOME or /)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config read first; flags override it (see configs/)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, help="timm model name, e.g. deit_small_patch16_224 or "
                   "swin_tiny_patch4_window7_224")
    g.add_argument("--model-kwargs", type=_json_dict, default=S, help="JSON object of extra timm.create_model kwargs")
    g.add_argument("--pretrained", default=S, help="'timm' (hub, needs network or the hub cache), 'none', or a local "
                   "checkpoint path")
    g.add_argument("--drop-path", type=float, default=S, help="stochastic depth rate, in [0, 1)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=S, help="ImageNet-layout folder (train/, val/ of class folders) or 'digits'")
    g.add_argument("--num-classes", type=int, default=S, help="must match the dataset (default: from the data)")
    g.add_argument("--input-size", type=int, default=S, help="image side in pixels; the model is built for it "
                   "(default: the model's own size; fine-tune: the architecture's)")
    g.add_argument("--aa", default=S, help="RandAugment policy ('none' to disable)")
    g.add_argument("--reprob", type=float, default=S, help="random erasing probability, in [0, 1]")
    g.add_argument("--mixup", type=float, default=S, help="Mixup alpha (0 disables)")
    g.add_argument("--cutmix", type=float, default=S, help="CutMix alpha (0 disables)")
    g.add_argument("--smoothing", type=float, default=S, help="label smoothing, in [0, 1)")
    g.add_argument("--no-repeated-aug", dest="repeated_aug", action="store_false", default=S,
                   help="plain shuffling instead of repeated augmentation")
    g.add_argument("--num-workers", type=int, default=S, help="data loader processes per rank")
    g = p.add_argument_group("run")
    _add_run(g)
    g.add_argument("--resume", action="store_true", default=S,
                   help="continue the run in --out from its checkpoint and saved config (no other flag needed)")
    g.add_argument("--allow-changes", action="store_true", default=S,
                   help="with --resume: accept settings that differ from the saved config (saved anew)")
    g.add_argument("--stop-after-epoch", type=int, default=S, help="end after this epoch (resume later)")
    g.add_argument("--device", default=S, help=C.DEVICE_HELP + "; one process per GPU under torchrun")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default=S,
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    g.add_argument("--seed", type=int, default=S, help="random seed (each rank adds its rank)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=S, help="per process")
    g.add_argument("--epochs", type=int, default=S, help="epochs to run (>= 1)")
    g.add_argument("--sched-epochs", type=int, default=S,
                   help="cosine schedule length (search default 300, as the original; fine-tune: --epochs)")
    g.add_argument("--lr", type=float, default=S, help="scaled by global batch / 512 unless --no-scale-lr")
    g.add_argument("--no-scale-lr", dest="scale_lr", action="store_false", default=S,
                   help="use --lr as given (no batch scaling)")
    g.add_argument("--scale-all-lrs", action="store_true", default=S,
                   help="also scale --min-lr, the warm-up lr and the architecture lrs by global batch / 512 (the "
                        "Swin recipe)")
    g.add_argument("--sched-per-step", action="store_true", default=S,
                   help="update the cosine schedules every iteration instead of every epoch (the Swin recipe)")
    g.add_argument("--min-lr", type=float, default=S, help="floor of the cosine schedule (capped at the scaled lr)")
    g.add_argument("--warmup-epochs", type=int, default=S, help="linear warm-up epochs")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (>= 0)")
    g.add_argument("--clip-grad", type=_optional_float, default=S, help="gradient norm clip ('none': off)")
    g.add_argument("--model-ema", action="store_true", default=S, help="keep an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float, default=S, help="EMA decay, in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="spvit", description="SPViT: prune ViT self-attentions into convolutions.")
    ap.add_argument("--version", action="version", version=f"spvit {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole method on the embedded digits set, in minutes on a laptop CPU")
    p.add_argument("--config", help="YAML file of demo settings")
    _add_run(p, demo=True)
    p.add_argument("--device", default=S, help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=S, help="random seed (the results file has seeds 0, 1, 2)")
    p.add_argument("--threads", type=int, default=S,
                   help="torch CPU threads (default 1: the published table; more threads may change the results "
                        "slightly)")
    p.add_argument("--teacher-epochs", type=int, default=S, help="epochs of the dense teacher")
    p.add_argument("--search-epochs", type=int, default=S, help="epochs of the search")
    p.add_argument("--finetune-epochs", type=int, default=S, help="epochs of the fine-tune")
    p.add_argument("--target-fraction", type=float, default=S,
                   help="FLOPs target as a fraction of the teacher's, in (0, 1]")
    p.add_argument("--distillation", choices=["none", "hard", "soft"], default=S,
                   help="distillation from the teacher during the fine-tune")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
    p.add_argument("--resume", action="store_true", default=S,
                   help="continue the demo in --out from the stage it stopped in (no other flag needed)")

    from .compress import add_parser as add_compress_parser

    add_compress_parser(sub, S, _json_dict)

    p = sub.add_parser("search", help="SPViT search: supernet + FLOPs loss, writes arch.json")
    _add_common(p)
    g = p.add_argument_group("search")
    g.add_argument("--target-gflops", type=float, default=S, help="FLOPs target T in GFLOPs (MACs / 1e9)")
    g.add_argument("--loss-lambda", type=float, default=S, help="weight of the FLOPs loss lambda (T - F)^2")
    g.add_argument("--arc-lr", type=float, default=S,
                   help="learning rate of the gate logits (not scaled, unless --scale-all-lrs)")
    g.add_argument("--arc-min-lr", type=float, default=S, help="floor of the gate logits' schedule "
                   "(default: --min-lr, as the original)")
    g.add_argument("--theta", type=float, default=S, help="initial gate logit")
    g.add_argument("--arc-sched-epochs", type=int, default=S,
                   help="cosine length of the gate logits' schedule (default: the lr's; Swin configs: 150)")
    g.add_argument("--alpha", type=float, default=S,
                   help="head-mixing temperature (> 0; default the family's: 0.01 DeiT, 100 Swin)")
    g = p.add_argument_group("hardware-aware search (a latency table from `spvit profile`)")
    g.add_argument("--latency-table", default=S, help="latency table JSON: the complexity term becomes the predicted "
                   "latency on the profiled device (--target-gflops is then unused)")
    g.add_argument("--target-speedup", type=float, default=S, help="latency target = predicted dense latency / S")
    g.add_argument("--target-latency-ms", type=float, default=S, help="absolute latency target (ms per batch of the "
                   "table's batch size)")
    g.add_argument("--ffn-align", type=int, default=S, help="read out a multiple of N units per FFN (by gate-logit "
                   "order; 0: off)")

    p = sub.add_parser("finetune", help="fine-tune the pruned model of an arch.json (optionally distilled)")
    _add_common(p)
    g = p.add_argument_group("fine-tune")
    g.add_argument("--arch", default=S, help="arch.json from `spvit search`")
    g.add_argument("--init", default=S, help="'pretrained' (dense weights, the original), 'none', or a search "
                   "checkpoint path (carries the searched weights)")
    g.add_argument("--teacher", default=S, help="timm model name (e.g. regnety_160) or a best.pth of a run")
    g.add_argument("--teacher-weights", default=S, help="'timm' (hub) or a local checkpoint for --teacher")
    g.add_argument("--teacher-file-runs-code", action="store_true", default=S,
                   help="allow --teacher to be a whole pickled model: loading it RUNS CODE from the file; only for "
                        "files you trust")
    g.add_argument("--distillation", choices=["none", "hard", "soft"], default=S, help="DeiT distillation kind")
    g.add_argument("--distillation-alpha", type=float, default=S, help="weight of the distillation term, in [0, 1]")
    g.add_argument("--distillation-tau", type=float, default=S, help="temperature of soft distillation (> 0)")

    p = sub.add_parser("eval", help="top-1/top-5 of a fine-tuned checkpoint (best.pth) or a dense timm model")
    p.add_argument("--config", help="YAML file of eval settings")
    p.add_argument("--checkpoint", default=S, help="best.pth / checkpoint.pth of a fine-tune run")
    p.add_argument("--model", default=S, help="dense timm model (with --pretrained) instead of --checkpoint")
    p.add_argument("--model-kwargs", type=_json_dict, default=S, help="JSON object of extra timm kwargs (--model)")
    p.add_argument("--pretrained", default=S, help="weights of --model: 'timm', 'none' or a local file")
    p.add_argument("--data", default=S, help="ImageNet-layout folder (its val/) or 'digits' (its test split)")
    p.add_argument("--batch-size", type=int, default=S, help="images per batch")
    p.add_argument("--device", default=S, help=C.DEVICE_HELP)
    p.add_argument("--input-size", type=int, default=S, help="image side (default: the model's)")
    p.add_argument("--num-workers", type=int, default=S, help="data loader processes")

    p = sub.add_parser("deploy", help="export the fine-tuned model for inference")
    p.add_argument("--checkpoint", required=True,
                   help="best.pth of a fine-tune run, or an original SPViT fine-tune checkpoint (with --model)")
    p.add_argument("--model", default=None, help="timm model an original SPViT checkpoint was trained from")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights and compute dtype")
    p.add_argument("--out", required=True, help="output folder (new or empty, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace deployed.pth / arch.json / model.pt2 / model.onnx in --out")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip torch.export")
    add_format_argument(p)

    p = sub.add_parser("bench", help="inference time of a fine-tuned checkpoint vs its dense model (eager PyTorch)")
    p.add_argument("--checkpoint", required=True, help="best.pth / checkpoint.pth of a fine-tune run")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (>= 1; default 64, or the latency "
                   "table's)")
    p.add_argument("--device", default="auto", help=C.DEVICE_HELP)
    p.add_argument("--iters", type=int, default=20, help="timed batches per model (>= 1)")
    p.add_argument("--latency-table", default=None, help="latency table (`spvit profile`): print predicted vs measured "
                   "latency of the deployed model and its dense model on the table's device, dtype and batch")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="with --latency-table: the dtype to run (default and only accepted value: the table's)")
    p.add_argument("--keep-malloc", dest="steady_malloc", action="store_false",
                   help="with --latency-table on CPU: leave the C allocator's thresholds as they are (by default they "
                        "are fixed as `spvit profile` does, see spvit.latency.set_steady_malloc)")

    p = sub.add_parser("profile", help="latency table of a model's deployed pieces on this device (for the "
                       "hardware-aware search)")
    p.add_argument("--model", required=True, help="timm model name, e.g. deit_small_patch16_224")
    p.add_argument("--model-kwargs", type=_json_dict, default={}, help="JSON object of extra timm.create_model kwargs")
    p.add_argument("--device", default="cpu", help=C.DEVICE_HELP)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights and compute dtype")
    p.add_argument("--batch", type=int, default=1, help="images per batch (>= 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while measuring (default: torch's)")
    p.add_argument("--ffn-step", type=int, default=None, help="FFN width grid step (default 64 for FFNs of >= 1024 "
                   "units, else width/16)")
    p.add_argument("--min-reps", type=int, default=5, help="timed calls per piece, at least (>= 1)")
    p.add_argument("--budget", type=float, default=0.3, help="seconds per piece: repeat until spent (adaptive)")
    p.add_argument("--context", type=int, default=4, help="time each block piece inside a run of this many blocks, "
                   "as in the model (0: each piece alone, from warm caches)")
    p.add_argument("--rounds", type=int, default=1, help="passes over all pieces; the median over passes is kept "
                   "(spreads the disturbance of a loaded machine over every piece)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic of the repeats (min: least disturbed on a loaded machine)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: latency (default); cpu: process CPU time with --threads 1 (the latency on an idle core, "
                        "for a CPU shared with other work)")
    p.add_argument("--keep-malloc", dest="steady_malloc", action="store_false",
                   help="on CPU: leave the C allocator's thresholds as they are (by default glibc's mmap and trim "
                        "thresholds are fixed so that page faults do not depend on what ran before; recorded)")
    p.add_argument("--out", required=True, help="the table's JSON file (never replaced without --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return ap


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
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def cmd_demo(args) -> int:
    flags = _flags(args)
    if flags.pop("resume", False):  # the demo is `spvit compress`: continue it as one
        from . import compress

        if len(flags) > 1 or args.config or "out" not in flags:
            raise C.ConfigError("spvit demo --resume takes --out only (the run folder to continue)")
        summary = compress.cli_run({"out": flags["out"], "resume": True}, None, {"demo": demo.summary_hook})
        if "teacher_acc" in summary:
            E.log(demo.format_table(summary))
        return 0
    demo.run(C.resolve(C.DemoConfig, flags, args.config))
    return 0


def cmd_compress(args) -> int:
    from . import compress

    s = compress.cli_run(_flags(args), args.config, {"demo": demo.summary_hook})
    if "achieved" in s:
        a = s["achieved"]
        sp = a["measured_speedup_spread"]
        print(f"measured speedup {a['measured_speedup']:.3f}x (spread {sp['min']:.3f}..{sp['max']:.3f}), "
              f"{a['dense_gflops']:.4g} -> {a['compressed_gflops']:.4g} GFLOPs, val acc {a['dense_val_acc']:.2f} -> "
              f"{a['compressed_val_acc']:.2f}; report: {os.path.join(args.out, 'report.md')}")
    return 0


def load_finetuned(path: str):
    """A fine-tuned pruned model (eval mode) and its checkpoint, from a ``best.pth`` / ``checkpoint.pth`` of a
    fine-tune run (loaded with ``weights_only=True``)."""
    ck = runs.load_torch_file(path, "checkpoint")
    if not isinstance(ck, dict) or not isinstance(ck.get("arch"), dict) or "model" not in ck:
        raise E.RunError(f"{path} is not a checkpoint of `spvit finetune` (no architecture inside)")
    return model_from_checkpoint(ck, path).eval(), ck


def cmd_eval(args) -> int:
    cfg = C.resolve(C.EvalConfig, _flags(args), args.config)
    dist = E.init_distributed(cfg.device)
    if cfg.checkpoint:
        model, _ = load_finetuned(cfg.checkpoint)
        size = model.architecture.signature.img_size[0]
        if cfg.input_size is not None and cfg.input_size != size:
            raise E.RunError(f"--input-size {cfg.input_size}: the checkpoint's model takes {size}x{size} images")
        kwargs = None
    else:
        size = cfg.input_size or cfg.model_kwargs.get("img_size") or E.timm_default_size(cfg.model)
        kwargs = dict(cfg.model_kwargs)
        if "img_size" not in kwargs and size != E.timm_default_size(cfg.model):
            kwargs["img_size"] = size
        model = None
    dcfg = DataConfig(input_size=size, crop_pct=cfg.crop_pct)
    _, val = build_datasets(cfg.data, dcfg, need_train=False, eval_split="test")
    _, _, loader = build_loaders(None, val, cfg.batch_size, dist.world, dist.rank, num_workers=cfg.num_workers,
                                 eval_batch_size=cfg.batch_size)
    runs.quiet_workers(loader)
    if model is None:
        model = E.build_timm_model(cfg.model, val.num_classes, cfg.pretrained, 0.0, kwargs)
    model.to(dist.device)
    r = E.evaluate(model, loader, dist, E.amp_dtype(cfg.amp, dist.device))
    if dist.main:
        print(json.dumps({"acc1": r["acc1"], "acc5": r["acc5"], "loss": r["loss"], "gflops": gflops(model),
                          "params": count_params(model), "images": len(val)}))
    _finish()
    return 0


DEPLOY_FILES = ("deployed.pth", "arch.json", "model.pt2", "model.onnx")


def cmd_deploy(args) -> int:
    import torch

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise E.RunError(f"--out {args.out} exists and is not a folder")
    if os.path.isdir(args.out) and any(os.scandir(args.out)):
        if not args.overwrite:
            raise E.RunError(f"{args.out} exists and is not empty; pass --overwrite (replaces only "
                             f"{', '.join(DEPLOY_FILES)}) or choose another --out")
        others = sorted(e.name for e in os.scandir(args.out) if e.name not in DEPLOY_FILES)
        if others:
            raise E.RunError(f"--overwrite refused: {args.out} holds files spvit deploy did not write "
                             f"({', '.join(others[:3])}); choose another --out")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if getattr(args, "format", "torch") == "onnx":
        from .export import check_onnx_dtype

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
    from . import latency as L

    if args.batch < 1:
        raise C.ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise C.ConfigError(f"--threads must be >= 1, got {args.threads}")
    if not math.isfinite(args.budget) or args.budget < 0 or args.min_reps < 1 or args.rounds < 1:
        raise C.ConfigError(f"--budget must be a finite number >= 0 (got {args.budget}), --min-reps and --rounds "
                            f">= 1")
    C.check_device(args.device)
    if os.path.exists(args.out) and not args.force:  # before minutes of measuring
        raise E.RunError(f"{args.out} exists; pass --force to replace it")
    device = E.init_distributed(args.device).device
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
    import torch

    from . import latency as L

    table = L.load_table(args.latency_table)
    device = E.init_distributed(args.device).device
    dtype = L.DTYPES[args.dtype or table.dtype]
    table.check_device(device, dtype)
    if args.batch_size_given and args.batch_size != table.batch:
        raise E.RunError(f"--batch-size {args.batch_size}: the latency table was measured at batch {table.batch}")
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
    import torch

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
    dist = E.init_distributed(args.device)
    dense = E.build_timm_model(ck["model_name"], ck["num_classes"], None, 0.0, ck.get("model_kwargs")).eval()
    sig = model.architecture.signature
    gib = args.batch_size * sig.in_chans * sig.img_size[0] * sig.img_size[1] * 4 / 2**30
    if gib > BENCH_MAX_INPUT_GIB:
        raise E.RunError(f"--batch-size {args.batch_size}: the input batch alone would take {gib:.3g} GiB "
                         f"(limit {BENCH_MAX_INPUT_GIB} GiB); use a smaller batch")
    try:
        x = torch.randn(args.batch_size, sig.in_chans, *sig.img_size, device=dist.device)
    except (RuntimeError, MemoryError) as exc:  # out of memory on the device
        raise E.RunError(f"--batch-size {args.batch_size} does not fit in memory on {dist.device} "
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
    if not runs.peer_lost(exc):
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
    before = {sig: signal.getsignal(sig) for sig in runs.STOP_SIGNALS}
    try:
        runs.install_stop_handlers()
        return COMMANDS[args.command](args)
    except runs.Interrupted as exc:
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
