"""Shared helpers of the whole-pipeline scripts (bench/bench_deploy_e2e.py, bench/bench_latency_*.py,
bench/check_triton_compile.py): environment facts, a plain timer, CSV/JSON/Markdown output.

The kernel and end-to-end microbenchmarks do not use this module: they are pytest-benchmark tests
(bench/test_kernels.py, bench/test_e2e.py; timing in bench/conftest.py).

Timing (:func:`bench_fn`, through the package's one timer :func:`spvit.timing.time_fn`): ``warmup`` untimed calls,
then ``rep`` timed calls; on CUDA each call is bracketed by CUDA events with the device synchronised before the first
and after the last (``flush_l2=True`` overwrites a 256 MiB buffer before each timed call); on CPU
``time.perf_counter``. :func:`first_call_s` times a first (compiling) call
apart. Every row carries :func:`env_info`: device, torch/triton/timm/CUDA versions, driver, date and a run id.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from spvit.timing import time_fn

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUN_ID = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
_cache: Dict[Any, Any] = {}


# --------------------------------------------------------------------------------------------------------- environment
def _gpu_driver() -> str:
    """NVIDIA driver version from ``nvidia-smi`` ("" where not available)."""
    if "driver" not in _cache:
        out = ""
        exe = shutil.which("nvidia-smi")
        if exe:
            try:
                res = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                     text=True, timeout=20, check=False)
                out = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""
            except (OSError, subprocess.SubprocessError):
                out = ""
        _cache["driver"] = out
    return _cache["driver"]


def env_info(device: torch.device) -> Dict[str, str]:
    """Device name, library versions, driver, date and run id for the result rows."""
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
        driver = _gpu_driver()
    else:
        dev = f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"
        driver = ""
    return {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton_v,
        "timm": timm_v,
        "cuda": str(torch.version.cuda),
        "driver": driver,
        "date": _dt.date.today().isoformat(),
        "run_id": RUN_ID,
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------------------------------- timing
def bench_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 10,
             flush_l2: bool = False) -> Dict[str, float]:
    """Time ``fn`` with :func:`spvit.timing.time_fn`: ``warmup`` untimed calls, then ``rep`` timed calls, on CUDA
    bracketed by CUDA events (``flush_l2``: overwrite a 256 MiB buffer before each call). Returns ``ms`` (median),
    ``ms_p20``, ``ms_p80``, ``ms_min`` and ``reps``."""
    return time_fn(fn, device, warmup, rep, cuda_events=True, flush_l2=flush_l2)


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronised call of ``fn`` (use it for the first call: compilation, JIT, autotuning)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one call of ``fn`` in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def compile_backend(device: torch.device, smoke: bool = False) -> str:
    """torch.compile backend of the benchmarks: inductor, except ``eager`` (dynamo capture only) in CPU smoke runs,
    where inductor's C++ codegen would dominate a run meant to check the harness."""
    if device.type == "cpu" and smoke:
        return "eager"
    return "inductor"


# -------------------------------------------------------------------------------------------------------------- output
def write_rows(name: str, rows: Iterable[Dict], out_dir: Optional[str] = None,
               cols: Optional[List[str]] = None, title: Optional[str] = None,
               replace_run: Optional[str] = None, markdown: bool = True) -> str:
    """Add rows to ``<out_dir>/<name>.csv`` (the suite's one machine-readable file) and, with ``markdown``, write
    ``<name>.md``: a table of these rows.

    The CSV keeps the rows already in it (results of earlier runs and other machines): the file is rewritten with the
    old rows, then the new ones, under the union of the columns (atomically: a crash leaves the old file). With
    ``replace_run``, old rows whose ``run_id`` equals it are dropped first (a run rewriting its own partial results).
    ``cols`` picks the Markdown table's columns (default: all); ``title`` heads the Markdown file.
    """
    rows = list(rows)
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.csv")
    old: List[Dict] = []
    keys: List[str] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            old = [r for r in reader if replace_run is None or r.get("run_id") != replace_run]
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, restval="")
        w.writeheader()
        for r in old + rows:
            w.writerow(r)
    os.replace(tmp, path)
    if not markdown:
        return path
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        if title:
            f.write(f"# {title}\n\n")
        f.write(markdown_table(rows, [c for c in cols if any(c in r for r in rows)] if cols else None))
    return path


def markdown_table(rows: List[Dict], cols: Optional[List[str]] = None) -> str:
    """A Markdown table of ``rows`` (columns ``cols``, default those of all rows in order of appearance)."""
    if not rows:
        return ""
    if cols is None:
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols]

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def append_run(suite: str, run: Dict, out_dir: Optional[str] = None) -> str:
    """Add one run (a JSON object with its ``env``: device, versions, date, run id) to ``<out_dir>/<suite>.json``,
    ``{"runs": [...]}``, the one machine-readable file of that suite (earlier runs are kept; atomic rewrite)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{suite}.json")
    runs: List[Dict] = []
    if os.path.exists(path):
        with open(path) as f:
            runs = json.load(f).get("runs", [])
    runs.append(run)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"runs": runs}, f, indent=1, default=str)
    os.replace(tmp, path)
    return path
