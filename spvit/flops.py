"""The FLOPs model of SPViT (docs/method.md §3.1, in multiply-accumulates; "GFLOPs" = MACs / 1e9).

For a ViT with embedding C, h heads (d = C/h), a patch grid of HW positions, N = HW + 1 tokens:

* patch embedding HW*C*in_chans*p^2; classifier C*num_classes;
* per block: 2*C*N (the two LayerNorms); attention e1*c1 + e3*(c3 - c1) + em*(cm - c3) with
  c1 = 2*C*d*HW, c3 = 10*C*d*HW, cm = 4*N*C^2 + 2*C*N^2; FFN 2*HW*C*kept (HW, not N: as the original, §9 Q6).

The same function serves the differentiable loss (gates as tensors) and plain counting (floats).

Swin (docs/method.md §7.5, :func:`swin_macs`): per stage the same attention / FFN terms on the stage's HW tokens,
with the MSA cost counted per window; plus the patch-embedding norm, the patch merging layers and the original's
count of the final norm.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .arch import Architecture, ModelSignature, SwinSignature
from .choices import AttnChoice
from .families import family_of

Number = Union[float, torch.Tensor]
# cumulative gates (e1, e3, em) of each choice
_E = {AttnChoice.MSA: (1, 1, 1), AttnChoice.CONV3: (1, 1, 0), AttnChoice.CONV1: (1, 0, 0), AttnChoice.SKIP: (0, 0, 0)}


def layer_costs(sig: ModelSignature):
    """Per-image MACs (c1, c3, cm, ffn_per_unit, norms) of one block."""
    c, d = sig.embed_dim, sig.head_dim
    hw = sig.grid[0] * sig.grid[1]
    n = hw + sig.num_prefix_tokens
    c1 = 2 * c * d * hw
    c3 = 10 * c * d * hw
    cm = 4 * n * c * c + 2 * c * n * n
    return c1, c3, cm, 2 * hw * c, 2 * c * n


def constant_macs(sig: ModelSignature) -> int:
    """Patch embedding + classifier (+ the LayerNorms of every block)."""
    hw = sig.grid[0] * sig.grid[1]
    *_, norms = layer_costs(sig)
    return hw * sig.embed_dim * sig.in_chans * sig.patch_size ** 2 + sig.embed_dim * sig.num_classes + sig.depth * norms


def vit_macs(sig: ModelSignature, attn_gates: Sequence, ffn_kept: Sequence[Number]) -> Number:
    """Total MACs per image.

    Args:
        sig: the model.
        attn_gates: per block the cumulative gates (e1, e3, em) (a (3,) tensor or a 3-sequence of numbers).
        ffn_kept: per block the number of kept FFN units (a number or a 0-d tensor).
    Returns:
        a float, or a 0-d tensor carrying gradients if any input is a tensor.
    """
    c1, c3, cm, per_unit, _ = layer_costs(sig)
    total: Number = float(constant_macs(sig))
    for e, k in zip(attn_gates, ffn_kept):
        e1, e3, em = e[0], e[1], e[2]
        total = total + e1 * c1 + e3 * (c3 - c1) + em * (cm - c3) + per_unit * k
    return total


def swin_stage_costs(sig: SwinSignature, s: int):
    """Per-image MACs (c1, c3, cm, ffn_per_unit, norms) of one block of Swin stage ``s`` (docs/method.md §7.5)."""
    dim, d = sig.stage_dims[s], sig.head_dim
    rh, rw = sig.stage_grid(s)
    hw = rh * rw
    w = sig.stage_window(s)
    n = w * w
    n_win = hw // n
    c1 = 2 * dim * d * hw
    c3 = 10 * dim * d * hw
    cm = n_win * (4 * n * dim * dim + 2 * n * n * dim)
    return c1, c3, cm, 2 * hw * dim, 2 * dim * hw


def swin_constant_macs(sig: SwinSignature) -> int:
    """Patch embedding (+ its norm), the blocks' LayerNorms, patch merging, final norm (as the original counts it:
    ``num_features * HW_1 // 2**stages``) and the classifier."""
    hw0 = sig.grid[0] * sig.grid[1]
    c = sig.embed_dim
    total = hw0 * c * sig.in_chans * sig.patch_size ** 2 + hw0 * c
    for s in range(sig.num_stages):
        total += sig.depths[s] * swin_stage_costs(sig, s)[4]
        if s < sig.num_stages - 1:  # the merge that starts stage s + 1, counted on stage s's map
            rh, rw = sig.stage_grid(s)
            dim = sig.stage_dims[s]
            total += rh * rw * dim + (rh // 2) * (rw // 2) * 4 * dim * 2 * dim
    nf = sig.stage_dims[-1]
    return total + nf * hw0 // 2 ** sig.num_stages + nf * sig.num_classes


def swin_macs(sig: SwinSignature, attn_gates: Sequence, ffn_kept: Sequence[Number]) -> Number:
    """Total MACs per image of a Swin model; arguments per block in block order, as :func:`vit_macs`."""
    total: Number = float(swin_constant_macs(sig))
    for s, e, k in zip(sig.block_stage, attn_gates, ffn_kept):
        c1, c3, cm, per_unit, _ = swin_stage_costs(sig, s)
        total = total + e[0] * c1 + e[1] * (c3 - c1) + e[2] * (cm - c3) + per_unit * k
    return total


def model_macs(sig, attn_gates: Sequence, ffn_kept: Sequence[Number]) -> Number:
    """MACs per image for a signature of either family."""
    return family_of(sig).macs(sig, attn_gates, ffn_kept)


def arch_macs(arch: Architecture) -> int:
    """MACs per image of a fixed architecture."""
    return int(model_macs(arch.signature, [_E[b.attn] for b in arch.blocks], [b.ffn_width for b in arch.blocks]))


def dense_macs(sig) -> int:
    return int(model_macs(sig, [(1, 1, 1)] * sig.depth, list(sig.block_mlp_hidden)))


def min_macs(sig) -> int:
    """Every attention skipped, every FFN unit pruned: what no search can go below."""
    return int(model_macs(sig, [(0, 0, 0)] * sig.depth, [0] * sig.depth))


def gflops(model) -> float:
    """GFLOPs (MACs / 1e9, the paper's unit) of a timm ViT or Swin, a Supernet (its eval decisions), a pruned or
    deployed model (anything with an ``architecture`` attribute), or an :class:`Architecture`."""
    if isinstance(model, Architecture):
        return arch_macs(model) / 1e9
    if callable(getattr(model, "macs_tensor", None)):  # a Supernet (not imported: it imports this module)
        return model.gflops()
    arch = getattr(model, "architecture", None)
    if isinstance(arch, Architecture):
        return arch_macs(arch) / 1e9
    return dense_macs(family_of(model).signature_of(model)) / 1e9


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BN buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
