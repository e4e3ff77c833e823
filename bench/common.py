"""Shared helpers of the benchmarks: timing, environment facts, CSV/JSON/markdown output.

Every benchmark writes rows (dicts) with :func:`write_rows`; each row carries the device name, torch/triton/timm
versions and the date, so results from different machines can sit in one CSV.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def env_info(device: torch.device) -> Dict[str, str]:
    """Device name and library versions for the result rows."""
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    try:
        import timm
        timm_v = timm.__version__
    except ImportError:
        timm_v = "none"
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"
    return {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton_v,
        "timm": timm_v,
        "cuda": str(torch.version.cuda),
        "date": _dt.date.today().isoformat(),
    }


def bench_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 10,
             quantiles=(0.5, 0.2, 0.8)) -> Dict[str, float]:
    """Time ``fn`` (milliseconds): median and quantiles. Uses ``triton.testing.do_bench`` on CUDA."""
    if device.type == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(quantiles))
        return {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2]}
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one call of ``fn`` in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def write_rows(name: str, rows: Iterable[Dict], out_dir: Optional[str] = None) -> str:
    """Append rows to ``<out_dir>/<name>.csv`` (creating the header) and write ``<name>.json`` and ``<name>.md``."""
    rows = list(rows)
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.csv")
    keys: List[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    exists = os.path.exists(path)
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != keys:  # a different layout: start a new file beside the old one rather than mixing
            path = os.path.join(out_dir, f"{name}-{_dt.datetime.now():%Y%m%d%H%M%S}.csv")
            exists = False
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        if not exists:
            w.writeheader()
        for r in rows:
            w.writerow(r)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown_table(rows))
    return path


def markdown_table(rows: List[Dict], cols: Optional[List[str]] = None) -> str:
    if not rows:
        return ""
    cols = cols or [k for k in rows[0]]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
