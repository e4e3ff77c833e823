"""Benchmark of the deployed conv layer (BN folded, §10.4): fused Triton vs extension path vs eager vs compile.

Providers: ``triton`` (spvit_kernels.deploy_conv: one fused implicit-GEMM kernel), ``ext`` (projection GEMM ->
C++/CUDA shift-sum + bias + ReLU -> output GEMM), ``eager`` (reference.deploy_conv), ``compile``
(torch.compile(reference.deploy_conv)). Forward only (inference, under torch.inference_mode).
Shapes: DeiT-S (C 384) and DeiT-B (C 768) deployed layers, d = 64, N = 197 (14x14 grid + class token),
batch 1/64/256, T = 9 (3x3) and T = 1 (1x1); bf16 on CUDA, fp32 on CPU (2 threads).

Roofline: MACs = B*P*(T*d*C + d*C); minimal bytes = read x_hat + write out (B*N*C each) + weights;
t_min = max(2*MACs / peak FLOP/s, bytes / peak bytes/s) with the peaks measured in this run on this device (a large
GEMM and a device-to-device copy, ``bench.common.measure_peaks``); ``roofline_frac`` = t_min / t.
The compiled provider is compiled afresh (dynamo reset) for every shape; the first call of every provider and shape
(compilation, Triton autotuning at that batch) is timed apart (``first_call_s``). A provider that fails on a shape
gives a row with its ``error``.

Usage: ``python bench/bench_deploy_conv.py [--quick] [--out DIR] [--device cpu|cuda]``.
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
MODELS = {"deit_small": 384, "deit_base": 768}


def setup_triton(device: torch.device) -> Optional[Callable]:
    if device.type != "cuda":
        return None  # the CPU interpreter is for tests, not timings
    from spvit_kernels.deploy_conv import deploy_conv
    return deploy_conv


def setup_ext(device: torch.device) -> Optional[Callable]:
    if not _ext.has_op("shift_sum"):
        return None
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("spvit::shift_sum", "CUDA"):
        return None
    from spvit_kernels.shift_sum import deploy_conv_ext
    return deploy_conv_ext


def setup_eager(device: torch.device) -> Optional[Callable]:
    return reference.deploy_conv


def setup_compile(device: torch.device, smoke: bool = False) -> Optional[Callable]:
    return fresh_compile(reference.deploy_conv, compile_backend(device, smoke))


PROVIDERS: Dict[str, Callable[[torch.device], Optional[Callable]]] = {
    "triton": setup_triton, "ext": setup_ext, "eager": setup_eager, "compile": setup_compile,
}


def roofline(b: int, c: int, t: int, elem: int, peaks: Optional[Dict[str, float]] = None, grid=GRID,
             d: int = D) -> Dict[str, float]:
    """Work model of one layer call: GMACs, minimal MB moved and (with ``peaks``) the roofline time in ms."""
    p = grid[0] * grid[1]
    n = p + 1
    macs = b * p * (t * d * c + d * c)
    nbytes = (2 * b * n * c + (t * d + d) * c + d + c) * elem
    res = {"gmac": macs / 1e9, "min_MB": nbytes / 1e6}
    if peaks:
        t_min = max(2 * macs / (peaks["peak_tflops"] * 1e12), nbytes / (peaks["peak_gbs"] * 1e9))
        res["t_min_ms"] = t_min * 1e3
    return res


def _setup(name: str, device: torch.device, quick: bool) -> Optional[Callable]:
    return PROVIDERS[name](device, quick) if name == "compile" else PROVIDERS[name](device)


def run(device: torch.device, quick: bool, providers: List[str]) -> List[Dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        batches, models = ((1, 8), ["deit_small"]) if quick else ((1, 8, 64), list(MODELS))
    else:
        batches, models = ((1, 64), list(MODELS)) if quick else ((1, 64, 256), list(MODELS))
    info = env_info(device)
    peaks = measure_peaks(device, smoke=quick)
    warmup, rep = (2, 10) if quick else (3, 20)
    rows = []
    p = GRID[0] * GRID[1]
    for name in providers:
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}; expected some of {list(PROVIDERS)}")
        if _setup(name, device, quick) is None:
            skip_unavailable("deploy_conv", name, device, info, rows)
            continue
        for model in models:
            c = MODELS[model]
            for t in (9, 1):
                w_planes = (torch.randn(t * D, c, device=device) / c ** 0.5).to(dtype)
                b_fold = (torch.randn(D, device=device) * 0.1).to(dtype)
                w_out = (torch.randn(c, D, device=device) / D ** 0.5).to(dtype)
                b_out = (torch.randn(c, device=device) * 0.1).to(dtype)
                for b in batches:
                    x = torch.randn(b, p + 1, c, device=device, dtype=dtype)
                    row = {"op": "deploy_conv", "provider": name, "model": model, "B": b, "N": p + 1, "C": c, "d": D,
                           "T": t, "dtype": str(dtype).replace("torch.", ""), "error": ""}
                    # a fresh provider per shape: the compiled one compiles anew, nothing is reused across shapes
                    fn = _setup(name, device, quick)

                    def call(fn=fn, x=x, w_planes=w_planes, b_fold=b_fold, w_out=w_out, b_out=b_out):
                        with torch.inference_mode():
                            return fn(x, w_planes, b_fold, w_out, b_out, GRID, 1)
                    try:
                        first = first_call_s(call, device)
                        timing = bench_fn(call, device, warmup=warmup, rep=rep, flush_l2=True)
                    except Exception as exc:  # noqa: BLE001 - recorded in the row (the run then fails)
                        row["error"] = error_text(exc)
                        rows.append({**row, **info})
                        print(f"[bench_deploy_conv] {name} {model} B={b} T={t} failed: {row['error']}")
                        continue
                    rl = roofline(b, c, t, x.element_size(), peaks)
                    tflops = 2 * rl["gmac"] * 1e9 / (timing["ms"] * 1e-3) / 1e12
                    row.update({**timing, "first_call_s": first, "TFLOP/s": tflops, **rl,
                                "roofline_frac": rl["t_min_ms"] / timing["ms"]})
                    rows.append({**row, **info})
                    print(f"{name:8s} {model} T={t} B={b:4d}: {timing['ms']:.4f} ms  {tflops:7.3f} TFLOP/s  "
                          f"({100 * rl['t_min_ms'] / timing['ms']:.0f}% of the measured roofline)")
    return rows


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--providers", default=None, help="comma list of triton,ext,eager,compile")
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
    rows = run(device, args.quick, providers)
    path = write_rows("bench_deploy_conv", rows, args.out)
    print(f"[bench_deploy_conv] {len(rows)} rows -> {path}")
    return rows


if __name__ == "__main__":
    main()
