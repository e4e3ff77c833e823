"""Benchmark of the search-mode attention/conv layer: fused (ours) vs eager reference vs torch.compile(reference).

Modes: ``forward`` (training forward, graph recorded), ``backward`` (backward only, a fresh forward before each
timed call), ``full`` (forward + backward). Shapes: one DeiT-Ti/S/B attention layer (N = 197, d = 64) at batch 128
and 256 in bf16 on CUDA, and the windowed layer of Swin-T (docs/method.md §7.2: batch rows are 7x7 windows of 49
tokens, no class token, alpha 100, an additive attention bias that needs a gradient): stage 1 (C 96, h 3, 64 windows
per image, relative position bias only, G = 1) and stage 3 (C 384, h 12, 4 windows per image, shifted: bias plus
mask, G = 4), with ``--batches`` counting images (B = images x windows in the rows). All in training mode with gates
that need a gradient (every candidate is evaluated, as in the search). Throughput is reported against a FLOP and
byte model of the fused algorithm (see ``_model``): achieved TFLOP/s and GB/s, which roof binds and the fraction of
it reached, the roofs being the peaks measured in this run on this device (a large GEMM and a device-to-device copy:
``bench.common.measure_peaks``). The compiled provider is compiled afresh (dynamo reset) for every shape.

``--quick`` runs two tiny configurations, one with a class token and one windowed with a grouped bias (fp32 on CPU;
a smoke test; the Triton provider runs on CPU only under ``TRITON_INTERPRET=1`` and is skipped otherwise, with a
message).

Usage:
    python bench/bench_gated_attn_conv.py [--out DIR] [--quick] [--providers ours,eager,compiled]
        [--modes forward,backward,full] [--choices msa,3x3,1x1] [--batches 128,256]
        [--models ti,s,b,swin_t1,swin_t3]
"""
import argparse
import importlib
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (bench_backward, bench_fn, compile_backend, default_device, env_info,  # noqa: E402
                          fresh_compile, measure_peaks, peak_memory_mb, write_rows)
from spvit_kernels import reference  # noqa: E402

MODELS = {"ti": (192, 3), "s": (384, 6), "b": (768, 12)}  # C, heads (d = 64)
# Swin-T windowed layers: C, heads, windows per image, bias groups G (1: relative position bias; n_win: + shift mask)
SWIN = {"swin_t1": (96, 3, 64, 1), "swin_t3": (384, 12, 4, 4)}
SWIN_LABELS = {"swin_t1": "swin_t-s1", "swin_t3": "swin_t-s3-shift"}
GATES = {"msa": (1.0, 1.0, 1.0), "3x3": (1.0, 1.0, 0.0), "1x1": (1.0, 0.0, 0.0), "skip": (0.0, 0.0, 0.0)}


def _model(bsz: int, n: int, c: int, h: int, d: int, prefix: int, choice: str, mode: str, elem: int):
    """(FLOPs, bytes) of the fused algorithm for one call (multiply-add = 2 FLOPs; main tensors only).

    Forward: [Wqk; Wv] projection, attention (QK^T and AV), output projection, head mixing of the 9 taps, the
    live conv's output map. Backward of a live MSA: twice its forward GEMM work; of a live conv: the dr GEMM for
    both convs, dR, dWv and dx, the adjoint mixing. Bytes: x, qkv, o, out, the fp32 conv responses, gradients.
    """
    p = n - prefix
    hd = h * d
    proj = 3 * bsz * n * c * hd
    attn = 2 * bsz * h * n * n * d
    outp = bsz * n * hd * c
    mix = 10 * bsz * p * hd
    conv_map = bsz * n * d * c if choice in ("3x3", "1x1") else 0
    fwd_mac = proj + attn + outp + mix + conv_map
    fwd_bytes = elem * (bsz * n * c + 2 * 3 * bsz * n * hd + 2 * bsz * n * hd + 2 * bsz * n * c) + 4 * 2 * bsz * p * d
    if choice == "msa":
        bwd_mac = 2 * (proj + attn + outp) + attn // 2 + bsz * n * c * 2 * d  # + recomputed P in flash bwd
        bwd_bytes = elem * (3 * bsz * n * c + 4 * 3 * bsz * n * hd + 2 * bsz * n * hd)
    else:
        bwd_mac = bsz * n * c * 2 * d + bsz * n * c * d + 2 * mix + 2 * bsz * n * c * hd
        bwd_bytes = elem * (3 * bsz * n * c + 3 * bsz * n * hd) + 4 * 4 * bsz * p * d
    if mode == "forward":
        return 2 * fwd_mac, fwd_bytes
    if mode == "backward":
        return 2 * bwd_mac, bwd_bytes
    return 2 * (fwd_mac + bwd_mac), fwd_bytes + bwd_bytes


