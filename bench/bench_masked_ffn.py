"""Search-mode masked FFN (spvit_kernels.masked_ffn): time, TFLOP/s, roofline fraction and peak memory.

Providers (one ``setup_<provider>`` each):
  ours              Triton fc1+bias+GELU+mask kernel, cuBLAS fc2; fused backward kernel (gate + bias grads)
  ours_fc2_triton   the same with fc2 on the Triton GEMM kernel too (to settle the fc2 choice)
  eager             reference.masked_ffn in eager PyTorch
  compiled          torch.compile(reference.masked_ffn) (inductor; dynamo only in CPU --quick runs)
Modes: forward, backward (autograd.grad of a retained graph), full (forward + backward).

Shapes: DeiT-S (C 384, F 1536) and DeiT-B (C 768, F 3072), N = 197, B = 128/256, half the units masked, bf16 on
CUDA. Without a GPU, ``--quick`` runs a tiny fp32 CPU configuration; the Triton providers then need
TRITON_INTERPRET=1 (set before start) and are skipped with a message otherwise.

python bench/bench_masked_ffn.py --out bench/results [--quick]
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

PROVIDERS = ("ours", "ours_fc2_triton", "eager", "compiled")
MODES = ("forward", "backward", "full")
# name, B, N, C, F
GPU_CONFIGS = [("deit_s", 128, 197, 384, 1536), ("deit_s", 256, 197, 384, 1536),
               ("deit_b", 128, 197, 768, 3072), ("deit_b", 256, 197, 768, 3072)]
QUICK_CONFIGS = [("tiny", 2, 65, 64, 100)]


def triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def setup_ours(device, fc2="cublas"):
    from spvit_kernels.masked_ffn import masked_ffn_with_fc2
    return lambda *args: masked_ffn_with_fc2(*args, fc2=fc2)


def setup_ours_fc2_triton(device):
    return setup_ours(device, fc2="triton")


def setup_eager(device):
    return reference.masked_ffn


def setup_compiled(device, smoke=False):
    return fresh_compile(reference.masked_ffn, compile_backend(device, smoke))


def make_inputs(b, n, c, f, dtype, device):
    x = torch.randn(b, n, c, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(f, c, device=device) / c ** 0.5).to(dtype).requires_grad_()
    b1 = (0.1 * torch.randn(f, device=device)).to(dtype).requires_grad_()
    w2 = (torch.randn(c, f, device=device) / f ** 0.5).to(dtype).requires_grad_()
    b2 = (0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_()
    mask = (torch.rand(f, device=device) < 0.5).float().requires_grad_()  # about half the units masked
    return [x, w1, b1, w2, b2, mask]


def gemm_flops(b, n, c, f, mode):
    """Dense GEMM FLOPs (2 per MAC): forward fc1 + fc2; backward dh, dx, dW1, dW2."""
    one = 2.0 * b * n * c * f
    return {"forward": 2 * one, "backward": 4 * one, "full": 6 * one}[mode]


def bench_one(fn, inputs, mode, device):
    dy = torch.randn_like(inputs[0])
    if mode == "forward":
        def call():
            with torch.no_grad():
                return fn(*inputs)
    elif mode == "backward":
        y = fn(*inputs)

        def call():
            return torch.autograd.grad(y, inputs, dy, retain_graph=True)
    else:
        def call():
            return torch.autograd.grad(fn(*inputs), inputs, dy)
    return bench_fn(call, device), peak_memory_mb(call, device)


def run(configs, device, dtype, providers, modes, smoke=False):
    rows = []
    env = env_info(device)
    peak = measure_peaks(device, smoke=smoke)["peak_tflops"]
    for name, b, n, c, f in configs:
        inputs = make_inputs(b, n, c, f, dtype, device)
        with torch.no_grad():
            y_ref = reference.masked_ffn(*inputs)
        for prov in providers:
            if prov.startswith("ours") and not triton_usable(device):
                print(f"[skip] {prov}: Triton needs a CUDA device or TRITON_INTERPRET=1 on CPU")
                continue
            try:
                # a fresh setup per shape: the compiled provider compiles anew (dynamo reset) for every configuration
                fn = setup_compiled(device, smoke) if prov == "compiled" else globals()[f"setup_{prov}"](device)
                # compilation / Triton JIT, timed apart; the first output's error against the eager reference
                first_s, err = first_call_and_error(fn, inputs, y_ref, device, torch.no_grad)
                for mode in modes:
                    t, mem = bench_one(fn, inputs, mode, device)
                    tflops = gemm_flops(b, n, c, f, mode) / (t["ms"] * 1e-3) / 1e12
                    row = dict(op="masked_ffn", config=name, B=b, N=n, C=c, F=f, kept=int(inputs[-1].sum().item()),
                               dtype=str(dtype).replace("torch.", ""), provider=prov, mode=mode, **t,
                               tflops=tflops, frac_of_peak=tflops / peak,
                               peak_mem_mb=mem, first_call_s=first_s, max_abs_err_vs_eager=err, **env)
                    rows.append(row)
                    print(f"{name:7s} B={b:<4d} {prov:16s} {mode:8s} {t['ms']:9.3f} ms  {tflops:7.2f} TFLOP/s "
                          f"({100 * tflops / peak:5.1f}% of the measured GEMM peak)  mem {mem}  err {err:.2e}")
            except Exception as exc:  # noqa: BLE001 - recorded in a row (the run then fails)
                rows.append(dict(op="masked_ffn", config=name, B=b, N=n, C=c, F=f,
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
    path = write_rows("masked_ffn", rows, args.out)
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
