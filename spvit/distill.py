"""Distillation losses for the fine-tune phase (docs/method.md §5.6): DeiT's hard and soft variants, no
distillation token."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(target * log_softmax(logits))``; ``target`` (batch, classes) or int labels."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class DistillationLoss(nn.Module):
    """Task loss plus (optionally) distillation from a frozen teacher fed the same (mixed) images.

    ``none``: task loss only. ``hard``: (1 - alpha) * task + alpha * CE(student, argmax teacher).
    ``soft``: (1 - alpha) * task + alpha * KL(log_softmax(s / tau) || log_softmax(t / tau)) summed, x tau^2 / numel.

    Args:
        teacher: frozen teacher (eval mode) or None for ``none``.
        kind: ``"none"``, ``"hard"`` or ``"soft"``.
        alpha: weight of the distillation term (0.5 in DeiT).
        tau: temperature of the soft variant (1.0).
    """

    def __init__(self, teacher: Optional[nn.Module], kind: str = "none", alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if kind not in ("none", "hard", "soft"):
            raise ValueError(f"distillation must be none, hard or soft, got {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"{kind} distillation needs a teacher")
        self.teacher, self.kind, self.alpha, self.tau = teacher, kind, alpha, tau
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def distill_term(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The distillation term alone (teacher run without gradients on the same images)."""
        with torch.no_grad():
            t = self.teacher(images).float()
        logits = logits.float()
        if self.kind == "hard":
            return F.cross_entropy(logits, t.argmax(dim=-1))
        T = self.tau
        return F.kl_div(F.log_softmax(logits / T, dim=-1), F.log_softmax(t / T, dim=-1), reduction="sum",
                        log_target=True) * (T * T) / logits.numel()

    def forward(self, images: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                task: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images: (batch, C, H, W) as fed to the student; logits: (batch, classes); target: mixed targets or labels;
        task: a precomputed task loss (else soft-target cross-entropy against ``target``)."""
        if task is None:
            task = soft_target_cross_entropy(logits, target)
        if self.kind == "none":
            return task
        return (1 - self.alpha) * task + self.alpha * self.distill_term(images, logits)
