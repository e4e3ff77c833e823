"""The results store: one CSV per suite in bench/results/, one row per benchmark of every saved run.

``pytest bench/ --benchmark-only --benchmark-json RUN.json`` writes pytest-benchmark's JSON; this script flattens
it into ``bench/results/<suite>.csv`` (suite ``kernels`` for bench/test_kernels.py, ``e2e`` for bench/test_e2e.py),
appending to the rows already there. Every row is keyed by the device, driver, library versions, date, commit and a
run id (the run's date-time and commit), so runs of several machines and commits sit in one file.

    python bench/store.py add RUN.json [--dir bench/results]     # append a run's rows
    python bench/store.py show [--suite kernels] [--run RUN_ID]  # Markdown table of a run (default: the latest)
    python bench/store.py plot [--suite e2e] --out DIR           # PNG per group from the CSV (needs matplotlib)

The comparison of two runs (a regression check between commits) is pytest-benchmark's own:
``pytest bench/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Dict, List, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KEY_COLS = ["run_id", "date", "device", "driver", "torch", "triton", "timm", "cuda", "python", "commit", "dirty",
            "suite", "name", "group"]
STAT_COLS = ["median_s", "iqr_s", "min_s", "mean_s", "rounds"]


def suite_of(fullname: str) -> str:
    """``kernels`` / ``e2e`` / the test file's stem for other files."""
    stem = os.path.splitext(os.path.basename(fullname.split("::")[0]))[0]
    return stem[len("test_"):] if stem.startswith("test_") else stem


def rows_from_run(run: Dict) -> List[Dict]:
    """One flat row per benchmark of a pytest-benchmark JSON document."""
    mi = run.get("machine_info", {})
    sp = mi.get("spvit", {})
    libs = sp.get("libraries", {})
    commit = run.get("commit_info", {})
    date = run.get("datetime", "")
    cid = (commit.get("id") or "")[:10]
    device = sp.get("gpu") or f"{mi.get('cpu', {}).get('brand_raw', mi.get('processor', 'cpu'))} " \
                                f"x{sp.get('torch_threads', '?')} threads"
    base = {"run_id": f"{date[:19].replace(':', '').replace('-', '')}-{cid or 'nocommit'}", "date": date[:10],
            "device": device, "driver": sp.get("driver", ""), "commit": cid, "dirty": commit.get("dirty", ""),
            **{k: libs.get(k, "") for k in ("torch", "triton", "timm", "cuda", "python")}}
    rows = []
    for b in run.get("benchmarks", []):
        st = b.get("stats") or {}
        row = {**base, "suite": suite_of(b.get("fullname", "")), "name": b.get("name", ""), "group": b.get("group", ""),
               "median_s": st.get("median"), "iqr_s": st.get("iqr"), "min_s": st.get("min"),
               "mean_s": st.get("mean"), "rounds": st.get("rounds")}
        for k, v in (b.get("extra_info") or {}).items():
            row.setdefault(k, v)
        rows.append(row)
    return rows


def read_csv(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append(rows: List[Dict], path: str) -> None:
    """Add ``rows`` to the CSV at ``path`` (columns: the union; the file is replaced atomically; rows of the same run
    id and name already there are replaced, so adding a run twice does not duplicate it)."""
    old = read_csv(path)
    new_keys = {(r["run_id"], r["name"]) for r in rows}
    old = [r for r in old if (r.get("run_id"), r.get("name")) not in new_keys]
    cols: List[str] = []
    for r in old + rows:
        cols += [k for k in r if k not in cols]
    front = [c for c in KEY_COLS + STAT_COLS if c in cols]
    cols = front + [c for c in cols if c not in front]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in old + rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, path)


def add(json_path: str, out_dir: str = RESULTS_DIR) -> Dict[str, int]:
    """Append the rows of a pytest-benchmark JSON file to ``<out_dir>/<suite>.csv``; returns rows per suite."""
    with open(json_path) as f:
        rows = rows_from_run(json.load(f))
    os.makedirs(out_dir, exist_ok=True)
    counts: Dict[str, int] = {}
    for suite in sorted({r["suite"] for r in rows}):
        part = [r for r in rows if r["suite"] == suite]
        append(part, os.path.join(out_dir, f"{suite}.csv"))
        counts[suite] = len(part)
    return counts


