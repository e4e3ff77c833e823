"""Timing of a callable: warm-up, then the median and quantiles of repeated calls (CUDA-synchronised)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 10) -> Dict[str, float]:
    """Milliseconds per call of ``fn``: ``ms`` (median), ``ms_p20`` and ``ms_p80`` over ``rep`` calls."""
    if rep < 1:
        raise ValueError(f"rep must be >= 1, got {rep}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: List[float] = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}
