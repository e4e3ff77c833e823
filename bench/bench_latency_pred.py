"""How well a latency table predicts the latency of deployed SPViT models.

For each model and batch size: profile the table (``spvit.latency.profile``), then deploy (random weights: the
latency does not depend on them) the published architectures of that model (``spvit.models.registry.SHIPPED``) and
``--random`` random architectures (attention choice uniform over MSA / 3x3 / 1x1 / skip, FFN widths uniform in
[0, full], unaligned so that the interpolation is exercised), measure each whole deployed model with the table's
clock and statistic, and report the prediction error ``predicted / measured - 1``; the summary is the median
absolute error per (model, batch).

    PYTHONPATH=. python bench/bench_latency_pred.py                                   # CPU: fp32, 2 threads
    PYTHONPATH=. python bench/bench_latency_pred.py --device cuda --dtype bf16 --batches 64 256
    PYTHONPATH=. python bench/bench_latency_pred.py --models swin_tiny_patch4_window7_224 --batches 1   # Swin

Adds the run (with its ``--tag``, device, versions, date and run id) to bench/results/latency_pred_<cpu|cuda>.json
and prints its tables. A whole-pipeline measurement (profiling, deployment, whole-model timing with the table's own
clock), not a microbenchmark: it stays a script, outside the pytest-benchmark suite.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append_run, env_info, markdown_table  # noqa: E402
from spvit import latency as L  # noqa: E402
from spvit.arch import Architecture, BlockArch  # noqa: E402
from spvit.choices import ATTN_CHOICES  # noqa: E402
from spvit.deploy import deploy  # noqa: E402
from spvit.flops import arch_macs  # noqa: E402
from spvit.models import prune  # noqa: E402
from spvit.models.convert import signature_of  # noqa: E402
from spvit.models.registry import SHIPPED, SHIPPED_SWIN, shipped_architecture  # noqa: E402


def random_arch(name: str, sig, rng: random.Random) -> Architecture:
    blocks = [BlockArch(rng.choice(ATTN_CHOICES), tuple(range(rng.randint(0, hidden))))
              for hidden in sig.block_mlp_hidden]
    return Architecture(name, sig, blocks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(L.DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", default="wall", choices=L.CLOCKS)
    ap.add_argument("--stat", default="median", choices=sorted(L.STATS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--context", type=int, default=4, help="blocks around each timed piece (0: pieces alone)")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per piece in the profile")
    ap.add_argument("--random", type=int, default=4, help="random architectures per (model, batch)")
    ap.add_argument("--no-shipped", dest="shipped", action="store_false")
    ap.add_argument("--skip", nargs="*", default=[], help="model:batch pairs to leave out (e.g. the slow ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="label of the run in the results file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = L.DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    rows, summary = [], []
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    for name in args.models:
        base = timm.create_model(name, pretrained=False)
        sig = signature_of(base)
        archs = []
        if args.shipped:
            archs += [(k, shipped_architecture(k, base)) for k, v in {**SHIPPED, **SHIPPED_SWIN}.items()
                      if v[0] == name]
        rng = random.Random(args.seed)
        archs += [(f"random{i}", random_arch(name, sig, rng)) for i in range(args.random)]
        for batch in args.batches:
            if f"{name}:{batch}" in args.skip:
                continue
            t0 = time.perf_counter()
            table = L.profile(base, device=device, dtype=dtype, batch=batch, threads=args.threads,
                              budget_s=args.budget, stat=args.stat, clock=args.clock, rounds=args.rounds,
                              context=args.context, model_name=name, show=False)
            prof_s = time.perf_counter() - t0
            print(table.summary(), f"\n  ({prof_s:.0f} s)", flush=True)
            errs = []
            dense_arch = Architecture(name, sig, [BlockArch("msa", tuple(range(h))) for h in sig.block_mlp_hidden])
            for label, arch in [("dense", dense_arch)] + archs:
                dep = deploy(prune(base, arch), dtype=dtype, device=device)
                r = L.compare(table, dep, min_reps=3, max_reps=20, budget_s=1.0)
                del dep
                row = {"model": name, "batch": batch, "arch": label, "gflops": round(arch_macs(arch) / 1e9, 3),
                       "predicted_ms": round(r["predicted_ms"], 3), "measured_ms": round(r["measured_ms"], 3),
                       "error_pct": round(100 * r["error"], 1), "load1": round(os.getloadavg()[0], 2)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                errs.append(abs(r["error"]))
            summary.append({"model": name, "batch": batch, "archs": len(errs),
                            "median_abs_error_pct": round(100 * statistics.median(errs), 1),
                            "max_abs_error_pct": round(100 * max(errs), 1), "profile_s": round(prof_s, 1),
                            "table_dense_ms": round(table.dense_ms(), 3),
                            "dense_measured_in_profile_ms": round(table.meta["dense_measured_ms"], 3)})
            print(json.dumps(summary[-1]), flush=True)
    info = env_info(device)
    out = {"summary": summary, "rows": rows, "env": info, "dtype": args.dtype, "threads": args.threads,
           "clock": args.clock, "stat": args.stat, "rounds": args.rounds, "context": args.context,
           "budget_s": args.budget,
           "load_avg_start": [round(v, 2) for v in load_start], "load_avg_end": [round(v, 2) for v in os.getloadavg()],
           "wall_s": round(time.perf_counter() - t_all, 1)}
    out["tag"] = args.tag
    path = append_run(f"latency_pred_{device.type}", out)
    print(f"{info['device']}, torch {info['torch']}, {args.dtype}, {args.threads} thread(s), {args.clock} clock, "
          f"{args.stat} of repeats, context {args.context}; load average {load_start[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end; run {info['run_id']} added to {path}\n")
    print(markdown_table(rows) + "\n")
    print(markdown_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