def _fmt(v) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v if v is not None else "")
    return f"{x:.4g}"


SHOW_COLS = ["group", "provider", "mode", "median_s", "iqr_s", "tflops", "gbs", "frac_of_peak", "img_s",
             "peak_mem_mb", "first_call_s", "max_abs_err_vs_eager", "max_abs_err_vs_pruned"]


def markdown(rows: List[Dict], cols: Optional[List[str]] = None) -> str:
    cols = [c for c in (cols or SHOW_COLS) if any(str(r.get(c, "")) != "" for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def show(suite: str, run_id: Optional[str], out_dir: str = RESULTS_DIR) -> str:
    rows = read_csv(os.path.join(out_dir, f"{suite}.csv"))
    if not rows:
        raise SystemExit(f"store: no rows in {os.path.join(out_dir, suite + '.csv')}")
    run_id = run_id or rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run_id]
    if not rows:
        raise SystemExit(f"store: no run {run_id!r} in {suite}.csv")
    r0 = rows[0]
    head = (f"{suite}: {r0['device']}, driver {r0.get('driver') or 'n/a'}, torch {r0['torch']}, triton {r0['triton']},"
            f" {r0['date']}, commit {r0['commit']} (run {run_id})\n\n")
    return head + markdown(rows)


def plot(suite: str, out: str, in_dir: str = RESULTS_DIR) -> List[str]:
    """One bar chart per group of the latest run of each device: median time per provider (img/s for e2e)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(os.path.join(in_dir, f"{suite}.csv"))
    latest: Dict[str, str] = {}
    for r in rows:
        latest[r["device"]] = r["run_id"]
    rows = [r for r in rows if latest.get(r["device"]) == r["run_id"]]
    os.makedirs(out, exist_ok=True)
    written = []
    for device in sorted(latest):
        dev_rows = [r for r in rows if r["device"] == device]
        groups = list(dict.fromkeys(r["group"] for r in dev_rows))
        metric = "img_s" if suite == "e2e" else "median_s"
        fig, ax = plt.subplots(figsize=(10, max(3.0, 0.3 * len(dev_rows))))
        labels, values = [], []
        for g in groups:
            for r in dev_rows:
                if r["group"] == g and r.get(metric):
                    labels.append(f"{g} {r.get('provider', '')}")
                    values.append(float(r[metric]) * (1e3 if metric == "median_s" else 1.0))
        ax.barh(labels[::-1], values[::-1])
        ax.set_xlabel("img/s" if metric == "img_s" else "median ms")
        ax.set_title(f"{suite}: {device} ({latest[device]})", fontsize=9)
        ax.tick_params(axis="y", labelsize=6)
        fig.tight_layout()
        path = os.path.join(out, f"{suite}_{''.join(c if c.isalnum() else '_' for c in device)[:60]}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="append a pytest-benchmark JSON run to the suite CSVs")
    a.add_argument("json")
    a.add_argument("--dir", default=RESULTS_DIR)
    s = sub.add_parser("show", help="Markdown table of one run")
    s.add_argument("--suite", default="kernels")
    s.add_argument("--run", default=None)
    s.add_argument("--dir", default=RESULTS_DIR)
    g = sub.add_parser("plot", help="PNG plots of the latest run per device")
    g.add_argument("--suite", default="kernels")
    g.add_argument("--out", required=True)
    g.add_argument("--dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.cmd == "add":
        if not os.path.isfile(args.json):
            p.error(f"no such file: {args.json}")
        counts = add(args.json, args.dir)
        print(", ".join(f"{n} rows -> {os.path.join(args.dir, s + '.csv')}" for s, n in counts.items()) or "no rows")
    elif args.cmd == "show":
        print(show(args.suite, args.run, args.dir))
    else:
        for path in plot(args.suite, args.out, args.dir):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
