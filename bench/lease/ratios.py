"""Step c of the lease check: the two ratios that matter most, each row written the moment it is measured.

* the supernet training step, fused vs the eager reference (DeiT-S, batch 256, bf16 on a GPU): img/s and peak memory;
* the deployed SPViT-DeiT-B vs the eager pruned model vs dense DeiT-B (timm, SDPA attention) at batch 256 in bf16:
  img/s and max |deployed - pruned|; on a GPU also the deployed model replayed from a CUDA graph.

Providers are timed in interleaved rounds (A B A B ...), each round ``reps`` calls after one untimed call, with CUDA
events on a GPU (``bench.common.bench_fn``). A row per provider and round, then one ratio row per item.

    python -m bench.lease.ratios [--smoke] [--items step,infer] [--rounds R] [--reps N] [--budget-s S]

``--smoke``: the tiny cases of ``bench/cases.py`` on the CPU (Triton kernels under the interpreter): checks the
harness, measures nothing. The step and inference functions are reused by ``bench.lease.fill`` (DeiT-B step, batch 1).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.lease.rows import run_each, write_row  # noqa: E402

# torch and the benchmark helpers are imported by main() after the plan row is written (a row within a second of the
# start, before the slow imports); other importers get them by importing this module through load()
torch = cases = bench_fn = first_call_s = peak_memory_mb = synchronize = None


def load() -> None:
    """Import torch and the benchmark helpers into this module."""
    global torch, cases, bench_fn, first_call_s, peak_memory_mb, synchronize
    import torch as _torch

    from bench import cases as _cases
    from bench.common import bench_fn as _b, first_call_s as _f, peak_memory_mb as _p, synchronize as _s
    torch, cases, bench_fn, first_call_s, peak_memory_mb, synchronize = _torch, _cases, _b, _f, _p, _s


class Deadline:
    """Wall-clock budget of a step: :meth:`left` seconds, :meth:`over` once a margin is all that is left."""

    def __init__(self, budget_s: Optional[float]):
        self.end = None if budget_s is None else time.monotonic() + budget_s

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def over(self, margin: float = 0.0) -> bool:
        return self.left() <= margin


def _img_s(batch: int, ms: float) -> float:
    return batch / ms * 1e3


def step_ratio(case: "cases.E2ECase", device: "torch.device", smoke: bool, rounds: int, reps: int, deadline: Deadline,
               label: str = "step") -> Dict[str, object]:
    """Fused vs eager supernet training step of ``case``, interleaved; returns the ratio row."""
    import spvit_kernels as K

    providers = ("fused", "eager")
    steps, backends, first = {}, {}, {}
    for p in providers:
        # the other provider's model and optimizer state stay allocated: count this one's memory above that
        base = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        step, _ = cases.make_step(case, p, device, smoke=smoke)
        steps[p] = step
        backends[p] = cases.fused_backend(device) if p == "fused" else "eager"
        with K.use_backend(backends[p]):
            t_first = first_call_s(step, device)
            mem = peak_memory_mb(step, device)
        mem = None if mem is None else mem - base
        write_row(label, {"item": label, "case": case.id, "provider": p, "first_call_s": round(t_first, 3),
                          "peak_mem_mib": None if mem is None else round(mem, 1), "backend": backends[p],
                          "note": "peak memory of the step above what was allocated before its model was built"})
        first[p] = None if mem is None else round(mem, 1)
    times: Dict[str, List[float]] = {p: [] for p in providers}
    for r in range(rounds):
        if r and deadline.over(margin=2 * sum(statistics.median(v) for v in times.values()) * reps / 1e3 + 1):
            write_row(label, {"item": label, "case": case.id, "note": f"stopped after {r} rounds: time limit"})
            break
        for p in (providers if r % 2 == 0 else providers[::-1]):
            with K.use_backend(backends[p]):
                st = bench_fn(steps[p], device, warmup=1, rep=reps)
            times[p].append(st["ms"])
            write_row(label, {"item": label, "case": case.id, "provider": p, "round": r, "ms": round(st["ms"], 4),
                              "img_s": round(_img_s(case.batch, st["ms"]), 2), "reps": reps})
    ms = {p: statistics.median(v) for p, v in times.items() if v}
    row = {"item": label, "case": case.id, "ratio": "fused/eager img/s",
           "value": round(ms["eager"] / ms["fused"], 4) if len(ms) == 2 else None,
           "img_s_fused": round(_img_s(case.batch, ms["fused"]), 2) if "fused" in ms else None,
           "img_s_eager": round(_img_s(case.batch, ms["eager"]), 2) if "eager" in ms else None,
           "peak_mem_mib_fused": first.get("fused"), "peak_mem_mib_eager": first.get("eager"),
           "rounds": len(times["fused"]), "device": str(device)}
    return write_row(label, row)


def _cuda_graph(fn, x: torch.Tensor):
    """A CUDA graph replaying ``fn(x)`` (captured after warm-up on a side stream); None where capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(x)
        return graph
    except Exception as exc:  # noqa: BLE001 - recorded as a row by the caller
        return exc


