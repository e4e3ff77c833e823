"""The package's one timer: milliseconds per call of a callable, for ``spvit bench``, the latency tables and the
benchmark scripts in ``bench/``.

Untimed warm-up calls, then timed calls: a fixed number, or (with a time budget) at least that many until the
budget is spent. On CUDA every timed call is synchronised (or, with ``cuda_events``, bracketed by CUDA events with one
synchronisation before the first and after the last call). The statistics are the median, the minimum and the 20 %
and 80 % quantiles (inclusive method) of the timed calls.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

CLOCKS = ("wall", "cpu")
L2_FLUSH_BYTES = 256 * 2**20
_l2_buffers: Dict[str, torch.Tensor] = {}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _l2_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _l2_buffers:
        _l2_buffers[key] = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return _l2_buffers[key]


def stats(times_ms: List[float]) -> Dict[str, float]:
    """``ms`` (median), ``ms_min``, ``ms_p20``, ``ms_p80`` (inclusive quantiles) and ``reps`` of timings in ms."""
    times = sorted(times_ms)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else times * 9
    return {"ms": statistics.median(times), "ms_min": times[0], "ms_p20": q[1], "ms_p80": q[7], "reps": len(times)}


def time_fn(fn: Callable[..., object], device: torch.device, warmup: int = 3, rep: int = 10, *,
            budget_s: float = 0.0, max_reps: Optional[int] = None, clock: str = "wall", cuda_events: bool = False,
            flush_l2: bool = False) -> Dict[str, float]:
    """Milliseconds per call of ``fn``.

    Args:
        fn: the call to time (no arguments). A ``fn`` with ``fn.self_timed = True`` is called as ``fn(clock)`` and
            returns the seconds to count (a piece timed inside a longer run); the budget counts the whole calls.
        device: where ``fn`` runs (CUDA work is synchronised before a call's time is read).
        warmup: untimed calls first (>= 0).
        rep: timed calls (>= 1); with ``budget_s``, the least number of them.
        budget_s: keep timing until this many seconds were spent (at least ``rep`` calls, at most ``max_reps``).
        max_reps: the most timed calls with a budget (default: no limit but the budget).
        clock: ``wall`` (latency) or ``cpu`` (the process's CPU time: on a CPU shared with other work, the time the
            call would take on an idle core; CPU work with one thread only).
        cuda_events: on CUDA, time with CUDA events and no synchronisation between the calls (fixed ``rep``).
        flush_l2: on CUDA, overwrite a 256 MiB buffer before each timed call (not timed).

    Returns:
        ``ms`` (median), ``ms_min``, ``ms_p20``, ``ms_p80`` and ``reps``.

    Raises:
        ValueError: a count, clock or combination out of range.
    """
    if warmup < 0 or rep < 1:
        raise ValueError(f"need warmup >= 0 and rep >= 1, got warmup={warmup}, rep={rep}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "cpu" and device.type != "cpu":
        raise ValueError("clock='cpu' (process CPU time) measures CPU work only; use clock='wall' on a GPU")
    now = time.perf_counter if clock == "wall" else time.process_time
    self_timed = getattr(fn, "self_timed", False)
    events = cuda_events and device.type == "cuda"
    if events and (budget_s > 0 or self_timed or clock != "wall"):
        raise ValueError("cuda_events times a fixed number of plain calls with the wall clock")
    flush = _l2_buffer(device) if flush_l2 and device.type == "cuda" else None
    for _ in range(warmup):
        fn(now) if self_timed else fn()
    sync(device)
    if events:
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
        for start, end in marks:
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        sync(device)
        return stats([start.elapsed_time(end) for start, end in marks])
    limit = max_reps if max_reps is not None else (rep if budget_s <= 0 else None)
    times: List[float] = []
    spent = 0.0
    while (limit is None or len(times) < limit) and (len(times) < rep or spent < budget_s):
        if flush is not None:
            flush.zero_()
            sync(device)
        t0 = now()
        if self_timed:  # a piece timed inside its context: fn returns the seconds of the piece alone
            dt = fn(now)
        else:
            fn()
            sync(device)
            dt = now() - t0
        spent += now() - t0  # the budget counts all the work done, context included
        times.append(dt * 1e3)
    return stats(times)