def _inputs(bsz: int, grid, prefix: int, c: int, h: int, d: int, device, dtype):
    n = prefix + grid[0] * grid[1]
    hd = h * d
    s = c ** -0.5

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    x = torch.randn(bsz, n, c, device=device, dtype=dtype).requires_grad_()
    params = [p(2 * hd, c, scale=s), p(2 * hd, scale=0.1), p(hd, c, scale=s), p(hd, scale=0.1), p(c, hd, scale=s),
              p(c, scale=0.1), (1 + 0.02 * torch.randn(h, 9, device=device)).requires_grad_()]
    bns = [reference.BNState(torch.ones(d, device=device, requires_grad=True),
                             torch.zeros(d, device=device, requires_grad=True),
                             torch.zeros(d, device=device), torch.ones(d, device=device)) for _ in range(2)]
    return x, params, bns


def _attn_bias(groups: int, h: int, n: int, device, dtype) -> Optional[torch.Tensor]:
    """(G, h, N, N) additive logits that need a gradient (G = 0: none). Shifted layouts (G > 1) get -100 between
    random token groups, like a shift mask."""
    if not groups:
        return None
    bias = 0.5 * torch.randn(groups, h, n, n, device=device)
    if groups > 1:
        labels = torch.randint(0, 2, (groups, n), device=device)
        bias = bias + (labels[:, None, :, None] != labels[:, None, None, :]).float() * -100.0
    return bias.to(dtype).requires_grad_()


def _providers(device: torch.device, wanted: List[str], smoke: bool = False) -> Dict[str, Optional[Callable]]:
    out: Dict[str, Optional[Callable]] = {}
    for name in wanted:
        if name == "ours":
            if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
                print("[bench_gated_attn_conv] skipping provider 'ours' on CPU: Triton kernels need CUDA or "
                      "TRITON_INTERPRET=1 (set it before starting Python)")
                out[name] = None
                continue
            out[name] = importlib.import_module("spvit_kernels.gated_attn_conv").gated_attn_conv
        elif name == "eager":
            out[name] = reference.gated_attn_conv
        elif name == "compiled":
            out[name] = fresh_compile(reference.gated_attn_conv, compile_backend(device, smoke))
        else:
            raise ValueError(f"unknown provider {name!r}")
    return out


