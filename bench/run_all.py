"""Run every benchmark script ``bench/bench_*.py`` (its ``main(["--out", out] + ["--quick"])``), then the plots.

Scripts are imported one by one; one that is missing, fails to import or raises is reported and skipped, so the
others still run. A summary (script, status, seconds) is printed and written to ``<out>/run_all.md``.

python bench/run_all.py --out DIR [--quick] [--only deploy_e2e,pruned_ffn] [--no-plots]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib
import os
import sys
import time
import traceback
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def discover(only: Optional[List[str]] = None) -> List[str]:
    """Module names ``bench.bench_<x>`` of the scripts present (optionally only the stems in ``only``)."""
    names = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    if only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in only}
        missing = sorted(wanted - set(names))
        for m in missing:
            print(f"[run_all] {m}: no such script (yet); skipped")
        names = [n for n in names if n in wanted]
    return names


def run_one(name: str, out: str, quick: bool) -> dict:
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(f"bench.{name}")
    except Exception as exc:  # noqa: BLE001 - a script that does not import yet is skipped
        return {"script": name, "status": f"import failed: {type(exc).__name__}: {str(exc)[:150]}",
                "seconds": time.perf_counter() - t0}
    main = getattr(mod, "main", None)
    if main is None:
        return {"script": name, "status": "no main()", "seconds": 0.0}
    argv = ["--out", out] + (["--quick"] if quick else [])
    try:
        main(argv)
        status = "ok"
    except SystemExit as exc:  # argparse errors
        status = "ok" if not exc.code else f"exit {exc.code}"
    except Exception as exc:  # noqa: BLE001 - report and go on with the other scripts
        traceback.print_exc()
        status = f"failed: {type(exc).__name__}: {str(exc)[:150]}"
    return {"script": name, "status": status, "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--quick", action="store_true", help="pass --quick to every script")
    p.add_argument("--only", default=None, help="comma-separated script stems (e.g. deploy_e2e,pruned_ffn)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in discover(args.only.split(",") if args.only else None):
        print(f"[run_all] {name} ...", flush=True)
        r = run_one(name, args.out, args.quick)
        print(f"[run_all] {name}: {r['status']} ({r['seconds']:.1f}s)", flush=True)
        results.append(r)
    if not args.no_plots:
        try:
            from bench.plot_results import plot_all

            plot_all(args.out)
        except ImportError as exc:  # matplotlib missing
            print(f"[run_all] plots skipped: {exc}")
    lines = [f"# run_all {_dt.datetime.now():%Y-%m-%d %H:%M} ({'quick' if args.quick else 'full'})", "",
             "| script | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['script']} | {r['status']} | {r['seconds']:.1f} |" for r in results]
    with open(os.path.join(args.out, "run_all.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
