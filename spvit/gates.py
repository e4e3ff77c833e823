"""Gate sampling and complexity indicators of SPViT (docs/method.md §2.1, §2.3, §2.4).

A gate logit ``theta`` gives, per forward pass:

* training: a hard 0/1 sample of a relaxed Bernoulli with ``P(1) = sigmoid(theta)`` whose gradient is that of the
  relaxed (sigmoid) value (straight-through), see :func:`sample_gate`;
* eval: the deterministic decision ``1[theta > 0]``, see :func:`eval_gate`;
* for the FLOPs loss: the complexity indicator of :func:`complexity_indicator` (value ``1[theta > 0]``, a smooth
  gradient).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .choices import ATTN_CHOICES, AttnChoice

EPS = torch.finfo(torch.float32).eps  # the clamp of §2.1 (float32 machine epsilon)


def sample_gate(theta: torch.Tensor, tau: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Hard relaxed-Bernoulli sample with a straight-through gradient (§2.1).

    Args:
        theta: gate logits, any shape (fp32).
        tau: temperature of the relaxation (1 in SPViT).
        generator: optional RNG for the uniform noise.
    Returns:
        Tensor like ``theta`` with values exactly 0 or 1; gradient d(sigmoid(l))/d(theta) with
        ``l = (logit(u) + log p - log(1 - p)) / tau``.
    """
    p = torch.sigmoid(theta).clamp(EPS, 1 - EPS)
    u = torch.rand(theta.shape, device=theta.device, dtype=theta.dtype, generator=generator).clamp(EPS, 1 - EPS)
    logit = (torch.log(u) - torch.log1p(-u) + torch.log(p) - torch.log1p(-p)) / tau
    soft = torch.sigmoid(logit)
    hard = (logit > 0).to(theta.dtype)
    return hard + (soft - soft.detach())


def eval_gate(theta: torch.Tensor) -> torch.Tensor:
    """Deterministic decision ``1[sigmoid(theta) > 0.5] = 1[theta > 0]`` (no gradient)."""
    return (theta.detach() > 0).to(theta.dtype)


def complexity_indicator(theta: torch.Tensor) -> torch.Tensor:
    """Complexity indicator of §2.4: value ``1[theta > 0]``,
    gradient sigmoid'(sigmoid(theta) - 1/2) * sigmoid'(theta)."""
    s = torch.sigmoid(torch.sigmoid(theta) - 0.5)
    return eval_gate(theta) + s - s.detach()


def cumulative(s: torch.Tensor) -> torch.Tensor:
    """Cumulative MSA gates (e1, e3, em) = cumprod(s1, s3, sm) along the last axis (§2.1)."""
    return torch.cumprod(s, dim=-1)




def choice_of(e: torch.Tensor) -> str:
    """Name of the candidate picked by cumulative gates (e1, e3, em) (values 0/1)."""
    e1, e3, em = (float(v) for v in e.detach().cpu())
    if em > 0.5:
        return AttnChoice.MSA.value
    if e3 > 0.5:
        return AttnChoice.CONV3.value
    if e1 > 0.5:
        return AttnChoice.CONV1.value
    return AttnChoice.SKIP.value


def logits_for_choice(choice: str, magnitude: float = 1.5) -> torch.Tensor:
    """Gate logits (theta1, theta3, theta_m) whose eval decision is ``choice``."""
    pattern = {AttnChoice.MSA: (1, 1, 1), AttnChoice.CONV3: (1, 1, -1), AttnChoice.CONV1: (1, -1, -1),
               AttnChoice.SKIP: (-1, -1, -1)}
    if choice not in pattern:
        raise ValueError(f"unknown attention choice {choice!r}; expected one of {ATTN_CHOICES}")
    return torch.tensor(pattern[choice], dtype=torch.float32) * abs(magnitude)


class HostGates:
    """The gate tensors of several layers, read to the host together: one transfer (one host synchronisation on a
    GPU) for all of them, on the first :meth:`values` call, instead of one per layer.

    Args:
        gates: one tensor per layer (any shapes, values exactly 0/1); kept as given (with their gradients).
    """

    def __init__(self, gates: Sequence[torch.Tensor]):
        self.gates = list(gates)
        self._values: Optional[List[List[float]]] = None

    def values(self, i: int) -> List[float]:
        """Host copy (floats) of ``gates[i]``, flattened."""
        if self._values is None:
            flat = [g.detach().reshape(-1).to(torch.float32) for g in self.gates]
            sizes = [f.numel() for f in flat]
            allv = torch.cat(flat).tolist() if flat else []  # the only host read
            self._values, k = [], 0
            for n in sizes:
                self._values.append(allv[k:k + n])
                k += n
        return self._values[i]
