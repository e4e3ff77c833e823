"""The search's latency term: the per-block indicators of a supernet, the table's prediction as a differentiable
function of them (:func:`predicted_ms_tensor`), the target (:func:`resolve_target`) and the loss
(:class:`LatencyObjective`; docs/method.md §11.4)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import gates as G
from ..flops import dense_macs
from .table import LatencyTable, LatencyTableError, interp


def block_indicators(sn: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per block of a supernet: the cumulative attention indicators (ê₁, ê₃, êₘ) (3,) and the expected kept FFN
    width Σⱼ ĝⱼ (0-d), both differentiable (docs/method.md §2.4). A family's supernet may provide its own
    ``latency_indicators()``."""
    own = getattr(sn, "latency_indicators", None)
    if callable(own):
        return own()
    return [(G.cumulative(G.complexity_indicator(a.kernel_thresholds)), G.complexity_indicator(m.ffn_thresholds).sum())
            for a, m in zip(sn.attns, sn.mlps)]


def predicted_ms_tensor(table: LatencyTable, indicators: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Predicted latency (ms, 0-d tensor) from per-block indicators.

    Per block: t_skip + ê₁(t_1x1 − t_skip) + ê₃(t_3x3 − t_1x1) + êₘ(t_MSA − t_3x3) + FFN(Σⱼĝⱼ), the FFN latency
    linearly interpolated in the width. With 0/1 indicators this is exactly the table's prediction.
    """
    total = None
    for i, (e, k) in enumerate(indicators):
        a = table.group(i).attn_ms
        g = table.group(i)
        t = (a["skip"] + e[0] * (a["1x1"] - a["skip"]) + e[1] * (a["3x3"] - a["1x1"]) + e[2] * (a["msa"] - a["3x3"])
             + interp(g.ffn_widths, g.ffn_ms, k))
        total = t if total is None else total + t
    return total + table.fixed_total


def resolve_target(table: LatencyTable, speedup: Optional[float] = None, latency_ms: Optional[float] = None) -> float:
    """Target latency (ms per batch) from ``speedup`` (dense / S) or ``latency_ms``; LatencyTableError if it cannot be
    met (outside [everything pruned, dense])."""
    if (speedup is None) == (latency_ms is None):
        raise LatencyTableError("give exactly one of --target-speedup and --target-latency-ms with a latency table")
    dense, lo = table.dense_ms(), table.min_ms()
    if speedup is not None:
        if not (math.isfinite(speedup) and speedup > 0):
            raise LatencyTableError(f"--target-speedup must be a positive number, got {speedup}")
        target = dense / speedup
        if not (lo <= target <= dense):
            raise LatencyTableError(f"--target-speedup {speedup:g} cannot be met by {table.model_name} on "
                                    f"{table.device.get('class')}: the predicted speedup lies between 1 (dense, "
                                    f"{dense:.4g} ms) and {dense / lo:.3g} (everything pruned, {lo:.4g} ms)")
        return target
    if not (math.isfinite(latency_ms) and lo <= latency_ms <= dense):
        raise LatencyTableError(f"--target-latency-ms {latency_ms:g} cannot be met by {table.model_name}: it must lie "
                                f"between {lo:.4g} (everything pruned) and {dense:.4g} (dense) ms per batch of "
                                f"{table.batch}")
    return float(latency_ms)


class LatencyObjective:
    """The search's latency loss: ``lambda * (F_dense * (T - P) / D)^2``.

    P is the predicted latency (:func:`predicted_ms_tensor`), T the target and D the predicted dense latency (ms);
    F_dense is the dense model's GFLOPs. The latency gap is thereby expressed in "dense-GFLOPs equivalents": if
    latency were proportional to FLOPs, this loss would equal the FLOPs loss λ(T − F/10⁹)² of docs/method.md §3.2 at
    the same λ, so the λ of a configuration keeps its meaning (DeiT-S: λ = 3).
    """

    def __init__(self, table: LatencyTable, sn: nn.Module, target_ms: float):
        table.check_model(sn.signature, getattr(sn, "model_name", None))
        self.table, self.sn, self.target_ms = table, sn, float(target_ms)
        self.dense_ms = table.dense_ms()
        self.dense_gflops = dense_macs(sn.signature) / 1e9

    def predicted_ms(self) -> torch.Tensor:
        return predicted_ms_tensor(self.table, block_indicators(self.sn))

    def loss(self, loss_lambda: float) -> torch.Tensor:
        gap = (self.target_ms - self.predicted_ms()) / self.dense_ms
        return loss_lambda * (self.dense_gflops * gap) ** 2

    def describe(self) -> str:
        return (f"latency target {self.target_ms:.4g} ms/batch of {self.table.batch} (predicted dense "
                f"{self.dense_ms:.4g} ms, speedup {self.dense_ms / self.target_ms:.3g}) on "
                f"{self.table.device.get('name')} [{self.table.device.get('class')}, {self.table.dtype}]")
