"""The FLOPs model of SPViT (docs/method.md §3.1, in multiply-accumulates; "GFLOPs" = MACs / 1e9).

For a ViT with embedding C, h heads (d = C/h), a patch grid of HW positions, N = HW + 1 tokens:

* patch embedding HW*C*in_chans*p^2; classifier C*num_classes;
* per block: 2*C*N (the two LayerNorms); attention e1*c1 + e3*(c3 - c1) + em*(cm - c3) with
  c1 = 2*C*d*HW, c3 = 10*C*d*HW, cm = 4*N*C^2 + 2*C*N^2; FFN 2*HW*C*kept (HW, not N: as the original, §9 Q6).

The same function serves the differentiable loss (gates as tensors) and plain counting (floats).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .arch import Architecture, ModelSignature

Number = Union[float, torch.Tensor]
_E = {"msa": (1, 1, 1), "3x3": (1, 1, 0), "1x1": (1, 0, 0), "skip": (0, 0, 0)}


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


def arch_macs(arch: Architecture) -> int:
    """MACs per image of a fixed architecture."""
    return int(vit_macs(arch.signature, [_E[b.attn] for b in arch.blocks], [b.ffn_width for b in arch.blocks]))


def dense_macs(sig: ModelSignature) -> int:
    return int(vit_macs(sig, [(1, 1, 1)] * sig.depth, [sig.mlp_hidden] * sig.depth))


def min_macs(sig: ModelSignature) -> int:
    """Every attention skipped, every FFN unit pruned: what no search can go below."""
    return int(vit_macs(sig, [(0, 0, 0)] * sig.depth, [0] * sig.depth))


def gflops(model) -> float:
    """GFLOPs (MACs / 1e9, the paper's unit) of a timm ViT, a Supernet (its eval decisions), a pruned or
    deployed model (anything with an ``architecture`` attribute), or an :class:`Architecture`."""
    from .models.convert import signature_of

    if isinstance(model, Architecture):
        return arch_macs(model) / 1e9
    if callable(getattr(model, "macs_tensor", None)):  # a Supernet (not imported: it imports this module)
        return model.gflops()
    arch = getattr(model, "architecture", None)
    if isinstance(arch, Architecture):
        return arch_macs(arch) / 1e9
    return dense_macs(signature_of(model)) / 1e9


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BN buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
