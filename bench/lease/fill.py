"""Step e of the lease check: what fits in the time that is left, each row written the moment it is measured.

Parts (``--parts``, in this order by default): ``kernels`` (the per-kernel rows of the ``lease`` cases of
``bench/cases.py``: every provider but ``compiled``, interleaved, forward and, for training ops, forward + backward),
``step_b`` (the DeiT-B supernet step, fused vs eager, batch 256 bf16), ``infer_b1`` (deployed SPViT-DeiT-B vs pruned vs
dense at batch 1, with a CUDA-graph replay), ``compiled`` (``torch.compile`` of the deployed model at batch 256, only
when its estimated compile time, ``--compile-estimate-s``, fits in what is left).

    python -m bench.lease.fill [--smoke] [--parts kernels,step_b,infer_b1,compiled] [--budget-s S]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench import cases  # noqa: E402
from bench.common import bench_fn, first_call_s  # noqa: E402
from bench.lease import ratios  # noqa: E402
from bench.lease.ratios import Deadline, device_of, infer_case, infer_ratio, step_case, step_ratio  # noqa: E402

ratios.load()
from bench.lease.rows import run_each, write_row  # noqa: E402

PARTS = ("kernels", "step_b", "infer_b1", "compiled")
SMOKE_PARTS = ("kernels", "infer_b1", "compiled")  # step_b runs the code of step c's step item


def kernels(device: torch.device, smoke: bool, reps: int, rounds: int, deadline: Deadline) -> None:
    tier = cases.tier_of(device, smoke)
    todo = cases.kernel_cases(tier, tags={"lease"})
    if smoke:  # one case of two ops (a Triton-only one, one with the extension) checks the harness
        todo = [next(c for c in todo if c.op == op) for op in ("pruned_ffn", "deploy_conv")]
    for case in todo:
        if deadline.over(margin=5):
            write_row("kernels", {"item": "kernel", "note": f"stopped before {case.id}: time limit"})
            return
        providers = [p for p in cases.OP_PROVIDERS[case.op] if p != "compiled"]
        modes = ("fwd",) if smoke or cases.OP_MODES[case.op] == ("fwd",) else ("fwd", "fwd+bwd")
        fns = {}
        for p in providers:
            try:
                fwd, leaves = cases.build(case, p, device, smoke=smoke)
            except cases.Unavailable as exc:
                write_row("kernels", {"item": "kernel", "case": case.id, "provider": p, "skipped": str(exc)})
                continue
            for mode in modes:
                if mode == "fwd":
                    fns[(p, mode)] = (lambda f=fwd: _no_grad(f))
                else:
                    dy = torch.randn_like(fwd().float()).to(fwd().dtype)
                    fns[(p, mode)] = (lambda f=fwd, lv=leaves, g=dy: torch.autograd.grad(f(), lv, g,
                                                                                          allow_unused=True))
        times = {k: [] for k in fns}
        for k, fn in fns.items():
            try:
                write_row("kernels", {"item": "kernel", "case": case.id, "provider": k[0], "mode": k[1],
                                      "first_call_s": round(first_call_s(fn, device), 3)})
            except Exception as exc:  # noqa: BLE001 - one provider's failure is a row
                write_row("kernels", {"item": "kernel", "case": case.id, "provider": k[0], "mode": k[1],
                                      "error": f"{type(exc).__name__}: {exc}"[:400]})
                times.pop(k)
        keys = list(times)
        for r in range(rounds):
            for k in (keys if r % 2 == 0 else keys[::-1]):
                st = bench_fn(fns[k], device, warmup=1, rep=reps)
                times[k].append(st["ms"])
                flops, nbytes = cases.work(case, k[1])
                ms = st["ms"]
                write_row("kernels", {"item": "kernel", "case": case.id, "provider": k[0], "mode": k[1], "round": r,
                                      "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 3),
                                      "gbs": None if nbytes is None else round(nbytes / ms / 1e6, 1)})
        for mode in modes:
            ms = {k[0]: statistics.median(v) for k, v in times.items() if k[1] == mode and v}
            if "eager" in ms:
                write_row("kernels", {"item": "kernel", "case": case.id, "mode": mode, "ratio": "vs eager",
                                      "value": {p: round(ms["eager"] / v, 3) for p, v in ms.items() if p != "eager"}})


def _no_grad(f):
    with torch.no_grad():
        return f()


def compiled(device: torch.device, smoke: bool, reps: int, deadline: Deadline, estimate_s: float) -> None:
    if deadline.left() < 1.5 * estimate_s:
        write_row("compiled", {"item": "compiled", "skipped": f"{deadline.left():.0f} s left, the compile is "
                                                              f"estimated at {estimate_s:.0f} s"})
        return
    case = infer_case(smoke)
    models, x, _ = cases.make_inference(case, device)
    torch._dynamo.reset()
    comp = torch.compile(models["deployed"], backend=cases.compile_backend(device, smoke), dynamic=False)
    with torch.inference_mode():
        t_first = first_call_s(lambda: comp(x), device)
        err = (comp(x).float() - models["deployed"](x).float()).abs().max().item()
        res = {}
        for name, fn in (("deployed", lambda: models["deployed"](x)), ("deployed_compiled", lambda: comp(x))):
            res[name] = bench_fn(fn, device, warmup=1, rep=reps)["ms"]
    write_row("compiled", {"item": "compiled", "case": case.id, "backend": cases.compile_backend(device, smoke),
                           "compile_first_call_s": round(t_first, 2), "ratio": "compiled/eager deployed img/s",
                           "value": round(res["deployed"] / res["deployed_compiled"], 4),
                           "ms_deployed": round(res["deployed"], 4), "ms_compiled": round(res["deployed_compiled"], 4),
                           "max_abs_compiled_minus_eager": err})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--parts", default=None, help=f"default: {','.join(PARTS)} ({','.join(SMOKE_PARTS)} with --smoke)")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--compile-estimate-s", type=float, default=None,
                    help="expected compile time of the torch.compile row (default 120 on a GPU, 20 in smoke runs)")
    args = ap.parse_args(argv)
    try:
        import bench.lease.triton_probe as probe
        probe.install()
    except Exception:  # noqa: BLE001
        pass
    device = device_of(args.smoke)
    deadline = Deadline(args.budget_s)
    reps, rounds = (1, 1) if args.smoke else (10, 2)
    parts = args.parts.split(",") if args.parts else (SMOKE_PARTS if args.smoke else PARTS)

    def run_one(part: str) -> None:
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}; expected some of {PARTS}")
        if deadline.over(margin=5):
            write_row(part, {"item": part, "skipped": "time limit"})
        elif part == "kernels":
            kernels(device, args.smoke, reps, rounds, deadline)
        elif part == "step_b":
            step_ratio(step_case(args.smoke, "deit_b"), device, args.smoke, 1 if args.smoke else 2, reps,
                       deadline, label="step_b")
        elif part == "infer_b1":
            infer_ratio(infer_case(args.smoke, batch=1), device, 1 if args.smoke else 2, reps if args.smoke
                        else 50, deadline, label="infer_b1")
        else:
            compiled(device, args.smoke, reps, deadline,
                     args.compile_estimate_s or (20.0 if args.smoke else 120.0))

    return run_each(parts, run_one, device.type == "cuda")


if __name__ == "__main__":
    sys.exit(main())
