"""Deploy-mode compact FFN (spvit_kernels.pruned_ffn), inference: time, TFLOP/s, roofline fraction, peak memory.

Providers (one ``setup_<provider>`` each):
  ours              Triton fc1+bias+GELU kernel and Triton fc2+bias kernel (the default)
  ours_fc2_cublas   Triton fc1 kernel, cuBLAS fc2 (to settle the fc2 choice)
  eager             reference.pruned_ffn in eager PyTorch
  compiled          torch.compile(reference.pruned_ffn) (inductor; dynamo only in CPU --quick runs)
Mode: forward (under torch.inference_mode).

Shapes: DeiT-S (C 384) and DeiT-B (C 768) with compacted hidden widths (1118, 489, 2234, and an aligned 1536),
N = 197, B = 128/256, bf16 on CUDA. Without a GPU, ``--quick`` runs a tiny fp32 CPU configuration; the Triton
providers then need TRITON_INTERPRET=1 (set before start) and are skipped with a message otherwise.

python bench/bench_pruned_ffn.py --out bench/results [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (bench_fn, compile_backend, default_device, env_info, error_text,  # noqa: E402
                          first_call_and_error, fresh_compile, measure_peaks, peak_memory_mb, write_rows)
from spvit_kernels import reference  # noqa: E402

PROVIDERS = ("ours", "ours_fc2_cublas", "eager", "compiled")
MODES = ("forward",)
# name, B, N, C, F
GPU_CONFIGS = [("deit_s", 128, 197, 384, 1118), ("deit_s", 128, 197, 384, 489), ("deit_s", 256, 197, 384, 1118),
               ("deit_b", 128, 197, 768, 2234), ("deit_b", 128, 197, 768, 1536), ("deit_b", 256, 197, 768, 2234)]
QUICK_CONFIGS = [("tiny", 2, 65, 64, 37)]


def triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def setup_ours(device, fc2="triton"):
    from spvit_kernels.pruned_ffn import pruned_ffn_with_fc2
    return lambda *args: pruned_ffn_with_fc2(*args, fc2=fc2)


def setup_ours_fc2_cublas(device):
    return setup_ours(device, fc2="cublas")


def setup_eager(device):
    return reference.pruned_ffn


def setup_compiled(device, smoke=False):
    return fresh_compile(reference.pruned_ffn, compile_backend(device, smoke))


def make_inputs(b, n, c, f, dtype, device):
    x = torch.randn(b, n, c, device=device, dtype=dtype)
    w1 = (torch.randn(f, c, device=device) / c ** 0.5).to(dtype)
    b1 = (0.1 * torch.randn(f, device=device)).to(dtype)
    w2 = (torch.randn(c, f, device=device) / f ** 0.5).to(dtype)
    b2 = (0.1 * torch.randn(c, device=device)).to(dtype)
    return [x, w1, b1, w2, b2]


def gemm_flops(b, n, c, f, mode):
    """Dense GEMM FLOPs (2 per MAC) of fc1 + fc2 at the compact width."""
    return 4.0 * b * n * c * f


def bench_one(fn, inputs, mode, device):
    def call():
        with torch.inference_mode():
            return fn(*inputs)
    return bench_fn(call, device), peak_memory_mb(call, device)


def run(configs, device, dtype, providers, modes, smoke=False):
    rows = []
    env = env_info(device)
    peak = measure_peaks(device, smoke=smoke)["peak_tflops"]
    for name, b, n, c, f in configs:
        inputs = make_inputs(b, n, c, f, dtype, device)
        with torch.inference_mode():
            y_ref = reference.pruned_ffn(*inputs)
        for prov in providers:
            if prov.startswith("ours") and not triton_usable(device):
                print(f"[skip] {prov}: Triton needs a CUDA device or TRITON_INTERPRET=1 on CPU")
                continue
            try:
                # a fresh setup per shape: the compiled provider compiles anew (dynamo reset) for every configuration
                fn = setup_compiled(device, smoke) if prov == "compiled" else globals()[f"setup_{prov}"](device)
                # compilation / Triton JIT, timed apart; the first output's error against the eager reference
                first_s, err = first_call_and_error(fn, inputs, y_ref, device, torch.inference_mode)
                for mode in modes:
                    t, mem = bench_one(fn, inputs, mode, device)
                    tflops = gemm_flops(b, n, c, f, mode) / (t["ms"] * 1e-3) / 1e12
                    row = dict(op="pruned_ffn", config=name, B=b, N=n, C=c, F=f,
                               dtype=str(dtype).replace("torch.", ""), provider=prov, mode=mode, **t,
                               tflops=tflops, frac_of_peak=tflops / peak,
                               peak_mem_mb=mem, first_call_s=first_s, max_abs_err_vs_eager=err, **env)
                    rows.append(row)
                    print(f"{name:7s} B={b:<4d} F={f:<5d} {prov:16s} {mode:8s} {t['ms']:9.3f} ms  "
                          f"{tflops:7.2f} TFLOP/s "
                          f"({100 * tflops / peak:5.1f}% of the measured GEMM peak)  mem {mem}  err {err:.2e}")
            except Exception as exc:  # noqa: BLE001 - recorded in a row (the run then fails)
                rows.append(dict(op="pruned_ffn", config=name, B=b, N=n, C=c, F=f,
                                 dtype=str(dtype).replace("torch.", ""),
                                 provider=prov, error=error_text(exc), **env))
                print(f"{name:7s} B={b:<4d} {prov:16s} failed: {rows[-1]['error']}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--quick", action="store_true", help="tiny configuration (the only one on CPU)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda":
        configs, dtype = (GPU_CONFIGS[:1] if args.quick else GPU_CONFIGS), torch.bfloat16
    else:
        if not args.quick:
            print("no CUDA device: running the --quick CPU configuration")
        configs, dtype = QUICK_CONFIGS, torch.float32
    torch.manual_seed(0)
    rows = run(configs, device, dtype, args.providers.split(","), args.modes.split(","), smoke=args.quick)
    path = write_rows("pruned_ffn", rows, args.out)
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
