"""The SPViT search phase (spec §4): a supernet trained with two optimisers and the FLOPs loss; the architecture
is read out and saved every epoch.

``run(cfg)`` takes the resolved config (see :data:`DEFAULTS`; the CLI fills it from YAML and flags) and writes into
``cfg["out"]``: ``config.yaml``, ``metrics.csv``, ``gates.jsonl`` (per epoch, per block gate statistics),
``arch_epoch{e:03d}.json`` and ``arch.json`` (the latest), ``checkpoint.pth`` (resumable) and ``best.pth``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.utils.data import Subset

from . import engine as E
from .data import DataConfig, build_datasets, build_loaders, build_mixup
from .distill import soft_target_cross_entropy

# Defaults shared by search and fine-tune: the DeiT recipe (spec §4.5, §8.1).
COMMON_DEFAULTS: Dict = {
    "model": "deit_small_patch16_224",
    "model_kwargs": {},
    "pretrained": "timm",
    "data": None,
    "num_classes": None,
    "out": None,
    "overwrite": False,
    "resume": False,
    "stop_after_epoch": None,
    "device": "auto",
    "amp": "auto",
    "seed": 0,
    "batch_size": 128,
    "eval_batch_size": None,
    "epochs": 21,
    "sched_epochs": None,
    "lr": 5e-5,
    "scale_lr": True,
    "min_lr": 1e-5,
    "warmup_epochs": 0,
    "warmup_lr": 1e-6,
    "weight_decay": 0.05,
    "opt_eps": 1e-8,
    "opt_betas": [0.9, 0.999],
    "clip_grad": None,
    "model_ema": False,
    "model_ema_decay": 0.99996,
    "drop_path": 0.1,
    "num_workers": min(8, os.cpu_count() or 1),
    "pin_mem": True,
    "tensorboard": True,
    "progress": True,
    # data recipe
    "input_size": 224,
    "color_jitter": 0.4,
    "aa": "rand-m9-mstd0.5-inc1",
    "train_interpolation": "bicubic",
    "reprob": 0.25,
    "remode": "pixel",
    "recount": 1,
    "crop_pct": 0.875,
    "mixup": 0.8,
    "cutmix": 1.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
    "mixup_mode": "batch",
    "smoothing": 0.1,
    "repeated_aug": True,
    "digits_size": 16,
    "digits_augment": True,
    "digits_shift": 2,  # random shift (pixels of the upsampled image) of the digits training images
    "train_limit": None,  # use only the first N training / validation images (quick runs, tests)
    "val_limit": None,
}

DEFAULTS: Dict = {
    **COMMON_DEFAULTS,
    "min_lr": 1e-4,
    "sched_epochs": 300,
    "target_gflops": 3.2,
    "loss_lambda": 3.0,
    "arc_lr": 5e-4,
    "arc_min_lr": None,
    "theta": 1.5,
    "alpha": 1e-2,
}


def data_config(cfg: Dict) -> DataConfig:
    keys = DataConfig.__dataclass_fields__.keys()
    return DataConfig(**{k: cfg[k] for k in keys if k in cfg})


def setup(cfg: Dict, need_train: bool = True):
    """Process group, run folder, seeds and data: (dist, train_set, val_set, loaders, mixup)."""
    dist = E.init_distributed(cfg["device"])
    if cfg.get("data") is None:
        raise E.RunError("--data is required (an ImageNet-layout folder, or 'digits' for the embedded demo set)")
    dcfg = data_config(cfg)
    train_set, val_set = build_datasets(cfg["data"], dcfg, demo_size=cfg.get("digits_size", 16), need_train=need_train)
    if cfg["data"] == "digits" and train_set is not None:
        train_set.augment = bool(cfg.get("digits_augment", True))
        train_set.max_shift = int(cfg.get("digits_shift", 2))
    if cfg.get("num_classes") is None:
        cfg["num_classes"] = val_set.num_classes
    if cfg.get("train_limit") and train_set is not None:
        train_set = Subset(train_set, range(min(cfg["train_limit"], len(train_set))))
    if cfg.get("val_limit"):
        val_set = Subset(val_set, range(min(cfg["val_limit"], len(val_set))))
    if cfg.get("out") is None:
        raise E.RunError("--out is required (the run folder)")
    E.prepare_run_dir(cfg["out"], overwrite=cfg["overwrite"], resume=cfg["resume"], dist=dist)
    E.seed_everything(cfg["seed"] + dist.rank)
    bs = cfg["batch_size"]
    if train_set is not None and len(train_set) < bs * dist.world:
        raise E.RunError(f"the training set has {len(train_set)} images, fewer than one global batch "
                         f"({bs} x {dist.world}); lower --batch-size")
    train_loader, sampler, val_loader = build_loaders(
        train_set, val_set, bs, dist.world, dist.rank, repeated_aug=cfg["repeated_aug"] and train_set is not None,
        num_workers=cfg["num_workers"], pin_memory=cfg["pin_mem"] and dist.device.type == "cuda", seed=cfg["seed"],
        eval_batch_size=cfg.get("eval_batch_size"))
    mixup = build_mixup(dcfg, cfg["num_classes"]) if train_set is not None else None
    return dist, train_set, val_set, train_loader, sampler, val_loader, mixup


def effective_lr(cfg: Dict, dist: E.DistInfo) -> float:
    """DeiT's linear scaling: lr x global batch / 512 (when ``scale_lr``)."""
    return cfg["lr"] * cfg["batch_size"] * dist.world / 512.0 if cfg["scale_lr"] else cfg["lr"]


