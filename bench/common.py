"""Shared helpers of the benchmarks: timing, measured peaks, fresh compiles, environment facts, CSV/JSON/MD output.

Timing rules (every benchmark goes through :func:`bench_fn` / :func:`bench_backward`):

* ``warmup`` untimed calls, then ``rep`` timed calls, on every device (the caller's numbers are honoured).
* On CUDA each call is bracketed by CUDA events (the GPU time from launch of the call to its end) and the device is
  synchronised before the first and after the last event, so nothing of a previous call leaks into a timed one;
  ``flush_l2=True`` zeroes a 256 MiB buffer before each timed call (outside the events) so that a kernel cannot be
  fed from the previous call's L2. On CPU each call is timed with ``time.perf_counter``.
* The first call of a callable (which holds compilation: torch.compile, Triton JIT, autotuning) is timed apart by
  :func:`first_call_s`, synchronised, and never counted in the steady-state time.
* :func:`fresh_compile` resets dynamo before every ``torch.compile`` so that no compiled callable is reused across
  shapes (and no shape runs silently eager after the recompile limit).

Every row carries :func:`env_info`: device name, torch/triton/timm/CUDA versions, driver, date and a run id, so
results from different machines and runs can sit in one CSV.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUN_ID = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
_L2_FLUSH_BYTES = 256 * 2**20
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
def _stats(times_ms: List[float]) -> Dict[str, float]:
    times = sorted(times_ms)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else times * 9
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7], "ms_min": times[0],
            "reps": len(times)}


def _l2_buffer(device: torch.device) -> torch.Tensor:
    key = ("l2", str(device))
    if key not in _cache:
        _cache[key] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return _cache[key]


def _check_counts(warmup: int, rep: int) -> None:
    if warmup < 0 or rep < 1:
        raise ValueError(f"need warmup >= 0 and rep >= 1, got warmup={warmup}, rep={rep}")


def bench_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 10,
             flush_l2: bool = False) -> Dict[str, float]:
    """Time ``fn``: ``warmup`` untimed calls, then ``rep`` timed calls (ms; median, 20/80 % quantiles, min).

    Args:
        fn: the call to time (no arguments).
        device: where it runs; CUDA calls are timed with CUDA events, CPU calls with ``time.perf_counter``.
        warmup: untimed calls first (the first call of a compiled callable belongs here, or to :func:`first_call_s`).
        rep: timed calls.
        flush_l2: CUDA only: overwrite a 256 MiB buffer before each timed call (not timed).
    Returns:
        dict with ``ms`` (median), ``ms_p20``, ``ms_p80``, ``ms_min`` and ``reps``.
    """
    _check_counts(warmup, rep)
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if device.type == "cuda":
        flush = _l2_buffer(device) if flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
        torch.cuda.synchronize(device)
        for start, end in events:
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


def bench_backward(make_out: Callable[[], torch.Tensor], device: torch.device, warmup: int = 3, rep: int = 10,
                   flush_l2: bool = False) -> Dict[str, float]:
    """Time the backward pass alone: ``make_out()`` (a forward recording a graph) runs untimed before every call,
    then ``out.backward(grad)`` is timed as in :func:`bench_fn` (the gradient tensor is made before the timer)."""
    _check_counts(warmup, rep)
    for _ in range(warmup):
        out = make_out()
        out.backward(torch.ones_like(out))
    times: List[float] = []
    flush = _l2_buffer(device) if (flush_l2 and device.type == "cuda") else None
    for _ in range(rep):
        out = make_out()
        grad = torch.ones_like(out)
        if device.type == "cuda":
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            out.backward(grad)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out.backward(grad)
            times.append((time.perf_counter() - t0) * 1e3)
    return _stats(times)


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one synchronised call of ``fn`` (use it for the first call: compilation, JIT, autotuning)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def first_call_and_error(fn: Callable, inputs, y_ref: torch.Tensor, device: torch.device,
                          grad_mode: Callable = torch.no_grad) -> "tuple[float, float]":
    """Time the first (compiling / JIT-ing / autotuning) call of ``fn(*inputs)`` synchronised, under ``grad_mode``, and
    return (seconds, max abs error of its output against ``y_ref``)."""
    box: Dict[str, torch.Tensor] = {}

    def call():
        with grad_mode():
            box["y"] = fn(*inputs)
    seconds = first_call_s(call, device)
    return seconds, (box.pop("y").float() - y_ref.float()).abs().max().item()


def skip_unavailable(op: str, provider: str, device: torch.device, info: Dict, rows: List[Dict]) -> None:
    """A provider this machine lacks: an error row on CUDA (where every provider must run), a printed skip on CPU."""
    if device.type == "cuda":
        rows.append({"op": op, "provider": provider, "error": f"provider {provider!r} not available on cuda", **info})
    else:
        print(f"[bench_{op}] provider {provider!r} not available on {device.type}; skipped")


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one call of ``fn`` in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# --------------------------------------------------------------------------------------------------------------- peaks
def measure_peaks(device: torch.device, smoke: bool = False) -> Dict[str, float]:
    """Peaks measured on this device in this process (cached): a large GEMM and a device-to-device copy.

    CUDA: bf16 GEMM 8192^3 (TFLOP/s) and a copy of 1 GiB (read + write bytes per second). CPU: fp32 GEMM 1024^3 and
    a 256 MiB copy (``smoke``: 256^3 and 16 MiB). Achieved kernel throughputs are reported as fractions of these.
    """
    key = ("peaks", str(device), smoke)
    if key in _cache:
        return _cache[key]
    if device.type == "cuda":
        n, dtype, copy_bytes, warmup, rep = 8192, torch.bfloat16, 2**30, 5, 20
    else:
        n, dtype, copy_bytes, warmup, rep = (256, torch.float32, 16 * 2**20, 1, 3) if smoke else \
            (1024, torch.float32, 256 * 2**20, 2, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_gemm = bench_fn(lambda: torch.mm(a, b), device, warmup=warmup, rep=rep)
    del a, b
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t_copy = bench_fn(lambda: dst.copy_(src), device, warmup=warmup, rep=rep)
    del src, dst
    res = {
        "gemm_n": n, "gemm_dtype": str(dtype).replace("torch.", ""), "gemm_ms": t_gemm["ms"],
        "peak_tflops": 2.0 * n ** 3 / (t_gemm["ms"] * 1e-3) / 1e12,
        "copy_mib": copy_bytes / 2**20, "copy_ms": t_copy["ms"],
        "peak_gbs": 2.0 * copy_bytes / (t_copy["ms"] * 1e-3) / 1e9,
    }
    _cache[key] = res
    return res


# ------------------------------------------------------------------------------------------------------------ compiling
def compile_backend(device: torch.device, smoke: bool = False) -> str:
    """torch.compile backend of the benchmarks: inductor, except ``eager`` (dynamo capture only) in CPU smoke runs,
    where inductor's C++ codegen would dominate a run meant to check the harness."""
    if device.type == "cpu" and smoke:
        return "eager"
    return "inductor"


