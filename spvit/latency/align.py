"""Aligned FFN widths (``--ffn-align``): the read-out keeps a multiple of N units per FFN (docs/method.md §11.4)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..arch import Architecture, BlockArch
from ..flops import arch_macs
from .table import LatencyTable


def aligned_count(kept: int, full: int, align: int) -> int:
    """The number of FFN units the aligned read-out keeps (docs/method.md §11.4).

    0 stays 0 (the search removed the whole FFN). Otherwise the nearest of the allowed widths: the positive
    multiples of ``align`` up to ``full``, and ``full`` itself (always allowed, even when it is not a multiple); a
    tie goes to the larger width. So an FFN in use is never rounded away (1 .. align-1 units -> align). ``align`` <= 1
    changes nothing.
    """
    if kept < 0 or kept > full:
        raise ValueError(f"kept count {kept} outside [0, {full}]")
    if align <= 1 or kept == 0:
        return kept
    lo = (kept // align) * align
    cands = [c for c in (lo, lo + align) if 0 < c <= full] + [full]
    return min(cands, key=lambda c: (abs(c - kept), -c))


def aligned_keep(logits: torch.Tensor, align: int) -> Tuple[int, ...]:
    """Kept unit indices (sorted) after alignment: the ``aligned_count`` units with the largest gate logits (ties:
    lower index first); with ``align`` <= 1 exactly the units with logit > 0."""
    logits = logits.detach().float().cpu()
    kept = int((logits > 0).sum())
    n = aligned_count(kept, logits.numel(), align)
    if n == kept:
        return tuple(torch.nonzero(logits > 0).flatten().tolist())
    order = sorted(range(logits.numel()), key=lambda j: (-float(logits[j]), j))
    return tuple(sorted(order[:n]))


def align_architecture(sn: nn.Module, align: int, table: Optional[LatencyTable] = None) -> Architecture:
    """The supernet's architecture read-out with ``align``-aligned FFN widths (meta: GFLOPs and, with a table, the
    predicted latency of the aligned widths)."""
    arch = sn.architecture()
    if align and align > 1:
        blocks = [BlockArch(b.attn, aligned_keep(m.ffn_thresholds, align)) for b, m in zip(arch.blocks, sn.mlps)]
        arch = Architecture(arch.model_name, arch.signature, blocks, meta=dict(arch.meta))
        arch.meta["unaligned_ffn_widths"] = [len(m.kept()) for m in sn.mlps]
        arch.meta["gflops"] = arch_macs(arch) / 1e9
    arch.meta["ffn_align"] = int(align or 0)
    if table is not None:
        arch.meta["predicted_ms"] = table.predict(arch)["ms"]
        arch.meta["predicted_speedup"] = table.dense_ms() / arch.meta["predicted_ms"]
        arch.meta["latency_table"] = {"device": table.device.get("name"), "class": table.device.get("class"),
                                      "dtype": table.dtype, "batch": table.batch}
    return arch