def infer_ratio(case: "cases.E2ECase", device: "torch.device", rounds: int, reps: int, deadline: Deadline,
                label: str = "infer", graph: bool = True) -> Dict[str, object]:
    """Deployed vs eager pruned vs dense inference of ``case``, interleaved; returns the ratio row."""
    models, x, gflops = cases.make_inference(case, device)
    with torch.inference_mode():
        fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
        err = (models["deployed"](x).float() - models["pruned"](x).float()).abs().max().item()
        for name, fn in fns.items():
            write_row(label, {"item": label, "case": case.id, "provider": name,
                              "first_call_s": round(first_call_s(fn, device), 3)})
        if graph and device.type == "cuda":
            g = _cuda_graph(lambda t: models["deployed"](t), x)
            if isinstance(g, Exception):
                write_row(label, {"item": label, "case": case.id, "provider": "deployed_graph",
                                  "error": f"{type(g).__name__}: {str(g).splitlines()[0] if str(g) else ''}"})
            else:
                fns["deployed_graph"] = g.replay
        names = list(fns)
        times: Dict[str, List[float]] = {n: [] for n in names}
        for r in range(rounds):
            if r and deadline.over(margin=sum(statistics.median(v) for v in times.values()) * reps / 1e3 + 1):
                write_row(label, {"item": label, "case": case.id, "note": f"stopped after {r} rounds: time limit"})
                break
            for n in (names if r % 2 == 0 else names[::-1]):
                st = bench_fn(fns[n], device, warmup=1, rep=reps)
                times[n].append(st["ms"])
                write_row(label, {"item": label, "case": case.id, "provider": n, "round": r,
                                  "ms": round(st["ms"], 4), "img_s": round(_img_s(case.batch, st["ms"]), 2),
                                  "reps": reps})
        synchronize(device)
    ms = {n: statistics.median(v) for n, v in times.items() if v}

    def ratio(a, b):
        return round(ms[b] / ms[a], 4) if a in ms and b in ms else None
    row = {"item": label, "case": case.id, "ratio": "deployed/dense img/s", "value": ratio("deployed", "dense"),
           "deployed_vs_pruned": ratio("deployed", "pruned"), "graph_vs_dense": ratio("deployed_graph", "dense"),
           **{f"img_s_{n}": round(_img_s(case.batch, v), 2) for n, v in ms.items()},
           "max_abs_deployed_minus_pruned": err, "gflops_pruned": round(gflops["pruned"], 4),
           "gflops_dense": round(gflops["dense"], 4), "rounds": len(times["deployed"]), "device": str(device)}
    return write_row(label, row)


def step_case(smoke: bool, model: str = "deit_s") -> "cases.E2ECase":
    return cases.E2ECase("step", "smoke_vit", 2, "fp32") if smoke else cases.E2ECase("step", model, 256, "bf16")


def infer_case(smoke: bool, batch: Optional[int] = None) -> "cases.E2ECase":
    if smoke:
        return cases.E2ECase("infer", "demo_like", batch or 2, "fp32")
    return cases.E2ECase("infer", "spvit_deit_b_l008_t60", batch or 256, "bf16")


def device_of(smoke: bool) -> "torch.device":
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --smoke on a CPU")
    return torch.device("cuda")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--items", default="step,infer")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new round after this many seconds")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.smoke else 4)
    reps = args.reps or (1 if args.smoke else 10)
    deadline = Deadline(args.budget_s)
    write_row("plan", {"item": "plan", "items": args.items, "rounds": rounds, "reps": reps,
                       "budget_s": args.budget_s, "smoke": args.smoke})
    load()
    try:
        import bench.lease.triton_probe as probe
        probe.install()
    except Exception:  # noqa: BLE001 - counting is optional
        pass
    device = device_of(args.smoke)
    def run_one(item: str) -> None:
        if item == "step":
            step_ratio(step_case(args.smoke), device, args.smoke, rounds, reps, deadline)
        elif item == "infer":
            infer_ratio(infer_case(args.smoke), device, rounds, reps, deadline)
        else:
            raise SystemExit(f"unknown item {item!r}")

    return run_each(args.items.split(","), run_one, device.type == "cuda")


if __name__ == "__main__":
    sys.exit(main())
