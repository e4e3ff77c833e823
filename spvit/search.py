"""The SPViT search phase (docs/method.md §4): a supernet trained with two optimisers and the FLOPs loss; the
architecture is read out and saved every epoch.

``run(cfg)`` takes a resolved :class:`~spvit.config.SearchConfig` and writes into ``cfg.out``: ``config.yaml``,
``metrics.csv``, ``gates.jsonl`` (per epoch, per block gate statistics), ``arch_epoch{e:03d}.json`` and
``arch.json`` (the latest), ``checkpoint.pth`` (resumable) and ``best.pth``.
With ``latency_table`` (``spvit profile``) the complexity term is the predicted latency on the profiled device instead
of the FLOPs (:mod:`spvit.latency`); ``ffn_align`` reads out FFN widths that are multiples of N (docs/method.md §11.4).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from . import distributed as D
from . import engine as E
from . import hub
from . import latency as L
from . import optim, runs
from .checkpoints import model_meta
from .choices import ATTN_CHOICES
from .config import SearchConfig
from .models import Supernet, supernet
from .runs import RunError

DEFAULTS = SearchConfig()


def build_supernet(cfg: SearchConfig, num_classes: int, model_kwargs: Dict, dist: Optional[D.DistInfo] = None,
                   pretrained: Optional[str] = None) -> Supernet:
    """The supernet of ``cfg.model`` (weights from ``pretrained``, default ``cfg.pretrained``)."""
    base = hub.build_timm_model(cfg.model, num_classes, cfg.pretrained if pretrained is None else pretrained,
                                cfg.drop_path, model_kwargs, dist)
    try:
        return supernet(base, theta=cfg.theta, alpha=cfg.alpha, model_name=cfg.model)
    except ValueError as exc:
        raise RunError(str(exc)) from None


OFF_TARGET = 0.15  # a final architecture further than this (relative) from its target gets a warning


def warn_off_target(meta: Dict, target_ms: Optional[float], target_gflops: float) -> Optional[str]:
    """Print (and return) a warning when the searched architecture ends more than :data:`OFF_TARGET` from its
    target (predicted latency with a latency table, else FLOPs)."""
    if target_ms is not None and meta.get("predicted_ms") is not None:
        got, goal, unit = float(meta["predicted_ms"]), float(target_ms), "ms (predicted)"
    elif meta.get("gflops") is not None:
        got, goal, unit = float(meta["gflops"]), float(target_gflops), "GFLOPs"
    else:
        return None
    off = got / goal - 1
    if abs(off) <= OFF_TARGET:
        return None
    msg = (f"warning: the architecture has {got:.4g} {unit}, {100 * off:+.0f}% from the target {goal:.4g}; train "
           f"longer (--epochs), raise --loss-lambda or --arc-lr, or check that the target is reachable")
    print(msg, flush=True)
    return msg


def run(cfg: Union[SearchConfig, Dict], supernet_module: Optional[nn.Module] = None) -> Dict:
    """Run (or resume) a search. ``supernet_module``: an already built supernet (the demo); else built from ``cfg``.

    Everything is validated (data, model, FLOPs target, run folder) before the first file is written.
    Returns {"arch": path of arch.json, "gflops", "val_acc1", "dense_gflops", "stopped", "out", "supernet", "dist"}.
    """
    if isinstance(cfg, dict):
        cfg = SearchConfig.from_dict(cfg)
    cfg = cfg.validate()
    runs.check_out(cfg.out, cfg.overwrite, cfg.resume)
    size = hub.model_input_size(cfg, supernet_module.signature.img_size[0] if supernet_module is not None else None)
    kwargs = hub.model_kwargs_for(cfg, size)
    hub.check_model_name(cfg.model)  # before the data: an unknown name is not a batch-size problem
    st = E.setup(cfg, size)
    dist = st.dist
    if supernet_module is not None:
        sn = supernet_module
    else:  # a resumed run takes every weight from its checkpoint: no download
        sn = build_supernet(cfg, st.num_classes, kwargs, dist, pretrained="none" if cfg.resume else None)
    E.check_channels(st, sn.signature.in_chans)
    widest = max(sn.signature.block_mlp_hidden)
    if cfg.ffn_align > widest:
        raise RunError(f"--ffn-align {cfg.ffn_align} is wider than the widest FFN of {cfg.model} ({widest} units); "
                       f"use a divisor of the FFN width such as 64, or 0 (off)")
    lat = None
    if cfg.latency_table:  # hardware-aware: a latency target replaces the FLOPs target (docs/method.md §11.4)
        try:
            table = L.load_table(cfg.latency_table, dist)
            lat = L.LatencyObjective(table, sn, L.resolve_target(table, cfg.target_speedup, cfg.target_latency_ms))
        except (ValueError, OSError) as exc:
            raise RunError(f"--latency-table: {exc}") from None
    else:
        try:
            sn.check_target(cfg.target_gflops)  # the one check of the target's bounds
        except ValueError as exc:
            raise RunError(f"--target-gflops: {exc}") from None
    lr = optim.effective_lr(cfg, dist)
    f = optim.other_lr_scale(cfg, dist)
    min_lr = optim.lr_floor(lr, cfg.min_lr * f, "--min-lr", dist)
    arc_lr = cfg.arc_lr * f
    with E.run_folder(cfg, dist) as out:
        E.save_run_config(cfg, out, dist)
        sn.to(dist.device)
        betas = tuple(cfg.opt_betas)
        opt_w = torch.optim.AdamW(optim.decay_groups(sn, cfg.weight_decay), lr=lr, betas=betas, eps=cfg.opt_eps)
        opt_a = torch.optim.AdamW(sn.arch_parameters(), lr=arc_lr, betas=betas, eps=cfg.opt_eps,
                                  weight_decay=0.0)
        # The original create_scheduler ignores its min_lr argument: args.min_lr for both (docs/method.md Q10).
        arc_min = (cfg.arc_min_lr if cfg.arc_min_lr is not None else cfg.min_lr) * f
        per_step = cfg.sched_per_step
        schedules = [optim.Schedule(opt_w, lr, min_lr, cfg.schedule_length, cfg.warmup_epochs, cfg.warmup_lr * f,
                                    per_step=per_step),
                     optim.Schedule(opt_a, arc_lr, arc_min, cfg.arc_sched_epochs or cfg.schedule_length, 0,
                                    per_step=per_step)]
        dtype = optim.amp_dtype(cfg.amp, dist.device)
        scaler = torch.amp.GradScaler(dist.device.type) if dtype == torch.float16 else None
        model = D.wrap_ddp(sn, dist, find_unused=True, broadcast_buffers=sn.signature.family != "swin")
        task = optim.task_loss_fn(cfg.smoothing, st.mixup is not None)
        target, lam = cfg.target_gflops, cfg.loss_lambda

        def loss_fn(images, logits, y):
            t = task(logits, y)
            if lat is not None:
                ll = lat.loss(lam)
                return t + ll, {"task": t.item(), "latency_loss": ll.item()}
            fl = sn.flops_loss(target, lam)
            return t + fl, {"task": t.item(), "flops_loss": fl.item()}

        def read_out():
            if lat is None and not cfg.ffn_align:
                return sn.architecture()
            return L.align_architecture(sn, cfg.ffn_align, lat.table if lat is not None else None)

        def after_epoch(epoch: int, m: Dict) -> Dict:
            rows = sn.gate_summary()
            choices = [r["attn"] for r in rows]
            extra = {}
            if lat is not None or cfg.ffn_align:
                arch = read_out()
                extra = {"arch_gflops": arch.meta["gflops"]}
                if lat is not None:
                    extra.update({"pred_ms": arch.meta["predicted_ms"], "pred_speedup": arch.meta["predicted_speedup"]})
            return {"gflops": sn.gflops(), **extra,
                    **{f"n_{c}": choices.count(c) for c in ATTN_CHOICES},
                    "ffn_kept_frac": sum(r["ffn_kept"] for r in rows) / max(sum(r["ffn_total"] for r in rows), 1)}

        def write_epoch(epoch: int, m: Dict) -> None:
            arch = read_out()
            arch.meta.update({"epoch": epoch, "val_acc1": m["val_acc1"], "model_kwargs": kwargs})
            if lat is not None:
                arch.meta.update({"target_ms": lat.target_ms, "target_speedup": lat.dense_ms / lat.target_ms})
            else:
                arch.meta["target_gflops"] = target
            rows = sn.gate_summary()
            runs.write_json(arch.to_dict(), os.path.join(out, f"arch_epoch{epoch:03d}.json"))
            runs.write_json(arch.to_dict(), os.path.join(out, "arch.json"))
            runs.log_epoch_json(os.path.join(out, "gates.jsonl"), {"epoch": epoch, "gflops": m["gflops"],
                                                                    "blocks": rows})

        def gates_line(epoch: int, m: Dict) -> str:
            return "  gates (per block, attention/FFN units kept; attention msa, 3x3 or 1x1 convolution, skip): " + \
                " ".join(f"{r['attn']}/{r['ffn_kept']}" for r in sn.gate_summary())

        def postfix_ms() -> Dict:
            return {"ms": f"{float(lat.predicted_ms().detach()):.4g}"} if lat is not None else {}

        goal = lat.describe() if lat is not None else f"target {target:g}"
        D.log(f"search {cfg.model}: dense {sn.dense_gflops():.4g} GFLOPs, {goal}, lambda {lam:g}, "
              f"lr {lr:.3g}, arc_lr {arc_lr:.3g}, {dist.world} process(es) on {dist.device}", dist)
        res = E.fit(model=model, schedules=schedules, epochs=cfg.epochs, loss_fn=loss_fn,
                    train_loader=st.train_loader, train_sampler=st.sampler, val_loader=st.val_loader, dist=dist,
                    out=out, mixup=st.mixup, dtype=dtype, scaler=scaler, clip_grad=cfg.clip_grad, resume=cfg.resume,
                    stop_after_epoch=cfg.stop_after_epoch, after_epoch=after_epoch, write_epoch=write_epoch,
                    postfix=lambda: {"GFLOPs": f"{sn.gflops():.4g}", **postfix_ms()},
                    best_meta=model_meta(cfg.model, kwargs, st.num_classes),
                    show=cfg.progress, desc="search", tensorboard=cfg.tensorboard,
                    resume_hint=f"spvit search --out {out} --resume", epoch_notes=gates_line, cfg=cfg)
    final = read_out()
    if dist.main and not res["stopped"]:
        warn_off_target(final.meta, lat.target_ms if lat is not None else None, target)
    return {"arch": os.path.join(out, "arch.json"), "gflops": final.meta["gflops"], "dense_gflops": sn.dense_gflops(),
            "predicted_ms": final.meta.get("predicted_ms"), "target_ms": lat.target_ms if lat is not None else None,
            "val_acc1": res["last"].get("val_acc1"), "stopped": res["stopped"], "out": out, "supernet": sn,
            "dist": dist}
