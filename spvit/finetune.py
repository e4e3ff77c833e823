"""The SPViT fine-tune phase (spec §5): the pruned model of an architecture, trained with optional hard/soft
distillation from any timm model (or a local checkpoint) as teacher.

Initialisation (``init``): ``pretrained`` (official: the dense pre-trained weights, §5.1) or the path of a search
checkpoint (carry the searched weights: learned head mixing, BNs). The run folder gets ``config.yaml``,
``arch.json``, ``metrics.csv``, ``checkpoint.pth`` (resumable) and ``best.pth`` (weights + architecture: what
``spvit eval`` and ``spvit deploy`` read).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from . import engine as E
from .distill import DistillationLoss
from .search import COMMON_DEFAULTS, effective_lr, setup, task_loss_fn

DEFAULTS: Dict = {
    **COMMON_DEFAULTS,
    "model": None,  # from the architecture file when not given
    "arch": None,
    "init": "pretrained",
    "epochs": 130,
    "sched_epochs": None,
    "min_lr": 1e-5,
    "teacher": None,
    "teacher_weights": "timm",
    "teacher_kwargs": {},
    "distillation": "none",
    "distillation_alpha": 0.5,
    "distillation_tau": 1.0,
}


def load_arch(path: Optional[str], model_name: Optional[str] = None, num_classes: Optional[int] = None):
    """An :class:`Architecture` from an ``arch.json``, or from an original SPViT checkpoint (``.pth``: a search
    checkpoint's gates or a fine-tuned model's layers, via :func:`spvit.load_official`; needs ``model_name``)."""
    from .arch import Architecture

    if not path:
        raise E.RunError("--arch is required (the arch.json written by `spvit search`)")
    if path.endswith((".pth", ".pt", ".bin")):
        import spvit

        if not os.path.isfile(path):
            raise E.RunError(f"architecture file not found: {path}")
        if not model_name:
            raise E.RunError("--arch with an original SPViT checkpoint needs --model (e.g. deit_small_patch16_224)")
        try:
            m = spvit.load_official(path, model_name, **({"num_classes": num_classes} if num_classes else {}))
        except ValueError as exc:
            raise E.RunError(str(exc)) from exc
        return m.architecture() if callable(m.architecture) else m.architecture
    try:
        return Architecture.load(path)
    except (FileNotFoundError, ValueError) as exc:
        raise E.RunError(str(exc)) from exc


def build_pruned(arch, model_name: str, num_classes: int, pretrained: Optional[str], drop_path: float = 0.0,
                 model_kwargs: Optional[Dict] = None, init: str = "pretrained", dist: Optional[E.DistInfo] = None,
                 source: Optional[nn.Module] = None) -> nn.Module:
    """The pruned model of ``arch`` from a timm model (or ``source``: a dense model or a supernet to carry)."""
    import spvit

    if source is None:
        source = E.build_timm_model(model_name, num_classes, pretrained if init == "pretrained" else None, drop_path,
                                    model_kwargs, dist)
        if init not in ("pretrained", "none", None):
            sn = spvit.supernet(source, model_name=model_name)
            sn.load_state_dict(E.load_weights(init))
            source = sn
    try:
        return spvit.prune(source, arch)
    except ValueError as exc:
        raise E.RunError(f"architecture {getattr(arch, 'model_name', '?')} does not fit model {model_name}: {exc}") \
            from exc


def build_teacher(cfg: Dict, dist: E.DistInfo) -> nn.Module:
    """A teacher: a timm name (weights "timm" = hub, or a local file) or the path of a saved whole model."""
    name = cfg["teacher"]
    if name is None:
        raise E.RunError(f"--distillation {cfg['distillation']} needs --teacher (a timm model name or a file)")
    if os.path.isfile(name):
        obj = torch.load(name, map_location="cpu", weights_only=False)
        if isinstance(obj, nn.Module):
            return obj
        raise E.RunError(f"teacher file {name} holds no model; give a timm name and --teacher-weights {name}")
    return E.build_timm_model(name, cfg["num_classes"], cfg["teacher_weights"], 0.0, cfg.get("teacher_kwargs"), dist)


def run(cfg: Dict, source: Optional[nn.Module] = None, teacher: Optional[nn.Module] = None) -> Dict:
    """Run (or resume) a fine-tune. ``source`` / ``teacher``: already built modules (the demo passes its own)."""
    arch = cfg["arch"] if hasattr(cfg["arch"], "blocks") else load_arch(cfg["arch"], cfg.get("model"),
                                                                           cfg.get("num_classes"))
    if cfg.get("model") is None:
        cfg["model"] = arch.model_name
    dist, _, _, train_loader, sampler, val_loader, mixup = setup(cfg)
    model = build_pruned(arch, cfg["model"], cfg["num_classes"], cfg["pretrained"], cfg["drop_path"],
                         cfg.get("model_kwargs"), cfg.get("init", "pretrained"), dist, source)
    model.to(dist.device)
    if dist.main:
        arch.save(os.path.join(cfg["out"], "arch.json"))
        if not cfg["resume"]:
            E.save_config({**cfg, "arch": cfg["arch"] if isinstance(cfg["arch"], str) else "arch.json"}, cfg["out"])
    if cfg["distillation"] != "none" and teacher is None:
        teacher = build_teacher(cfg, dist)
    if teacher is not None and cfg["distillation"] != "none":
        teacher = teacher.to(dist.device).eval()
    else:
        teacher = None
    task = task_loss_fn(cfg["smoothing"], mixup is not None)
    distill = DistillationLoss(teacher, cfg["distillation"], cfg["distillation_alpha"], cfg["distillation_tau"])
    dtype = E.amp_dtype(cfg["amp"], dist.device)

    def loss_fn(images, logits, y):
        t = task(logits, y)
        if teacher is None:
            return t, {}
        with E.autocast(dist.device, dtype):
            d = distill.distill_term(images, logits)
        return (1 - distill.alpha) * t + distill.alpha * d, {"task": t.item(), "distill": d.item()}

    lr = effective_lr(cfg, dist)
    opt = torch.optim.AdamW(E.decay_groups(model, cfg["weight_decay"]), lr=lr, betas=tuple(cfg["opt_betas"]),
                            eps=cfg["opt_eps"])
    t_init = cfg["sched_epochs"] or cfg["epochs"]
    schedules = [E.Schedule(opt, lr, cfg["min_lr"], t_init, cfg["warmup_epochs"], cfg["warmup_lr"])]
    scaler = torch.amp.GradScaler(dist.device.type) if dtype == torch.float16 else None
    ema = E.ModelEma(model, cfg["model_ema_decay"]) if cfg["model_ema"] else None
    ddp = E.wrap_ddp(model, dist, find_unused="skip" in arch.attn_choices)  # a skip block leaves norm1 unused
    import spvit

    gf = spvit.gflops(model)
    E.log(f"fine-tune {cfg['model']}: {gf:.4g} GFLOPs, {spvit.count_params(model) / 1e6:.3f} M params, lr {lr:.3g}, "
          f"distillation {cfg['distillation']}, {dist.world} process(es) on {dist.device}", dist)
    meta = {"model_name": cfg["model"], "model_kwargs": cfg.get("model_kwargs") or {},
            "num_classes": cfg["num_classes"], "arch": arch.to_dict()}
    res = E.fit(model=ddp, schedules=schedules, epochs=cfg["epochs"], loss_fn=loss_fn, train_loader=train_loader,
                train_sampler=sampler, val_loader=val_loader, dist=dist, out=cfg["out"], mixup=mixup, dtype=dtype,
                scaler=scaler, clip_grad=cfg["clip_grad"], ema=ema, resume=cfg["resume"],
                stop_after_epoch=cfg["stop_after_epoch"], after_epoch=lambda e, m: {"gflops": gf},
                postfix=lambda: {"GFLOPs": f"{gf:.4g}"},
                best_meta=meta, show=cfg["progress"], desc="finetune")
    return {"model": model, "gflops": gf, "val_acc1": res["last"].get("val_acc1"), "best_acc1": res["best_acc1"],
            "stopped": res["stopped"], "out": cfg["out"], "dist": dist}