def run(configs, providers, modes, choices, device, dtype, warmup: int, rep: int, smoke: bool = False) -> List[Dict]:
    rows: List[Dict] = []
    env = env_info(device)
    peaks = measure_peaks(device, smoke=smoke)
    roof_tflops, roof_gbs = peaks["peak_tflops"], peaks["peak_gbs"]
    elem = torch.finfo(dtype).bits // 8
    for label, bsz, grid, prefix, c, h, d, groups, alpha in configs:
        fns = _providers(device, providers, smoke)  # per shape: a fresh compilation for the compiled provider
        n = prefix + grid[0] * grid[1]
        x, params, bns = _inputs(bsz, grid, prefix, c, h, d, device, dtype)
        bias = _attn_bias(groups, h, n, device, dtype)
        for choice in choices:
            gates = torch.tensor(GATES[choice], device=device, requires_grad=True)
            for prov, fn in fns.items():
                if fn is None:
                    continue

                def fwd(fn=fn, gates=gates):
                    return fn(x, *params[:6], params[6], bns[0], bns[1], gates, num_heads=h, alpha=alpha, grid=grid,
                              training=True, num_prefix_tokens=prefix, attn_bias=bias)

                def full(fwd=fwd):
                    out = fwd()
                    out.backward(torch.ones_like(out))

                for mode in modes:
                    try:
                        if mode == "forward":
                            t = bench_fn(fwd, device, warmup=warmup, rep=rep)
                            mem = peak_memory_mb(fwd, device)
                        elif mode == "backward":
                            t = bench_backward(fwd, device, warmup, rep)
                            mem = peak_memory_mb(full, device)
                        else:
                            t = bench_fn(full, device, warmup=warmup, rep=rep)
                            mem = peak_memory_mb(full, device)
                        err = ""
                    except Exception as exc:  # noqa: BLE001  (report and go on: e.g. compile unavailable)
                        t, mem, err = {"ms": float("nan"), "ms_p20": float("nan"), "ms_p80": float("nan")}, None, \
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    for prm in params + [x, gates] + [b.weight for b in bns] + [b.bias for b in bns] + [bias]:
                        if prm is not None:
                            prm.grad = None
                    flops, nbytes = _model(bsz, n, c, h, d, prefix, choice, mode, elem)
                    tflops = flops / (t["ms"] * 1e-3) / 1e12
                    gbps = nbytes / (t["ms"] * 1e-3) / 1e9
                    bound = "compute" if flops / nbytes > roof_tflops * 1e3 / roof_gbs else "memory"
                    frac = tflops / roof_tflops if bound == "compute" else gbps / roof_gbs
                    row = {"op": "gated_attn_conv", "provider": prov, "mode": mode, "config": label, "choice": choice,
                           "B": bsz, "N": n, "C": c, "heads": h, "d": d, "dtype": str(dtype).replace("torch.", ""),
                           "ms": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"], "tflops": tflops,
                           "gbps": gbps, "bound": bound, "frac_of_peak": frac, "peak_mem_mb": mem,
                           "error": err, **env}
                    rows.append(row)
                    print(f"{label:>12} {choice:>4} {prov:>8} {mode:>8}: {t['ms']:9.3f} ms  {tflops:7.2f} TFLOP/s  "
                          f"{gbps:8.1f} GB/s  ({bound}, {100 * frac:.1f}% of the measured peak)"
                          + (f"  mem {mem:.0f} MiB" if mem is not None else "") + (f"  [{err}]" if err else ""))
    return rows


def main(argv=None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--providers", default=None, help="comma list of ours,eager,compiled")
    ap.add_argument("--modes", default="forward,backward,full")
    ap.add_argument("--choices", default=None, help="gate choices (msa,3x3,1x1,skip)")
    ap.add_argument("--batches", default="128,256")
    ap.add_argument("--models", default="ti,s,b,swin_t1,swin_t3")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    device = torch.device(args.device) if args.device else default_device()
    if args.quick:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        configs = [("quick", 2, (4, 4), 1, 32, 2, 16, 0, 0.01), ("quick-window", 8, (3, 3), 0, 32, 2, 16, 4, 100.0)]
        providers = (args.providers or "ours,eager,compiled").split(",")
        choices = (args.choices or "msa,3x3").split(",")
        warmup, rep = 1, 3
    else:
        if device.type != "cuda":
            raise SystemExit("bench_gated_attn_conv: the full benchmark needs a CUDA GPU (use --quick on CPU)")
        dtype = torch.bfloat16
        configs = []
        for m in args.models.split(","):
            if m not in MODELS and m not in SWIN:
                raise SystemExit(f"bench_gated_attn_conv: unknown model {m!r}; expected one of "
                                 f"{', '.join(list(MODELS) + list(SWIN))}")
            for b in (int(v) for v in args.batches.split(",")):
                if m in MODELS:
                    c, h = MODELS[m]
                    configs.append((f"deit-{m}", b, (14, 14), 1, c, h, 64, 0, 0.01))
                else:
                    c, h, n_win, groups = SWIN[m]
                    configs.append((SWIN_LABELS[m], b * n_win, (7, 7), 0, c, h, c // h, groups, 100.0))
        providers = (args.providers or "ours,eager,compiled").split(",")
        choices = (args.choices or "msa,3x3,1x1").split(",")
        warmup, rep = 3, 20
    torch.manual_seed(0)
    rows = run(configs, providers, modes, choices, device, dtype, warmup, rep, smoke=args.quick)
    path = write_rows("gated_attn_conv", rows, args.out)
    print(f"[bench_gated_attn_conv] wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
