"""What the training loop optimises and how: DeiT's weight-decay groups, timm's cosine schedules (per epoch or per
iteration), the learning-rate scaling rules, the model EMA, mixed precision and the task loss."""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .config import TrainConfig
from .distill import soft_target_cross_entropy
from .distributed import DistInfo, log


NO_DECAY_NAMES = ("pos_embed", "cls_token", "relative_position_bias_table", "absolute_pos_embed")


def decay_groups(model: nn.Module, weight_decay: float, skip_names=NO_DECAY_NAMES) -> List[Dict]:
    """DeiT's two groups over the non-architecture parameters: >= 2-D (not pos_embed / cls_token) get weight decay,
    1-D parameters and biases do not. ``head_probs`` (2-D) is a weight with decay (docs/method.md §4.3, Q22). Swin's
    relative position bias tables (and absolute position embedding) are not decayed either (§7.6); ViT/DeiT models
    have no parameters of those names."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or "thresholds" in name:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in skip_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_lr(t: int, base: float, floor: float, t_initial: int, warmup_t: int = 0, warmup_lr: float = 1e-6) -> float:
    """timm's per-epoch CosineLRScheduler value at epoch ``t`` (no restarts, warm-up not as prefix)."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    if t >= t_initial:
        return floor
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / t_initial))


def epoch_lr(epoch: int, base: float, floor: float, t_initial: int, warmup_t: int = 0,
             warmup_lr: float = 1e-6) -> float:
    """The lr epoch ``epoch`` runs at in DeiT's loop: the scheduler is stepped with the finished epoch index, so epoch
    e uses the schedule value at max(e - 1, 0) (docs/method.md §4.4)."""
    t = max(epoch - 1, 0)
    return cosine_lr(t, base, floor, t_initial, warmup_t, warmup_lr)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (kept on the model's device)."""

    def __init__(self, model: nn.Module, decay: float = 0.99996):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(m.detach(), alpha=1 - self.decay)
            else:
                e.copy_(m)


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on CUDA, fp32 on CPU; ``bf16``, ``fp16`` or ``none`` explicitly."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None, "fp32": None}[amp]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def effective_lr(cfg: TrainConfig, dist: DistInfo) -> float:
    """DeiT's linear scaling: lr x global batch / 512 (when ``scale_lr``)."""
    return cfg.lr * cfg.batch_size * dist.world / 512.0 if cfg.scale_lr else cfg.lr


def other_lr_scale(cfg: TrainConfig, dist: DistInfo) -> float:
    """Factor of the other learning rates (floors, warm-up, architecture lr): global batch / 512 with
    ``scale_all_lrs`` (Swin's recipe, docs/method.md §7.6), else 1 (DeiT's)."""
    if getattr(cfg, "scale_all_lrs", False) and cfg.scale_lr:
        return cfg.batch_size * dist.world / 512.0
    return 1.0


def lr_floor(lr: float, min_lr: float, name: str, dist: Optional[DistInfo] = None) -> float:
    """The schedule's floor: ``min_lr``, but never above the (scaled) lr, so the lr never rises during a run."""
    if min_lr > lr:
        log(f"note: {name} {min_lr:g} is above the scaled lr {lr:.4g}; the lr stays at {lr:.4g}", dist)
        return lr
    return min_lr


def task_loss_fn(smoothing: float, mixup_on: bool) -> Callable:
    """Soft-target CE against Mixup targets; label-smoothed CE without Mixup."""
    ce = nn.CrossEntropyLoss(label_smoothing=smoothing)

    def fn(logits, target):
        if mixup_on or target.dim() == 2:
            return soft_target_cross_entropy(logits.float(), target)
        return ce(logits.float(), target)

    return fn


@dataclass
class Schedule:
    """One optimiser with its cosine schedule (timm semantics): per epoch (DeiT, docs/method.md §4.4) or, with
    ``per_step``, per iteration (Swin, §7.6)."""

    opt: torch.optim.Optimizer
    base_lr: float
    min_lr: float
    t_initial: int
    warmup_t: int = 0
    warmup_lr: float = 1e-6
    per_step: bool = False

    def lr(self, epoch: int) -> float:
        """The lr at the start of ``epoch``."""
        return self.lr_at(epoch, 0, 1)

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """The lr of iteration ``step`` (0-based) of ``epoch``. Per epoch: the value of §4.4 for the whole epoch.
        Per iteration: the schedule runs in iterations (t_initial and warm-up times ``steps_per_epoch``) and, as the
        original Swin loop updates it after each step, iteration i uses the value at max(i - 1, 0)."""
        if not self.per_step:
            return epoch_lr(epoch, self.base_lr, self.min_lr, self.t_initial, self.warmup_t, self.warmup_lr)
        n = max(int(steps_per_epoch), 1)
        i = epoch * n + step
        return cosine_lr(max(i - 1, 0), self.base_lr, self.min_lr, self.t_initial * n, self.warmup_t * n,
                         self.warmup_lr)
