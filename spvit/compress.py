"""``spvit compress``: from a timm model (or a checkpoint of a run) and a dataset to a deployed model measured on the
device, in one run folder.

Stages (each writes the files of the separate command, in its own sub-folder of ``--out``):

====== ===================================================== ==================================================
stage  what                                                  files
====== ===================================================== ==================================================
teacher (only with ``teacher_epochs`` > 0) train the dense ``teacher/``: as ``spvit search``/``finetune``
       model first (a model without pre-trained weights)     (``config.yaml``, ``checkpoint.pth``, ``best.pth``)
profile (latency / speedup target) the latency table of the  ``latency.json`` (as ``spvit profile``)
       model's deployed pieces on ``--device``
search SPViT search to the target, read-out with             ``search/`` (as ``spvit search``: ``arch.json``...)
       ``--ffn-align`` (default: the table's width grid)
finetune the pruned model, searched weights carried, with    ``finetune/`` (as ``spvit finetune``: ``best.pth``)
       distillation from the dense model
deploy BN folded, FFNs compacted, fused kernels              ``deploy/`` (as ``spvit deploy``: ``deployed.pth``)
measure accuracy of dense and compressed on the validation   ``measure.json``
       split; latency of both deployed models, alternated
       over rounds (median speedup and its spread); predicted
       vs measured latency
report the request against what was achieved                 ``report.md``, ``summary.json``, ``report.png``
====== ===================================================== ==================================================

The top folder holds the resolved settings (``compress.yaml``) and the stages done (``stages.json``); one lock on it
covers the whole run. ``spvit compress --out DIR --resume`` continues the stage that was running (a training stage
from its checkpoint). Every input (model, weights, data, device, the target's reachability on the device) is checked
before the first file is written.

Recipes (``--recipe``): ``paper`` takes the original configuration of the model family (``configs/``: epochs,
learning rates, lambda, data recipe); ``quick`` the same with :data:`~spvit.compress_plan.QUICK_FRACTION` of every
epoch count (at least one), for a first look; ``none`` the package's defaults. Settings for every training stage
(``train``) and per stage (``teacher``, ``search``, ``finetune``) override the recipe, from ``--config file.yaml`` or
the command line.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import shlex
import signal
import time
from typing import Any, Callable, Dict, List, Optional

import timm
import torch
from torch.utils.data import DataLoader

from . import distributed as D
from . import finetune, hub, interrupts, optim, runs, search
from . import latency as L
from ._version import __version__
from .arch import Architecture
from .checkpoints import model_meta
from .compress_plan import (CONFIG_NAME, EXECUTION_ONLY, LAMBDA_REL, MEASURE_FILE, STAGES, STAGES_FILE, TABLE_FILE,
                            CompressConfig, Plan, check_data, chosen_model, device_of, input_size, paper_family,
                            preflight, probe_model)
from .config import ConfigError, TrainConfig, changed_settings, flag, load_saved, resolve
from .config import save as save_config
from .data import DataConfig, DigitsDataset, build_datasets
from .deploy import deploy_checkpoint, load_deployed
from .engine import evaluate, fit, run_folder, save_run_config, setup
from .flops import count_params, gflops
from .models import supernet
from .plots import plot_compress
from .runs import RunError
from .timing import time_fn

MISS_TOLERANCE = 0.10  # a measured speedup (or FLOPs) further than this from the request is reported plainly


# ----------------------------------------------------------------------------------------------------------------
# Utilities


def _write_stages(out: str, done: List[str], times: Dict[str, float]) -> None:
    runs.write_json({"done": done, "stage_s": times}, os.path.join(out, STAGES_FILE))


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stage_state(folder: str) -> Dict[str, bool]:
    """How to (re)start a training stage in ``folder``: resume from its checkpoint, or start over in it."""
    if os.path.isfile(os.path.join(folder, runs.CHECKPOINT)) and runs.is_run_folder(folder):
        return {"resume": True, "overwrite": False}
    return {"resume": False, "overwrite": runs.is_run_folder(folder)}


def _median(v: List[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def train_dense(cfg: TrainConfig) -> None:
    """Dense training (no pruning, no distillation), resumable; the model selected on validation is in
    ``best.pth``."""
    size = hub.model_input_size(cfg)
    st = setup(cfg, size)
    dist = st.dist
    model = hub.build_timm_model(cfg.model, st.num_classes, None, cfg.drop_path, cfg.model_kwargs, dist)
    with run_folder(cfg, dist) as out:
        save_run_config(cfg, out, dist)
        model.to(dist.device)
        opt = torch.optim.AdamW(optim.decay_groups(model, cfg.weight_decay), lr=cfg.lr)
        sched = optim.Schedule(opt, cfg.lr, cfg.min_lr, cfg.schedule_length, cfg.warmup_epochs, cfg.warmup_lr)
        task = optim.task_loss_fn(cfg.smoothing, False)
        fit(model=D.wrap_ddp(model, dist), schedules=[sched], epochs=cfg.epochs,
            loss_fn=lambda im, lo, y: (task(lo, y), {}), train_loader=st.train_loader, train_sampler=st.sampler,
            val_loader=st.val_loader, dist=dist, out=out, dtype=optim.amp_dtype(cfg.amp, dist.device),
            best_meta=model_meta(cfg.model, cfg.model_kwargs, st.num_classes),
            show=cfg.progress, desc="teacher", tensorboard=cfg.tensorboard, resume=cfg.resume,
            stop_after_epoch=cfg.stop_after_epoch)


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def measure_latency(deployed, dense, batch: int, rounds: int, budget_s: float, stat: str = "median",
                    clock: str = "wall") -> Dict[str, Any]:
    """Latency of the compressed and the dense deployed models, alternated over ``rounds`` (so that a change of
    load affects both alike; the first model of a round alternates as well): per round the speedup dense /
    compressed; the median and its spread (min, max, quartiles) over the rounds."""
    sig = deployed.signature
    dev = deployed.device
    x = torch.randn(batch, sig.in_chans, *sig.img_size, device=dev, dtype=deployed.dtype)
    key = L.STATS.get(stat, "ms")
    if dev.type == "cpu":
        L.set_steady_malloc()
    comp, dns, sp = [], [], []
    with torch.inference_mode():
        for r in range(rounds):  # which model goes first alternates too: neither gains from the other's warm-up
            order = (deployed, dense) if r % 2 == 0 else (dense, deployed)
            t = [time_fn(lambda m=m: m(x), dev, 2, 3, budget_s=budget_s, max_reps=50, clock=clock)[key]
                 for m in order]
            c, d = (t[0], t[1]) if r % 2 == 0 else (t[1], t[0])
            comp.append(c)
            dns.append(d)
            sp.append(d / c)
    q = sorted(sp)

    def quantile(p):
        i = p * (len(q) - 1)
        lo, hi = int(math.floor(i)), int(math.ceil(i))
        return q[lo] + (q[hi] - q[lo]) * (i - lo)

    return {"compressed_ms": _median(comp), "dense_ms": _median(dns), "speedup": _median(sp),
            "speedup_min": q[0], "speedup_max": q[-1], "speedup_q1": quantile(0.25), "speedup_q3": quantile(0.75),
            "speedup_rounds": sp, "rounds": rounds, "batch": batch, "stat": stat, "clock": clock,
            "threads": torch.get_num_threads()}


def accuracy(model: torch.nn.Module, data: str, size: int, split: str = "val", batch_size: int = 100) -> float:
    """Top-1 (%) of ``model`` on a split of ``data`` (``val``; ``test`` for the digits)."""
    if split == "test":
        ds = DigitsDataset("test", size=size)
    else:
        _, ds = build_datasets(data, DataConfig(input_size=size), need_train=False)
    loader = DataLoader(ds, batch_size=batch_size)
    return evaluate(model, loader, D.DistInfo(), show=False)["acc1"]


# ----------------------------------------------------------------------------------------------------------------
# The run


def _load_cfg(out: str, flags: Dict[str, Any], config: Optional[str], allow_changes: bool) -> CompressConfig:
    path = os.path.join(out, CONFIG_NAME)
    if not runs.is_run_folder(out) or not os.path.isfile(path):
        raise RunError(f"--resume: {out} is not a run folder of spvit compress (no {CONFIG_NAME} in it)")
    saved = load_saved(CompressConfig, path)
    flags = {k: v for k, v in flags.items() if k not in ("resume", "allow_changes", "stop_after")}
    cfg = resolve(CompressConfig, flags, config, base=saved.replace(overwrite=False))
    changed = [k for k in changed_settings(saved, cfg) if k not in EXECUTION_ONLY]
    if changed and not allow_changes:
        what = ", ".join(f"{flag(k)} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ConfigError(f"--resume: settings differ from the run's saved config ({what}); drop them to continue "
                          f"the run as it was, or pass --allow-changes to continue with them")
    return cfg


def run(cfg: CompressConfig, resume: bool = False, stop_after: Optional[str] = None,
        hook: Optional[Callable[[Dict, Dict], Dict]] = None, on_open: Optional[Callable[[str], None]] = None) -> Dict:
    """Run (or with ``resume`` continue) a compression; returns the summary (also ``out/summary.json``).

    ``stop_after``: end after this stage (the run continues with ``resume``). ``hook(summary, ctx)``: adds to the
    summary before it is written (the demo's table). ``on_open(out)``: called once the new run's folder is open
    (the demo saves its own settings there)."""
    cfg = cfg.validate()
    if stop_after is not None and stop_after not in STAGES:
        raise ConfigError(f"--stop-after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    out = cfg.out
    if resume:
        if not runs.is_run_folder(out) or not os.path.isfile(os.path.join(out, CONFIG_NAME)):
            raise RunError(f"--resume: {out} is not a run folder of spvit compress (no {CONFIG_NAME} in it)")
    else:
        runs.check_out(out, cfg.overwrite)
    plan = Plan(cfg)
    threads_before = torch.get_num_threads()
    done: List[str] = []
    times: Dict[str, float] = {}
    if resume and os.path.isfile(os.path.join(out, STAGES_FILE)):
        state = _read_json(os.path.join(out, STAGES_FILE))
        done, times = list(state.get("done", [])), dict(state.get("stage_s", {}))
    preflight(plan, resume)  # profiles (in memory) when needed: nothing written yet
    lock = _reopen(out) if resume else runs.open_run(out, overwrite=cfg.overwrite)
    stage = "start"
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if not resume:
            save_config(cfg.replace(overwrite=False), os.path.join(out, CONFIG_NAME))
            _write_stages(out, done, times)
            if on_open is not None:
                on_open(out)
        ctx = {"plan": plan, "times": times}

        def finish(stage: str, t0: float) -> bool:
            # every process's time in the stage (a resumed stage adds up); profiling happens before the folder opens
            times[f"{stage}_s"] = round(times.get(f"{stage}_s", 0.0) + time.perf_counter() - t0
                                        + (plan.profile_s if stage == "profile" else 0.0), 1)
            runs.crash_point(f"compress_{stage}_done")
            done.append(stage)
            _write_stages(out, done, times)
            return stage == stop_after

        for stage in STAGES:
            if stage in done:
                continue
            t0 = time.perf_counter()
            if stage == "teacher" and plan.has_dense_stage:
                D.log("== teacher: train the dense model ==")
                train_dense(plan.dense_cfg.replace(**_stage_state(plan.dense_cfg.out)))
            elif stage == "profile" and plan.table is not None:
                plan.table.save(os.path.join(out, TABLE_FILE), force=True)
                D.log(plan.table.summary())
            elif stage == "search":
                _run_search(plan)
            elif stage == "finetune":
                D.log(f"== finetune: the pruned model (distillation: {plan.finetune_cfg.distillation}) ==")
                finetune.run(plan.finetune_cfg.replace(**_stage_state(plan.finetune_cfg.out)))
            elif stage == "deploy":
                _run_deploy(plan)
            elif stage == "measure":
                _run_measure(plan, ctx)
            elif stage == "report":
                _run_report(plan, ctx, hook, sum(times.values()) + time.perf_counter() - t0)
            if finish(stage, t0):
                break
    except interrupts.Interrupted as exc:  # a stage's own hint names its folder: the whole run continues from the top
        cmd = "spvit demo" if cfg.report_style == "demo" else "spvit compress"
        raise interrupts.Interrupted(f"{exc}; or continue the whole run: {cmd} --out {shlex.quote(out)} --resume",
                                     exc.signum) from None
    except KeyboardInterrupt:  # outside a training loop (profile, deploy, measure, report): redo that stage
        cmd = "spvit demo" if cfg.report_style == "demo" else "spvit compress"
        raise interrupts.Interrupted(f"interrupted in stage {stage}; continue with: {cmd} --out {shlex.quote(out)} "
                                     f"--resume", signal.SIGINT) from None
    finally:
        lock.release()
        torch.set_num_threads(threads_before)
    if "report" not in done:
        D.log(f"stopped after stage {done[-1] if done else 'none'}; continue with: spvit compress --out "
              f"{shlex.quote(out)} --resume")
        return {"stopped": True, "done": done}
    return _read_json(os.path.join(out, "summary.json"))


def _reopen(out: str):
    lock = runs.try_lock(out)
    if lock is None:
        raise RunError(f"run folder {out} is in use by another run; wait for it to end before resuming")
    for entry in os.scandir(out):  # temporary files of a killed run
        if entry.name.endswith(".spvit-tmp") and entry.is_file():
            os.remove(entry.path)
    return lock


def _run_search(plan: Plan) -> None:
    scfg = plan.search_cfg
    if plan.table is not None:
        scfg = scfg.replace(latency_table=os.path.join(plan.out, TABLE_FILE), target_speedup=plan.cfg.target_speedup,
                            target_latency_ms=plan.cfg.target_latency_ms)
    if "loss_lambda" not in plan.cfg.search and paper_family(plan.dense.name) is None and plan.cfg.recipe != "none":
        scfg = scfg.replace(loss_lambda=LAMBDA_REL / plan.dense_gflops ** 2)  # no original lambda for this model
    scfg = scfg.replace(ffn_align=plan.ffn_align, **_stage_state(scfg.out)).validate()
    D.log(f"== search: {plan.dense.name} to " + (f"{plan.target_ms:.4g} ms per batch of {plan.cfg.batch}"
                                                 if plan.table is not None else f"{scfg.target_gflops:g} GFLOPs")
          + (f", FFN widths aligned to {plan.ffn_align}" if plan.ffn_align > 1 else "") + " ==")
    sn = None
    if plan.dense_ckpt is not None:  # the supernet of the dense model of a checkpoint (the teacher stage's)
        sn = supernet(chosen_model(plan.dense_ckpt), theta=scfg.theta, alpha=scfg.alpha, model_name=plan.dense.name)
    res = search.run(scfg, supernet_module=sn)
    D.log(Architecture.load(res["arch"]).summary())


def _run_deploy(plan: Plan) -> None:
    folder = os.path.join(plan.out, "deploy")
    lock = runs.open_run(folder, overwrite=runs.is_run_folder(folder))
    try:
        dev = device_of(plan.cfg.device)
        deployed = deploy_checkpoint(os.path.join(plan.out, "finetune", "best.pth"), dtype=L.DTYPES[plan.cfg.dtype],
                                     device=dev)
        deployed.save(os.path.join(folder, "deployed.pth"))
        runs.write_json(deployed.architecture.to_dict(), os.path.join(folder, "arch.json"))
        D.log(f"== deploy: {os.path.join(folder, 'deployed.pth')} [{' '.join(deployed.architecture.attn_choices)}] ==")
    finally:
        lock.release()


def _run_measure(plan: Plan, ctx: Dict) -> None:
    cfg = plan.cfg
    D.log("== measure: accuracy (validation split) and latency of the dense and the compressed model ==")
    dev = device_of(cfg.device)
    dtype = L.DTYPES[cfg.dtype]
    dense = chosen_model(plan.dense_ckpt) if plan.dense_ckpt else probe_model(plan, check_data(plan, input_size(plan)))
    pruned = chosen_model(os.path.join(plan.out, "finetune", "best.pth"))
    size = pruned.architecture.signature.img_size[0]
    acc = {"dense_val_acc": accuracy(dense, cfg.data, size), "compressed_val_acc": accuracy(pruned, cfg.data, size)}
    if cfg.data == "digits":
        acc.update({"dense_test_acc": accuracy(dense, "digits", size, "test", 256),
                    "compressed_test_acc": accuracy(pruned, "digits", size, "test", 256)})
    deployed = load_deployed(os.path.join(plan.out, "deploy", "deployed.pth"), device=dev)
    dense_dep = L.dense_deployed(plan.dense.name, deployed.signature, dev, dtype,
                                 {**plan.dense.kwargs, "num_classes": deployed.signature.num_classes})
    t = plan.table
    threads_before = torch.get_num_threads()
    if t is not None and dev.type == "cpu" and t.device.get("threads"):
        torch.set_num_threads(int(t.device["threads"]))
    try:
        lat = measure_latency(deployed, dense_dep, t.batch if t is not None else cfg.batch, cfg.measure_rounds,
                              cfg.measure_budget, stat=t.meta.get("stat", "median") if t is not None else "median",
                              clock=t.meta.get("clock", "wall") if t is not None else "wall")
    finally:
        torch.set_num_threads(threads_before)
    if t is not None:
        lat.update({"predicted_ms": t.predict(deployed.architecture)["ms"], "dense_predicted_ms": t.dense_ms()})
        lat["predicted_speedup"] = lat["dense_predicted_ms"] / lat["predicted_ms"]
        lat["prediction_error"] = lat["predicted_ms"] / lat["compressed_ms"] - 1
    res = {**acc, "latency": lat, "dense_gflops": gflops(dense), "compressed_gflops": gflops(pruned),
           "dense_params": count_params(dense), "compressed_params": count_params(pruned),
           "device": {"name": L.device_name(dev), "class": L.device_class(dev), "threads": lat["threads"]}}
    runs.write_json(res, os.path.join(plan.out, MEASURE_FILE))
    D.log(f"measured speedup {lat['speedup']:.3f}x (rounds: {lat['speedup_min']:.3f} .. {lat['speedup_max']:.3f}); "
          f"val acc {acc['dense_val_acc']:.2f} -> {acc['compressed_val_acc']:.2f}")


def _versions() -> Dict[str, str]:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return {"spvit": __version__, "torch": torch.__version__, "triton": tv, "timm": timm.__version__,
            "python": platform.python_version()}


def verdict(cfg: CompressConfig, m: Dict, target_ms: Optional[float]) -> Optional[str]:
    """A plain sentence when the result is further than :data:`MISS_TOLERANCE` from the request, with its likely
    cause; None when within."""
    lat = m["latency"]
    if cfg.target_gflops is not None:
        got = m["compressed_gflops"]
        if abs(got / cfg.target_gflops - 1) <= MISS_TOLERANCE:
            return None
        return (f"The compressed model has {got:.4g} GFLOPs, {100 * (got / cfg.target_gflops - 1):+.0f}% from the "
                f"requested {cfg.target_gflops:.4g}: the search ended away from its target (more search epochs or a "
                f"larger loss_lambda bring it closer).")
    requested = cfg.target_speedup if cfg.target_speedup is not None else lat["dense_ms"] / cfg.target_latency_ms
    got = lat["speedup"]
    off = got / requested - 1
    if abs(off) <= MISS_TOLERANCE:
        return None
    pred = lat.get("predicted_speedup")
    if pred is not None and abs(pred / requested - 1) > MISS_TOLERANCE:
        how = ("the gates moved too little: more search epochs, a larger arc_lr or loss_lambda" if pred < requested
               else "the search overshot: a smaller arc_lr, or more search epochs for the latency loss to pull it back")
        cause = (f"the search ended away from its target (the table predicts {pred:.3g}x for the architecture it read "
                 f"out; {how})")
    else:
        cause = (f"the latency table's prediction ({pred:.3g}x) does not hold on this measurement: the table was "
                 f"measured under other conditions (device load, thread setting, batch, clock) or the deployed "
                 f"widths run at other speeds than the table's grid; re-profile on an idle device")
    if lat["speedup_min"] <= requested <= lat["speedup_max"]:
        cause += f"; the request lies within the measured spread ({lat['speedup_min']:.3g}..{lat['speedup_max']:.3g})"
    return f"The measured speedup {got:.3g}x is {100 * off:+.0f}% from the requested {requested:.3g}x. Likely cause: " \
           f"{cause}."


def _run_report(plan: Plan, ctx: Dict, hook, wall: float) -> Dict:
    cfg, out = plan.cfg, plan.out
    m = _read_json(os.path.join(out, MEASURE_FILE))
    arch = Architecture.load(os.path.join(out, "finetune", "arch.json"))
    lat = m["latency"]
    request = ({"target_speedup": cfg.target_speedup} if cfg.target_speedup is not None else
               {"target_latency_ms": cfg.target_latency_ms} if cfg.target_latency_ms is not None else
               {"target_gflops": cfg.target_gflops})
    if cfg.latency_target:
        request.update({"batch": lat["batch"], "dtype": cfg.dtype, "device": m["device"]["name"]})
    o = shlex.quote(out)
    summary = {
        "request": request,
        "model": plan.dense.name, "data": cfg.data, "recipe": cfg.recipe,
        "achieved": {
            "measured_speedup": lat["speedup"],
            "measured_speedup_spread": {"min": lat["speedup_min"], "q1": lat["speedup_q1"], "q3": lat["speedup_q3"],
                                        "max": lat["speedup_max"], "rounds": lat["rounds"]},
            "dense_ms": lat["dense_ms"], "compressed_ms": lat["compressed_ms"],
            "predicted_ms": lat.get("predicted_ms"), "predicted_speedup": lat.get("predicted_speedup"),
            "prediction_error": lat.get("prediction_error"),
            "dense_gflops": m["dense_gflops"], "compressed_gflops": m["compressed_gflops"],
            "dense_params": m["dense_params"], "compressed_params": m["compressed_params"],
            "dense_val_acc": m["dense_val_acc"], "compressed_val_acc": m["compressed_val_acc"],
        },
        "verdict": verdict(cfg, m, plan.target_ms),
        "blocks": [{"block": i, "attn": b.attn, "ffn_kept": b.ffn_width,
                    "ffn_total": (arch.signature.block_mlp_hidden[i])} for i, b in enumerate(arch.blocks)],
        "ffn_align": plan.ffn_align,
        "hardware": m["device"], "versions": _versions(), "platform": platform.platform(),
        "stage_s": ctx["times"],
        "commands": {"continue": f"spvit compress --out {o} --resume",
                     "reproduce": f"spvit compress --config {o}/{CONFIG_NAME} --out NEW_DIR",
                     **plan.stage_commands()},
    }
    summary["search_epochs"] = search_tradeoff(out)
    if hook is not None:
        summary = hook(summary, {"plan": plan, "measure": m, "wall_s": wall, "arch": arch})
    runs.write_json(summary, os.path.join(out, "summary.json"))
    try:
        plot_compress(out, summary)
        png = True
    except ImportError:
        png = False
        D.log("(matplotlib not installed: plots skipped)")
    runs.write_text(os.path.join(out, "report.md"), report_md(summary, png))
    D.log(f"report: {os.path.join(out, 'report.md')}")
    if summary["verdict"]:
        D.log("note: " + summary["verdict"])
    return summary


def search_tradeoff(out: str) -> List[Dict[str, Any]]:
    """Per search epoch: the read-out's GFLOPs, predicted latency (latency targets) and validation top-1."""
    path = os.path.join(out, "search", "metrics.csv")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            g = r.get("arch_gflops") or r.get("gflops")
            rows.append({"epoch": int(r["epoch"]), "gflops": float(g) if g else None,
                         "predicted_ms": float(r["pred_ms"]) if r.get("pred_ms") else None,
                         "val_acc1": float(r["val_acc1"]) if r.get("val_acc1") else None})
    return rows


def report_md(s: Dict, png: bool) -> str:
    """The run's report (Markdown)."""
    a, r = s["achieved"], s["request"]
    sp = a["measured_speedup_spread"]
    req = ", ".join(f"{k} {v}" for k, v in r.items())
    lines = [f"# spvit compress: {s['model']} on {s['data']}", "",
             f"**Request:** {req} (recipe `{s['recipe']}`, "
             + (f"FFN widths read out as multiples of {s['ffn_align']})." if s["ffn_align"] > 1
                else "FFN widths not aligned)."),
             "",
             "| | dense | compressed |", "|---|---|---|",
             f"| latency (ms per batch, measured) | {a['dense_ms']:.4g} | {a['compressed_ms']:.4g} |"]
    if a.get("predicted_ms") is not None:
        lines.append(f"| latency (ms, predicted by the table) | — | {a['predicted_ms']:.4g} "
                     f"({100 * a['prediction_error']:+.1f}% vs measured) |")
    lines += [f"| GFLOPs (MACs/1e9) | {a['dense_gflops']:.4g} | {a['compressed_gflops']:.4g} |",
              f"| params | {a['dense_params']:,d} | {a['compressed_params']:,d} |",
              f"| top-1 on the validation split (%) | {a['dense_val_acc']:.2f} | {a['compressed_val_acc']:.2f} |", "",
              f"**Measured speedup: {a['measured_speedup']:.3f}x** (median over {sp['rounds']} alternated rounds; "
              f"spread {sp['min']:.3f} .. {sp['max']:.3f}, quartiles {sp['q1']:.3f} .. {sp['q3']:.3f})"
              + (f"; predicted {a['predicted_speedup']:.3f}x." if a.get("predicted_speedup") else "."), ""]
    lines.append(f"**{s['verdict']}**" if s["verdict"] else "The result is within 10% of the request.")
    lines += ["", "## Architecture", "", "| block | attention | FFN units kept |", "|---|---|---|"]
    lines += [f"| {b['block']} | {b['attn']} | {b['ffn_kept']}/{b['ffn_total']} |" for b in s["blocks"]]
    if s.get("search_epochs"):
        lines += ["", "## The search, epoch by epoch (architecture read out at each epoch's end)", "",
                  "| epoch | GFLOPs | predicted ms | validation top-1 (%) |", "|---|---|---|---|"]
        for r in s["search_epochs"]:
            ms = f"{r['predicted_ms']:.4g}" if r["predicted_ms"] is not None else "—"
            acc = f"{r['val_acc1']:.2f}" if r["val_acc1"] is not None else "—"
            gf = f"{r['gflops']:.4g}" if r["gflops"] is not None else "—"
            lines.append(f"| {r['epoch']} | {gf} | {ms} | {acc} |")
    if png:
        lines += ["", "![per-block choices and the search trade-off](report.png)"]
    d = s["hardware"]
    lines += ["", "## Device and versions", "", f"{d['name']} [{d['class']}], {d['threads']} thread(s); "
              + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + f"; {s['platform']}.", "",
              "Stage times (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in s["stage_s"].items()) + ".", "",
              "## Commands", "", "```bash"]
    lines += [f"{v}   # {k}" for k, v in s["commands"].items()]
    lines += ["```", ""]
    return "\n".join(lines)


def config_from_flags(flags: Dict[str, Any], config: Optional[str]) -> CompressConfig:
    """The config of a new run: defaults, then ``config`` (YAML), then the flags."""
    return resolve(CompressConfig, flags, config)


def cli_run(flags: Dict[str, Any], config: Optional[str],
            hooks: Optional[Dict[str, Callable[[Dict, Dict], Dict]]] = None) -> Dict:
    """``spvit compress`` (and ``spvit demo --resume``): a new run, or ``--resume`` of the run in ``--out``.
    ``hooks``: the summary hook of a ``report_style`` (the demo's), for a resumed run."""
    flags = dict(flags)
    resume = bool(flags.pop("resume", False))
    allow = bool(flags.pop("allow_changes", False))
    stop_after = flags.pop("stop_after", None)
    if resume:
        if flags.get("overwrite"):
            raise ConfigError("--overwrite and --resume exclude each other")
        if not flags.get("out"):
            raise ConfigError("--resume needs --out (the run folder to continue)")
        cfg = _load_cfg(flags["out"], flags, config, allow)
        return run(cfg, resume=True, stop_after=stop_after, hook=(hooks or {}).get(cfg.report_style))
    return run(config_from_flags(flags, config), stop_after=stop_after)


__all__ = ["run", "cli_run", "train_dense", "measure_latency", "accuracy", "verdict", "report_md"]