def task_loss_fn(smoothing: float, mixup_on: bool):
    """Soft-target CE against Mixup targets; label-smoothed CE without Mixup."""
    ce = nn.CrossEntropyLoss(label_smoothing=smoothing)

    def fn(logits, target):
        if mixup_on or target.dim() == 2:
            return soft_target_cross_entropy(logits.float(), target)
        return ce(logits.float(), target)

    return fn


def build_supernet(cfg: Dict, dist: E.DistInfo):
    import spvit

    base = E.build_timm_model(cfg["model"], cfg["num_classes"], cfg["pretrained"], cfg["drop_path"],
                              cfg.get("model_kwargs"), dist)
    try:
        sn = spvit.supernet(base, theta=cfg["theta"], alpha=cfg["alpha"], model_name=cfg["model"])
    except ValueError as exc:
        raise E.RunError(str(exc)) from exc
    return sn


def check_target(sn, target: float) -> None:
    lo, hi = sn.min_gflops(), sn.dense_gflops()
    if not (lo < target <= hi):
        raise E.RunError(f"--target-gflops {target:g} is out of reach for {sn.model_name}: it must lie above "
                         f"{lo:.4g} GFLOPs (everything pruned) and at most {hi:.4g} GFLOPs (the dense model)")


def run(cfg: Dict, supernet: Optional[nn.Module] = None) -> Dict:
    """Run (or resume) a search. ``supernet``: an already built one (the demo); else built from ``cfg``.

    Returns {"arch": path of arch.json, "gflops", "val_acc1", "dense_gflops", "stopped", "out"}.
    """
    dist, train_set, _, train_loader, sampler, val_loader, mixup = setup(cfg)
    sn = supernet if supernet is not None else build_supernet(cfg, dist)
    check_target(sn, cfg["target_gflops"])
    sn.to(dist.device)
    if dist.main and not cfg["resume"]:
        E.save_config(cfg, cfg["out"])
    lr = effective_lr(cfg, dist)
    betas = tuple(cfg["opt_betas"])
    opt_w = torch.optim.AdamW(E.decay_groups(sn, cfg["weight_decay"]), lr=lr, betas=betas, eps=cfg["opt_eps"])
    opt_a = torch.optim.AdamW(E.arch_parameters(sn), lr=cfg["arc_lr"], betas=betas, eps=cfg["opt_eps"],
                              weight_decay=0.0)
    t_init = cfg["sched_epochs"] or cfg["epochs"]
    # The official create_scheduler ignores its min_lr argument and uses args.min_lr for both (spec §9 Q10).
    arc_min = cfg["arc_min_lr"] if cfg["arc_min_lr"] is not None else cfg["min_lr"]
    schedules = [E.Schedule(opt_w, lr, cfg["min_lr"], t_init, cfg["warmup_epochs"], cfg["warmup_lr"]),
                 E.Schedule(opt_a, cfg["arc_lr"], arc_min, t_init, 0)]
    dtype = E.amp_dtype(cfg["amp"], dist.device)
    scaler = torch.amp.GradScaler(dist.device.type) if dtype == torch.float16 else None
    model = E.wrap_ddp(sn, dist, find_unused=True)
    task = task_loss_fn(cfg["smoothing"], mixup is not None)
    target, lam = cfg["target_gflops"], cfg["loss_lambda"]
    out = cfg["out"]

    def loss_fn(images, logits, y):
        t = task(logits, y)
        fl = sn.flops_loss(target, lam)
        return t + fl, {"task": t.item(), "flops_loss": fl.item()}

    def after_epoch(epoch: int, m: Dict) -> Dict:
        arch = sn.architecture()
        arch.meta.update({"epoch": epoch, "val_acc1": m["val_acc1"], "target_gflops": target})
        rows = sn.gate_summary()
        choices = [r["attn"] for r in rows]
        extra = {"gflops": sn.gflops(), **{f"n_{c}": choices.count(c) for c in ("msa", "3x3", "1x1", "skip")},
                 "ffn_kept_frac": sum(r["ffn_kept"] for r in rows) / max(sum(r["ffn_total"] for r in rows), 1)}
        if dist.main:
            arch.save(os.path.join(out, f"arch_epoch{epoch:03d}.json"))
            arch.save(os.path.join(out, "arch.json"))
            with open(os.path.join(out, "gates.jsonl"), "a") as f:
                f.write(json.dumps({"epoch": epoch, "gflops": extra["gflops"], "blocks": rows}) + "\n")
            E.log("  gates: " + " ".join(f"{r['attn']}/{r['ffn_kept']}" for r in rows), dist)
        return extra

    E.log(f"search {cfg['model']}: dense {sn.dense_gflops():.4g} GFLOPs, target {target:g}, lambda {lam:g}, "
          f"lr {lr:.3g}, arc_lr {cfg['arc_lr']:.3g}, {dist.world} process(es) on {dist.device}", dist)
    res = E.fit(model=model, schedules=schedules, epochs=cfg["epochs"], loss_fn=loss_fn, train_loader=train_loader,
                train_sampler=sampler, val_loader=val_loader, dist=dist, out=out, mixup=mixup, dtype=dtype,
                scaler=scaler, clip_grad=cfg["clip_grad"], resume=cfg["resume"],
                stop_after_epoch=cfg["stop_after_epoch"], after_epoch=after_epoch,
                postfix=lambda: {"GFLOPs": f"{sn.gflops():.4g}"}, best_meta={"model_name": cfg["model"]},
                show=cfg["progress"], desc="search")
    return {"arch": os.path.join(out, "arch.json"), "gflops": sn.gflops(), "dense_gflops": sn.dense_gflops(),
            "val_acc1": res["last"].get("val_acc1"), "stopped": res["stopped"], "out": out, "supernet": sn,
            "dist": dist}
