"""End to end, hardware-aware: the demo ViT on the embedded digits, a CPU latency table, searches with
``target_speedup`` S, and the measured speedup of each searched model once deployed.

1. train the demo's dense teacher (``spvit.demo.train_teacher``);
2. profile the demo model's deployed pieces on this CPU (``spvit.latency.profile``);
3. for each S: search from the teacher with the latency loss (``latency_table``, ``target_speedup`` S,
   ``ffn_align``), read out the architecture, prune the supernet (searched weights carried), deploy it;
4. measure the deployed model and the deployed dense teacher with the table's clock and statistic: predicted vs
   measured latency, requested vs achieved speedup. (No fine-tune: the latency does not depend on it.)

    PYTHONPATH=. python bench/bench_latency_demo.py [--speedups 1.5 2.0] [--clock cpu] [--out /tmp/lat_demo]

Adds the run (with its ``--tag``, device, versions, date and run id) to bench/results/latency_demo_cpu.json and
prints its table. A whole-pipeline measurement (training, search, deployment), not a microbenchmark: it stays a
script, outside the pytest-benchmark suite.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append_run, env_info, markdown_table  # noqa: E402
from spvit import latency as L  # noqa: E402
from spvit import search  # noqa: E402
from spvit.arch import Architecture, ModelSignature  # noqa: E402
from spvit.config import DemoConfig, SearchConfig, TrainConfig  # noqa: E402
from spvit.demo import chosen_model, stage_config, train_teacher  # noqa: E402
from spvit.deploy import deploy  # noqa: E402
from spvit.flops import gflops  # noqa: E402
from spvit.models import prune, supernet  # noqa: E402
from spvit.models.registry import DEMO_MODEL  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/spvit_latency_demo")
    ap.add_argument("--tag", default="", help="label of the run in the results file")
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--search-epochs", type=int, default=10)
    ap.add_argument("--ffn-align", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="statistic of the repeats (min: least disturbed on a loaded machine)")
    ap.add_argument("--context", type=int, default=4, help="blocks around each timed piece (0: pieces alone)")
    ap.add_argument("--budget", type=float, default=0.3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    o = DemoConfig(out=args.out, progress=False).validate()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    teacher_ckpt = os.path.join(args.out, "teacher", "best.pth")
    if not os.path.exists(teacher_ckpt):
        train_teacher(stage_config(TrainConfig, o, "teacher", epochs=args.teacher_epochs, lr=o.teacher_lr, min_lr=1e-5))
    teacher = chosen_model(teacher_ckpt)
    table_path = os.path.join(args.out, "lut.json")
    table = L.profile(teacher, batch=args.batch, threads=args.threads, clock=args.clock, rounds=args.rounds,
                      budget_s=args.budget, model_name=DEMO_MODEL, show=False, context=args.context,
                      stat=args.stat)
    table.save(table_path, force=True)
    print(table.summary(), flush=True)
    dense_dep = L.dense_deployed(DEMO_MODEL, table_signature(table), "cpu", torch.float32, o.model_kwargs,
                                 num_classes=10)
    rows = []
    for s in args.speedups:
        sn = supernet(chosen_model(teacher_ckpt), theta=1.5, alpha=1e-2, model_name=DEMO_MODEL)
        dense_g = sn.dense_gflops()
        scfg = stage_config(SearchConfig, o, f"search_s{s:g}", epochs=args.search_epochs,
                            sched_epochs=args.search_epochs, lr=o.search_lr, min_lr=o.search_lr, arc_lr=o.arc_lr,
                            loss_lambda=o.lambda_rel / dense_g ** 2, latency_table=table_path, target_speedup=s,
                            ffn_align=args.ffn_align, overwrite=True)
        res = search.run(scfg, supernet_module=sn)
        arch = Architecture.load(res["arch"])
        deployed = deploy(prune(res["supernet"].cpu(), arch), dtype=torch.float32, device="cpu")
        with torch.no_grad():
            r = L.compare(table, deployed, dense_dep, rounds=args.rounds, min_reps=5, budget_s=1.0)
        row = {"requested_speedup": s, "predicted_speedup": round(r["predicted_speedup"], 3),
               "measured_speedup": round(r["measured_speedup"], 3),
               "speedup_error_pct": round(100 * (r["measured_speedup"] / s - 1), 1),
               "predicted_ms": round(r["predicted_ms"], 3), "measured_ms": round(r["measured_ms"], 3),
               "pred_error_pct": round(100 * r["error"], 1),
               "dense_predicted_ms": round(r["dense_predicted_ms"], 3),
               "dense_measured_ms": round(r["dense_measured_ms"], 3),
               "gflops": round(gflops(arch), 5), "dense_gflops": round(dense_g, 5),
               "val_acc1_search": res["val_acc1"], "attn": " ".join(arch.attn_choices),
               "ffn": " ".join(str(w) for w in arch.ffn_widths)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    info = env_info(torch.device("cpu"))
    load = os.getloadavg()
    out = {"rows": rows, "env": info, "clock": args.clock, "threads": args.threads, "batch": args.batch,
           "ffn_align": args.ffn_align, "context": args.context, "rounds": args.rounds, "stat": args.stat,
           "teacher_epochs": args.teacher_epochs, "search_epochs": args.search_epochs,
           "load_avg_1_5_15": [round(v, 2) for v in load], "wall_s": round(time.perf_counter() - t0, 1),
           "table": {"dense_ms": table.dense_ms(), "dense_measured_ms": table.meta.get("dense_measured_ms"),
                     "profile_s": table.meta.get("profile_s")}}
    out["tag"] = args.tag
    path = append_run("latency_demo_cpu", out)
    cols = ["requested_speedup", "predicted_speedup", "measured_speedup", "speedup_error_pct", "predicted_ms",
            "measured_ms", "pred_error_pct", "gflops", "val_acc1_search", "attn", "ffn"]
    md = markdown_table(rows, cols)
    print(f"Demo ViT on the digits, batch {args.batch}, {args.threads} thread(s), {args.clock} clock, "
          f"{args.stat} of repeats, {args.rounds} alternating rounds, context {args.context}, "
          f"load average {load[0]:.2f}; {info['device']}, torch {info['torch']}; run {info['run_id']} added to "
          f"{path}\n")
    print(md)
    return 0


def table_signature(table: L.LatencyTable) -> ModelSignature:
    d = dict(table.signature)
    d["grid"] = tuple(d["grid"])
    return ModelSignature(**d)


if __name__ == "__main__":
    sys.exit(main())
