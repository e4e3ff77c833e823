"""Dispatching entry points of the SPViT ops: ``ops.<op>(...)`` runs the implementation that
:mod:`spvit_kernels.backend` picks for the device of its first tensor.

Each function has exactly the signature and the docstring of the function of the same name in
:mod:`spvit_kernels.reference` (what ``help()`` and editors show); the op's kernels live in the module of the same name
(``spvit_kernels.<op>``), its test in ``tests/test_<op>.py`` and its benchmark cases in ``bench/cases.py`` (run by
``bench/test_kernels.py``). Each entry point first checks its arguments (:mod:`spvit_kernels.checks`: devices, dtypes,
shapes, ranges; one ``TypeError`` / ``ValueError`` naming the argument) whatever backend runs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from . import checks, reference
from .backend import resolve
from .reference import CENTER_TAP, BNState

_DISPATCH_NOTE = """

    Dispatched: the arguments are checked (:mod:`spvit_kernels.checks`), then the implementation that
    :func:`spvit_kernels.backend.resolve` picks for the device of the first tensor runs (a Triton kernel, the C++/CUDA
    extension, or :func:`spvit_kernels.reference.{name}`); all have this signature and these semantics.
"""


def _documented_by(ref: Callable) -> Callable[[Callable], Callable]:
    """Give the entry point the docstring of its reference function, plus how it is dispatched."""

    def deco(fn: Callable) -> Callable:
        fn.__doc__ = ref.__doc__.rstrip() + _DISPATCH_NOTE.format(name=ref.__name__).rstrip() + "\n    "
        return fn

    return deco


@_documented_by(reference.gated_attn_conv)
def gated_attn_conv(
    x_hat: torch.Tensor,
    w_qk: torch.Tensor, b_qk: Optional[torch.Tensor],
    w_v: torch.Tensor, b_v: Optional[torch.Tensor],
    w_o: torch.Tensor, b_o: Optional[torch.Tensor],
    head_probs: torch.Tensor, bn1: BNState, bn3: BNState, gates: torch.Tensor, *,
    num_heads: int, alpha: float, grid: Tuple[int, int], training: bool,
    num_prefix_tokens: int = 1, center: int = CENTER_TAP, compute_all: Optional[bool] = None,
    attn_bias: Optional[torch.Tensor] = None, gate_values: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    kwargs = dict(num_heads=num_heads, alpha=alpha, grid=grid, training=training, num_prefix_tokens=num_prefix_tokens,
                  center=center, compute_all=compute_all, attn_bias=attn_bias, gate_values=gate_values)
    args = (x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1, bn3, gates)
    checks.gated_attn_conv(*args, **kwargs)
    return resolve("gated_attn_conv", x_hat.device)(*args, **kwargs)


@_documented_by(reference.masked_ffn)
def masked_ffn(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    mask: torch.Tensor, approximate: str = "none",
) -> torch.Tensor:
    checks.masked_ffn(x, w1, b1, w2, b2, mask, approximate)
    return resolve("masked_ffn", x.device)(x, w1, b1, w2, b2, mask, approximate)


@_documented_by(reference.pruned_ffn)
def pruned_ffn(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    approximate: str = "none",
) -> torch.Tensor:
    checks.pruned_ffn(x, w1, b1, w2, b2, approximate)
    return resolve("pruned_ffn", x.device)(x, w1, b1, w2, b2, approximate)


@_documented_by(reference.shift_sum)
def shift_sum(
    planes: torch.Tensor, bias: Optional[torch.Tensor], grid: Tuple[int, int], relu: bool,
) -> torch.Tensor:
    checks.shift_sum(planes, bias, grid, relu)
    return resolve("shift_sum", planes.device)(planes, bias, grid, relu)


@_documented_by(reference.deploy_conv)
def deploy_conv(
    x_hat: torch.Tensor, w_planes: torch.Tensor, b_fold: torch.Tensor, w_out: torch.Tensor,
    b_out: Optional[torch.Tensor], grid: Tuple[int, int], num_prefix_tokens: int = 1,
) -> torch.Tensor:
    checks.deploy_conv(x_hat, w_planes, b_fold, w_out, b_out, grid, num_prefix_tokens)
    return resolve("deploy_conv", x_hat.device)(x_hat, w_planes, b_fold, w_out, b_out, grid, num_prefix_tokens)


OPS = ("gated_attn_conv", "masked_ffn", "pruned_ffn", "shift_sum", "deploy_conv")
__all__ = list(OPS)
