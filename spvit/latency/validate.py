"""Validation of a table: the latency of a deployed model measured whole (:func:`measure_model`) against the
table's prediction, and the measured against the predicted speedup over the dense model (:func:`compare`)."""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
import torch.nn as nn

from .table import LatencyTable
from .timer import STATS, malloc_state, median, set_steady_malloc, time_ms


def measure_model(model: nn.Module, table: LatencyTable, min_reps: int = 5, max_reps: int = 50,
                  budget_s: float = 1.0) -> float:
    """ms per batch of a deployed model at the table's batch size, on the model's device (the table's statistic:
    median or minimum of the repeats)."""
    sig = model.signature
    dev = model.device
    x = torch.randn(table.batch, sig.in_chans, *sig.img_size, device=dev, dtype=model.dtype)
    stat = STATS.get(table.meta.get("stat", "median"), "ms")
    with torch.inference_mode():
        return time_ms(lambda: model(x), dev, min_reps, max_reps, budget_s, clock=table.meta.get("clock", "wall"))[stat]


def compare(table: LatencyTable, deployed: nn.Module, dense: Optional[nn.Module] = None, rounds: int = 1,
            steady_malloc: bool = True, **timing) -> Dict[str, float]:
    """Predicted vs measured latency of ``deployed`` (and of the dense model, for the speedup).

    ``rounds`` passes measure the models alternately (median over passes), so that a change of load on the machine
    affects both alike; ``steady_malloc``: on CPU, fix the allocator's thresholds as :func:`profile` does (a warning
    if the table was measured under another allocator setting); ``timing``: :func:`measure_model` arguments.
    """
    table.check_model(deployed.signature, deployed.model_name)
    table.check_device(deployed.device, deployed.dtype)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if deployed.device.type == "cpu":
        if steady_malloc:
            set_steady_malloc()
        made = table.meta.get("cpu_malloc")
        if made is not None and ("steady" in made) != ("steady" in malloc_state()):
            warnings.warn(f"the latency table was measured with the CPU allocator '{made}', this process runs "
                          f"'{malloc_state()}': page-fault costs differ and so may the latencies", stacklevel=2)
    mine, dense_t = [], []
    for _ in range(rounds):
        mine.append(measure_model(deployed, table, **timing))
        if dense is not None:
            dense_t.append(measure_model(dense, table, **timing))
    out = {"predicted_ms": table.predict(deployed.architecture)["ms"], "measured_ms": median(mine)}
    out["error"] = out["predicted_ms"] / out["measured_ms"] - 1
    if dense is not None:
        out["dense_predicted_ms"] = table.dense_ms()
        out["dense_measured_ms"] = median(dense_t)
        out["predicted_speedup"] = out["dense_predicted_ms"] / out["predicted_ms"]
        out["measured_speedup"] = out["dense_measured_ms"] / out["measured_ms"]
    return out
