"""Benchmark of the folded depthwise shift-sum (+bias, ReLU): extension vs Triton vs eager vs torch.compile(eager).

Shapes: the deployed conv layers of DeiT-S/B (N = 197 tokens -> 14x14 grid, d = 64; the shift-sum does not depend
on C), batch 1/64/256, T = 9 (3x3) and T = 1 (1x1); bf16 on CUDA, fp32 on CPU (2 threads).
Modes: ``fwd`` (y = shift_sum(planes)) and ``bwd`` (gradient of planes and bias from a given output gradient).
The op is memory-bound; ``bw_frac`` = achieved bytes/s over the device-to-device copy bandwidth measured in this run
(``bench.common.measure_peaks``). Bytes: fwd reads B*P*T*d + writes B*P*d elements; bwd reads grad and y (2*B*P*d)
and writes B*P*T*d. The compiled provider is compiled afresh (dynamo reset) for every shape and mode; the first call
of every provider and shape is timed apart (``first_call_s``). A provider that fails gives a row with its ``error``.

Usage: ``python bench/bench_shift_sum.py [--quick] [--out DIR] [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (bench_fn, compile_backend, default_device, env_info, error_text, first_call_s,  # noqa: E402
                          fresh_compile, measure_peaks, skip_unavailable, write_rows)
from spvit_kernels import _ext, reference  # noqa: E402

GRID = (14, 14)
D = 64


def setup_ext(device: torch.device) -> Optional[Callable]:
    if not _ext.has_op("shift_sum"):
        return None
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("spvit::shift_sum", "CUDA"):
        return None
    from spvit_kernels.shift_sum import shift_sum_ext
    return shift_sum_ext


def setup_triton(device: torch.device) -> Optional[Callable]:
    if device.type != "cuda":
        return None  # the CPU interpreter is for tests, not timings
    from spvit_kernels.shift_sum import shift_sum_triton
    return shift_sum_triton


def setup_eager(device: torch.device) -> Optional[Callable]:
    return reference.shift_sum


def setup_compile(device: torch.device, smoke: bool = False) -> Optional[Callable]:
    return fresh_compile(reference.shift_sum, compile_backend(device, smoke))


PROVIDERS: Dict[str, Callable[[torch.device], Optional[Callable]]] = {
    "ext": setup_ext, "triton": setup_triton, "eager": setup_eager, "compile": setup_compile,
}


def _bytes(mode: str, b: int, p: int, t: int, d: int, elem: int) -> int:
    if mode == "fwd":
        return (b * p * t * d + b * p * d + d) * elem
    return (2 * b * p * d + b * p * t * d) * elem + d * 4


def _setup(name: str, device: torch.device, quick: bool) -> Optional[Callable]:
    return PROVIDERS[name](device, quick) if name == "compile" else PROVIDERS[name](device)


def run(device: torch.device, quick: bool, providers: List[str], modes: List[str]) -> List[Dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = (1, 16) if (quick and device.type == "cpu") else ((1, 64) if quick else (1, 64, 256))
    info = env_info(device)
    peaks = measure_peaks(device, smoke=quick)
    warmup, rep = (2, 10) if quick else (3, 20)
    rows = []
    p = GRID[0] * GRID[1]
    for name in providers:
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}; expected some of {list(PROVIDERS)}")
        if _setup(name, device, quick) is None:
            skip_unavailable("shift_sum", name, device, info, rows)
            continue
        for t in (9, 1):
            for b in batches:
                planes = torch.randn(b, p, t, D, device=device, dtype=dtype)
                bias = torch.randn(D, device=device, dtype=dtype)
                for mode in modes:
                    row = {"op": "shift_sum", "provider": name, "mode": mode, "B": b, "N": p + 1, "grid": "14x14",
                           "d": D, "T": t, "dtype": str(dtype).replace("torch.", ""), "error": ""}
                    # a fresh provider per shape and mode: the compiled one compiles anew every time
                    fn = _setup(name, device, quick)
                    try:
                        if mode == "fwd":
                            def call(fn=fn, planes=planes, bias=bias):
                                with torch.no_grad():
                                    return fn(planes, bias, GRID, True)
                        else:
                            leaf = planes.clone().requires_grad_()
                            bleaf = bias.clone().requires_grad_()
                            y = fn(leaf, bleaf, GRID, True)
                            g = torch.randn_like(y)

                            def call(y=y, leaf=leaf, bleaf=bleaf, g=g):
                                return torch.autograd.grad(y, [leaf, bleaf], g, retain_graph=True)
                        first = first_call_s(call, device)
                        timing = bench_fn(call, device, warmup=warmup, rep=rep, flush_l2=True)
                    except Exception as exc:  # noqa: BLE001 - recorded in the row (the run then fails)
                        row["error"] = error_text(exc)
                        rows.append({**row, **info})
                        print(f"[bench_shift_sum] {name} {mode} B={b} T={t} failed: {row['error']}")
                        continue
                    nbytes = _bytes(mode, b, p, t, D, planes.element_size())
                    gbs = nbytes / (timing["ms"] * 1e-3) / 1e9
                    row.update({**timing, "first_call_s": first, "GB/s": gbs, "bw_frac": gbs / peaks["peak_gbs"]})
                    rows.append({**row, **info})
                    print(f"{name:8s} {mode} T={t} B={b:4d}: {timing['ms']:.4f} ms  {gbs:8.1f} GB/s "
                          f"({100 * gbs / peaks['peak_gbs']:.0f}% of the measured copy bandwidth)")
    return rows


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--providers", default=None, help="comma list of ext,triton,eager,compile")
    ap.add_argument("--modes", default="fwd,bwd", help="comma list of fwd,bwd")
    args = ap.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cpu":
        torch.set_num_threads(2)
    if args.providers:
        providers = args.providers.split(",")
    elif device.type == "cpu" and args.quick:
        providers = ["ext", "eager", "compile"]  # compile: dynamo capture only (the eager backend) in a quick CPU run
    else:
        providers = list(PROVIDERS)
    rows = run(device, args.quick, providers, args.modes.split(","))
    path = write_rows("bench_shift_sum", rows, args.out)
    print(f"[bench_shift_sum] {len(rows)} rows -> {path}")
    return rows


if __name__ == "__main__":
    main()
