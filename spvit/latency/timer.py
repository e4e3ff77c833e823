"""Timing on one device: dtype and device names, the CPU allocator's regime, and the adaptive timer.

:func:`time_ms` times a thunk (or a self-timed piece, see :mod:`spvit.latency.pieces`) with an adaptive number of
repeats on the wall clock or the process CPU clock. :func:`set_steady_malloc` fixes glibc malloc's thresholds so that
a latency table and a later measurement run in the same allocator regime; :func:`malloc_state` says which regime this
process runs.
"""
from __future__ import annotations

import os
import platform
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from ..timing import CLOCKS, sync, time_fn  # noqa: F401 (CLOCKS, sync: re-exported)

STATS = {"median": "ms", "min": "ms_min"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """The table's name of ``dtype`` ("fp32", "bf16" or "fp16"); ValueError for any other."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return dtype
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"dtype {dtype} is not one of {sorted(DTYPES)}")


def device_class(device: Union[str, torch.device]) -> str:
    """``"cpu"`` or ``"cuda sm_XY"`` (the compute capability): what a table may be reused across."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda sm_{major}{minor}"
    return device.type


def device_name(device: Union[str, torch.device]) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "cpu"



# glibc malloc, by default, serves blocks above a *dynamic* threshold (128 KiB at start, raised to the size of the
# largest such block freed so far, up to 32 MiB) with fresh mmap()ed memory and gives it back on free, and trims the
# heap top past another dynamic threshold. Whether a batch's large activations then cost thousands of page faults
# depends on what the process allocated before: measured on a 2-core x86 CPU, the same dense deployed demo ViT ran
# in 42 ms or 59 ms per batch (one thread) depending on that history, with 10 ms of kernel time for page faults in
# the slow state. A latency table profiled in one state and a model measured in the other disagree by up to 30 %.
# Fixing both thresholds makes the allocator's behaviour independent of history (memory is kept for reuse instead).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
STEADY_MMAP_BYTES = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit
STEADY_TRIM_BYTES = 1 << 30
_malloc_state: Optional[str] = None


def set_steady_malloc() -> str:
    """Fix glibc malloc's mmap and trim thresholds for this process (idempotent) and say what the CPU allocator
    now is; used by :func:`profile` and :func:`compare` on CPU (``steady_malloc=True``, the default) and recorded in
    the table. Tables are only comparable with measurements made in the same allocator regime: run the deployed
    model the same way (call this at start-up, or set ``MALLOC_MMAP_THRESHOLD_=33554432`` and
    ``MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment, or preload jemalloc / tcmalloc). Leaves the allocator
    alone where the environment already configures it (those variables, or a preloaded allocator) or where the C
    library is not glibc. The price: freed memory stays in the process for reuse (peak RSS is not given back)."""
    global _malloc_state
    if _malloc_state is not None:
        return _malloc_state
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            _malloc_state = f"{lib} (preloaded)"
            return _malloc_state
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        _malloc_state = ("glibc, thresholds from the environment: mmap "
                         f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}, trim "
                         f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'default')}")
        return _malloc_state
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        glibc = version().decode()
        ok = libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_BYTES) == 1 and \
            libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_BYTES) == 1
    except (OSError, AttributeError, TypeError):  # no C library handle (Windows) or not glibc (musl, macOS)
        _malloc_state = "system default (not glibc: left alone)"
        return _malloc_state
    _malloc_state = (f"glibc {glibc}, steady: mmap threshold {STEADY_MMAP_BYTES >> 20} MiB, trim threshold "
                     f"{STEADY_TRIM_BYTES >> 20} MiB" if ok else f"glibc {glibc}, default (mallopt refused)")
    return _malloc_state


def malloc_state() -> str:
    """What :func:`set_steady_malloc` found or set in this process ("not set" if it was not called)."""
    return _malloc_state or "not set (the C library's defaults)"


def time_ms(fn: Callable[[], object], device: torch.device, min_reps: int = 5, max_reps: int = 100,
            budget_s: float = 0.3, warmup: int = 2, clock: str = "wall") -> Dict[str, float]:
    """Milliseconds per call of ``fn`` with an adaptive number of repeats.

    ``warmup`` untimed calls, then timed calls until at least ``min_reps`` were made and ``budget_s`` seconds were
    spent (at most ``max_reps``). CUDA is synchronised around every call. ``clock``: "wall" (latency) or "cpu" (the
    process's CPU time: on a CPU shared with other work, the time the call would take on an idle core; meaningful
    for one thread only). A ``fn`` with ``fn.self_timed = True`` is called as ``fn(clock_function)`` and returns the
    seconds to count (a piece timed inside a longer run, see :class:`ViTPieces`); the budget counts the whole calls.
    Returns ``ms`` (median), ``ms_min``, ``reps``.
    """
    return time_fn(fn, device, warmup, min_reps, budget_s=budget_s, max_reps=max_reps, clock=clock)


def median(v: Sequence[float]) -> float:
    """The median of ``v`` (the mean of the two middle values for an even count)."""
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
