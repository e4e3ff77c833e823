"""Run a benchmark suite into one folder: ``headline`` (what to run first on a GPU) or ``full`` (every sweep).

    python bench/run_all.py --suite headline --out DIR            # < 8 min on one H100 (see bench/headline.py)
    python bench/run_all.py --suite full --out DIR                # headline + every bench/bench_*.py sweep (longer)
    python bench/run_all.py --suite headline --device cpu --smoke --out DIR   # tiny shapes: a check of the harness

Every part's rows go to CSV + JSON + Markdown in DIR (``headline_<section>.*``, ``<script>.*``), with the device,
driver, torch/triton/timm versions, date and run id in every row; ``headline.md`` holds the headline tables and the
performance targets; ``run_all.md`` / ``run_all.json`` the status and wall time of every part; PNG plots are drawn
from the CSVs (when matplotlib is installed).

Exit status: 0 only when every part ran and no row holds an error ("ok" is printed only then); 1 otherwise (a part
that raised, a row with an ``error``, an item not started because ``--budget-s`` was used up); 2 for bad arguments.
``--smoke`` on CPU sets TRITON_INTERPRET=1 (before Triton is imported) so that the Triton providers run in the
interpreter.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib
import json
import os
import sys
import time
import traceback
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SUITES = ("headline", "full")
GPU_HEADLINE_BUDGET_S = 400.0


def discover(only: Optional[List[str]] = None) -> List[str]:
    """Module names ``bench_<x>`` of the sweep scripts present (optionally only the stems in ``only``)."""
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    if only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in only}
        missing = sorted(wanted - set(names))
        if missing:
            raise SystemExit(f"run_all: no such benchmark script: {', '.join(missing)} (have: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    return names


def run_script(name: str, out: str, device: str, smoke: bool) -> Dict:
    """Run ``bench/<name>.py``'s ``main`` in this process; its rows decide its status."""
    from bench.common import error_rows

    t0 = time.perf_counter()
    part = {"part": name, "status": "", "rows": 0, "error_rows": 0, "seconds": 0.0}
    try:
        mod = importlib.import_module(f"bench.{name}")
        rows = mod.main(["--out", out, "--device", device] + (["--quick"] if smoke else [])) or []
        part["rows"], part["error_rows"] = len(rows), len(error_rows(rows))
        part["status"] = "ok" if not part["error_rows"] else f"FAILED: {part['error_rows']} error rows"
    except SystemExit as exc:  # argparse or an explicit refusal
        part["status"] = "ok" if not exc.code else f"FAILED: exit {exc.code}"
    except Exception as exc:  # noqa: BLE001 - report and go on with the other scripts
        traceback.print_exc()
        part["status"] = f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
    part["seconds"] = time.perf_counter() - t0
    return part


def run_headline(out: str, device: str, smoke: bool, budget_s: Optional[float], sections: Optional[List[str]],
                 amp: str) -> Dict:
    import torch

    from bench import headline

    t0 = time.perf_counter()
    part = {"part": "headline", "status": "", "rows": 0, "error_rows": 0, "seconds": 0.0}
    try:
        cfg = headline.make_config(torch.device(device), smoke=smoke, budget_s=budget_s, amp=amp)
        results, errors = headline.run(cfg, out, sections)
        part["rows"] = sum(len(r) for r in results.values())
        part["error_rows"] = errors
        part["status"] = "ok" if not errors else f"FAILED: {errors} error rows"
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        part["status"] = f"FAILED: {type(exc).__name__}: {str(exc)[:200]}"
    part["seconds"] = time.perf_counter() - t0
    return part


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=SUITES, default="headline")
    p.add_argument("--out", required=True, help="results folder (created; existing CSVs are appended to)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few calls: checks the harness, measures nothing")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # older name of --smoke
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"time budget of the headline suite in seconds (default {GPU_HEADLINE_BUDGET_S:.0f} on CUDA, "
                        "none otherwise); items not started in time are error rows")
    p.add_argument("--sections", default=None, help="headline sections to run (comma list; default all)")
    p.add_argument("--only", default=None, help="full suite: only these scripts (comma list of stems, e.g. "
                                                "shift_sum,deploy_conv)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast dtype of the training step (auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    smoke = args.smoke or args.quick
    if args.device == "cpu" and smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the Triton providers run
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    budget = args.budget_s if args.budget_s is not None else (GPU_HEADLINE_BUDGET_S if device == "cuda" and not smoke
                                                              else None)
    sections = args.sections.split(",") if args.sections else None
    scripts = discover(args.only.split(",") if args.only else None) if args.suite == "full" else []
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    parts = [run_headline(args.out, device, smoke, budget, sections, args.amp)]
    print(f"[run_all] headline: {parts[-1]['status']} ({parts[-1]['seconds']:.0f} s)", flush=True)
    if args.suite == "full":
        for name in scripts:
            print(f"[run_all] {name} ...", flush=True)
            parts.append(run_script(name, args.out, device, smoke))
            print(f"[run_all] {name}: {parts[-1]['status']} ({parts[-1]['seconds']:.0f} s)", flush=True)
    if not args.no_plots:
        try:
            from bench.plot_results import plot_all

            plot_all(args.out)
        except ImportError as exc:  # matplotlib missing: the tables are still there
            print(f"[run_all] plots skipped: {exc}")
    failed = [x for x in parts if x["status"] != "ok"]
    total = time.perf_counter() - t_start
    lines = [f"# run_all --suite {args.suite}{' --smoke' if smoke else ''} on {device}, "
             f"{_dt.datetime.now():%Y-%m-%d %H:%M}", "", "| part | status | rows | error rows | seconds |",
             "|---|---|---|---|---|"]
    lines += [f"| {x['part']} | {x['status']} | {x['rows']} | {x['error_rows']} | {x['seconds']:.1f} |" for x in parts]
    lines += ["", f"Total {total:.0f} s: {'FAILED' if failed else 'ok'}"]
    with open(os.path.join(args.out, "run_all.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "run_all.json"), "w") as f:
        json.dump({"suite": args.suite, "device": device, "smoke": smoke, "budget_s": budget, "parts": parts,
                   "seconds": total, "status": "FAILED" if failed else "ok"}, f, indent=1)
    print("\n".join(lines))
    if failed:
        print(f"[run_all] FAILED: {', '.join(x['part'] for x in failed)}", flush=True)
        return 1
    print("[run_all] ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
