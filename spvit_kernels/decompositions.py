"""Decompositions of the ``spvit`` inference ops into standard ATen ops, for exporters that do not know the ops.

A deployed model runs its conv and FFN layers through ``torch.ops.spvit.{deploy_conv, shift_sum, shift_sum_triton,
pruned_ffn}``. ``torch.export`` keeps them as single nodes (so a saved program runs the fused kernels), and the ONNX
exporter (``torch.onnx.export(..., dynamo=True)``) decomposes every node it has no ONNX function for with the table it
builds from ``torch._decomp.decomposition_table``. :func:`register` adds each op's eager reference
(:mod:`spvit_kernels.reference`: GEMMs, shifted sums, GELU) to that table, so a plain
``torch.onnx.export(deployed, (x,), dynamo=True)`` writes the same standard-operator graph as
:func:`spvit.export_onnx`. Nothing else reads that table by default: ``torch.export``, ``ExportedProgram.
run_decompositions()`` (core ATen table), ``torch.compile`` and eager calls keep the ops and their kernels.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from . import reference

_registered = False


def _shift_sum(planes: torch.Tensor, bias: Optional[torch.Tensor], H: int, W: int, relu: bool  # noqa: N803
               ) -> torch.Tensor:
    return reference.shift_sum(planes, bias, (H, W), relu)


def _deploy_conv(x_hat: torch.Tensor, w_planes: torch.Tensor, b_fold: torch.Tensor, w_out: torch.Tensor,
                 b_out: Optional[torch.Tensor], H: int, W: int, num_prefix_tokens: int) -> torch.Tensor:  # noqa: N803
    dtype = x_hat.dtype
    return reference.deploy_conv(x_hat, w_planes.to(dtype), b_fold, w_out.to(dtype), b_out, (H, W), num_prefix_tokens)


def _pruned_ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], approximate: str, fc2: str) -> torch.Tensor:
    return reference.pruned_ffn(x, w1, b1, w2, b2, approximate=approximate)


# op name (torch.ops.spvit.<name>.default) -> its decomposition (the op's schema, the reference's math)
DECOMPOSITIONS: Dict[str, Callable] = {
    "shift_sum": _shift_sum,
    "shift_sum_triton": _shift_sum,
    "deploy_conv": _deploy_conv,
    "pruned_ffn": _pruned_ffn,
}


def register() -> Dict[str, bool]:
    """Add the decomposition of every registered ``spvit`` inference op to ``torch._decomp.decomposition_table``.

    Idempotent; an op that is not registered in this process (e.g. the extension's ``shift_sum`` when the extension
    is not built) is skipped and registered by a later call once it exists.

    Returns:
        op name -> whether its decomposition is in the table now.
    """
    table = torch._decomp.decomposition_table
    done = {}
    for name, fn in DECOMPOSITIONS.items():
        packet = getattr(torch.ops.spvit, name, None) if hasattr(torch.ops, "spvit") else None
        overload = getattr(packet, "default", None) if packet is not None else None
        if overload is None:
            done[name] = False
            continue
        table.setdefault(overload, fn)
        done[name] = table[overload] is fn
    return done


__all__ = ["DECOMPOSITIONS", "register"]
