"""Deploy-mode compact FFN (docs/method.md §5.2, §10.4): ``y = GELU(x W1^T + b1) W2^T + b2`` at the pruned hidden width.

Kernels
    Both GEMMs run the GEMM-with-epilogue kernel of :mod:`spvit_kernels._gemm` (:func:`~spvit_kernels._gemm.linear_act`,
    shared with the masked FFN) with the gate mask switched off: fc1 with bias + GELU in the epilogue, fc2 with bias
    only. A pruned FFN is the masked FFN with the masked-out units removed, so one kernel serves both rather than two
    near-copies.

fc2
    Default ``fc2="triton"``: compacted hidden widths (e.g. 1118, 489) are rarely multiples of 8, which keeps cuBLAS
    off its fastest (16-byte aligned) kernels, while the Triton kernel masks its tails. The hidden activation is
    written into a buffer whose rows are padded to 64 elements, so its rows stay aligned for either fc2.
    ``fc2="cublas"`` (``torch.addmm``) runs through :func:`pruned_ffn_with_fc2`; ``bench/test_kernels.py`` measures
    both (provider ``triton_fc2_cublas``). The default is an open question of docs/kernel-design.md.

Autograd
    This op is for inference. Called with grad enabled and any input requiring grad (e.g. fine-tuning a pruned model),
    it runs the eager reference instead, so gradients are exact and nothing breaks; under ``torch.no_grad`` /
    ``torch.inference_mode`` (or with no input requiring grad) it runs the Triton kernels.

The kernel path is the op ``torch.ops.spvit.pruned_ffn`` (a ``triton_op``, see
:func:`spvit_kernels._compat.define_op`) so ``torch.compile`` and ``torch.export`` see it.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._compat import define_op
from ._gemm import ACT_NONE, APPROX_TO_ACT, autocast_inputs, check_ffn_inputs, linear_act

DEFAULT_FC2 = "triton"
_HIDDEN_ROW_ALIGN = 64


# ----------------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------------
def _pruned_ffn_impl(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                     b2: Optional[torch.Tensor], approximate: str, fc2: str) -> torch.Tensor:
    """x: (M, C) contiguous; w1: (F, C); w2: (C, F). Returns (M, C)."""
    h, _ = linear_act(x, w1, b1, APPROX_TO_ACT[approximate], row_align=_HIDDEN_ROW_ALIGN)  # (M, F), padded rows
    if fc2 == "triton":
        y, _ = linear_act(h, w2, b2, ACT_NONE)
    elif b2 is not None:
        y = torch.addmm(b2, h, w2.t())
    else:
        y = torch.mm(h, w2.t())
    return y


# ----------------------------------------------------------------------------------------------------------------------
# torch.library op (inference only; autograd goes to the reference, see the module docstring)
# ----------------------------------------------------------------------------------------------------------------------
def _pruned_ffn_fake(x, w1, b1, w2, b2, approximate, fc2):
    return x.new_empty((x.shape[0], w2.shape[0]))


def _pruned_ffn_fwd(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                   b2: Optional[torch.Tensor], approximate: str, fc2: str) -> torch.Tensor:
    """x: (M, C) -> (M, C); see :func:`_pruned_ffn_impl`."""
    return _pruned_ffn_impl(x, w1, b1, w2, b2, approximate, fc2)


pruned_ffn_op = define_op("pruned_ffn", _pruned_ffn_fwd, _pruned_ffn_fake)


def pruned_ffn(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    approximate: str = "none",
) -> torch.Tensor:
    """Compact (pruned) FFN; same signature and semantics as :func:`reference.pruned_ffn`.

    Args:
        x: (..., C) tokens, e.g. (B, N, C); w1: (F, C) at the pruned width F (F = 0 allowed); b1: (F,) | None;
        w2: (C, F); b2: (C,) | None; approximate: GELU variant, 'none' (erf) or 'tanh'.
    Returns:
        (..., C) = GELU(x W1^T + b1) W2^T + b2 in x's dtype. With grad enabled and an input requiring grad this is
        the eager reference (differentiable); otherwise the Triton kernels. Under autocast the inputs are first cast
        to the autocast dtype, as ``F.linear`` would.
    """
    return pruned_ffn_with_fc2(x, w1, b1, w2, b2, approximate, DEFAULT_FC2)


def pruned_ffn_with_fc2(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    approximate: str = "none", fc2: str = DEFAULT_FC2,
) -> torch.Tensor:
    """:func:`pruned_ffn` with the GEMM that runs fc2 chosen: 'triton' or 'cublas' (``torch.addmm``)."""
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    check_ffn_inputs("pruned_ffn", x, w1, b1, w2, b2, approximate)
    if fc2 not in ("cublas", "triton"):
        raise ValueError(f"fc2 must be 'cublas' or 'triton', got {fc2!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2)):
        return reference.pruned_ffn(x, w1, b1, w2, b2, approximate=approximate)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    b1 = b1.contiguous() if b1 is not None else None
    b2 = b2.contiguous() if b2 is not None else None
    y = pruned_ffn_op(x2, w1.contiguous(), b1, w2.contiguous(), b2, approximate, fc2)
    return y.reshape(*lead, y.shape[-1])