def fresh_compile(obj: Any, backend: str = "inductor") -> Any:
    """``torch.compile(obj, dynamic=False)`` after ``torch._dynamo.reset()`` (and cleared dynamo counters): every
    shape gets its own compilation, nothing compiled before is reused."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(obj, backend=backend, dynamic=False)


def compile_stats() -> Dict[str, int]:
    """Graphs captured and graph breaks since the last :func:`fresh_compile`."""
    counters = torch._dynamo.utils.counters
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached blocks to the driver (CUDA only: between providers, so that one provider's
    leftovers do not count in the next one's peak memory)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------------------- errors
def error_text(exc: BaseException, limit: int = 300) -> str:
    """One line naming an exception (for the ``error`` column of a row)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:limit]


def error_rows(rows: Iterable[Dict]) -> List[Dict]:
    """The rows that record a failure (a non-empty ``error`` field)."""
    return [r for r in rows if str(r.get("error", "") or "").strip()]


# -------------------------------------------------------------------------------------------------------------- output
def write_rows(name: str, rows: Iterable[Dict], out_dir: Optional[str] = None,
               cols: Optional[List[str]] = None, title: Optional[str] = None,
               replace_run: Optional[str] = None) -> str:
    """Add rows to ``<out_dir>/<name>.csv`` and write ``<name>.json`` and ``<name>.md`` (of these rows).

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
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)
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
