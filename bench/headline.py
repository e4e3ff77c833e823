"""The headline benchmark: the ``headline`` selection of the suite (``pytest bench/ -m headline --benchmark-only``).

    python bench/headline.py --out DIR [--budget-s S] [-- extra pytest arguments]

Runs the cases tagged ``headline`` in bench/cases.py (on a GPU: every op at DeiT-B shapes, batch 256, bf16, each
provider and mode; the supernet step of DeiT-S and DeiT-B at batch 256, fused / eager / compiled eager / compiled
timm; SPViT-DeiT-S and SPViT-DeiT-B l008_t60 deployed / pruned / dense, eager and compiled, at batch 256), saves
pytest-benchmark's JSON as ``DIR/headline.json``, adds its rows to ``DIR/kernels.csv`` and ``DIR/e2e.csv`` (the
results store, bench/store.py) and writes ``DIR/headline.md``: the tables and the performance targets, each met /
NOT met / not measured. With ``--budget-s``, cases not started in time fail (an incomplete run is not ok).

Exit status: pytest's (0 only when every selected case ran), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import store  # noqa: E402


def _ratio(a, b) -> Optional[float]:
    return float(a) / float(b) if a and b else None


def targets(rows: List[Dict]) -> List[Dict]:
    """The performance targets checked against a run's end-to-end rows."""
    out: List[Dict] = []
    e2e: Dict = {}
    for r in rows:
        if r.get("kind") in ("step", "infer"):
            e2e[(r["kind"], r["model"], r["batch"], r["provider"])] = r

    def add(what, value, op, bound):
        status = "not measured" if value is None else \
            ("met" if (value >= bound if op == ">=" else value <= bound) else "NOT met")
        out.append({"target": what, "value": value, "bound": f"{op} {bound}", "status": status})

    def get(kind, model, batch, prov, key):
        return e2e.get((kind, model, batch, prov), {}).get(key)

    for kind, model, batch in dict.fromkeys((k, m, b) for k, m, b, _ in e2e):
        if kind == "step":
            f = lambda p, k="img_s": get(kind, model, batch, p, k)  # noqa: E731
            add(f"{model} b{batch} step: fused / eager img/s", _ratio(f("fused"), f("eager")), ">=", 2.0)
            add(f"{model} b{batch} step: fused / compiled eager img/s", _ratio(f("fused"), f("eager_compiled")), ">=",
                1.3)
            add(f"{model} b{batch} step: fused / eager peak memory",
                _ratio(f("fused", "peak_mem_mb"), f("eager", "peak_mem_mb")), "<=", 1.0)
            add(f"{model} b{batch} step: compiled timm / fused img/s", _ratio(f("timm_compiled"), f("fused")), "<=",
                1.35)
        else:
            f = lambda p: get(kind, model, batch, p, "img_s")  # noqa: E731
            add(f"{model} b{batch}: deployed / dense img/s", _ratio(f("deployed"), f("dense")), ">=", 1.9)
            add(f"{model} b{batch}: deployed / compiled dense img/s", _ratio(f("deployed"), f("dense_compiled")), ">=",
                1.9)
            add(f"{model} b{batch}: deployed / compiled pruned img/s", _ratio(f("deployed"), f("pruned_compiled")),
                ">=", 1.2)
    return out


def write_summary(json_path: str, out: str) -> str:
    with open(json_path) as f:
        rows = store.rows_from_run(json.load(f))
    if not rows:
        body = "(no benchmark ran)\n"
        r0: Dict = {}
    else:
        r0 = rows[0]
        body = ""
        for suite in dict.fromkeys(r["suite"] for r in rows):
            body += f"## {suite}\n\n" + store.markdown([r for r in rows if r["suite"] == suite]) + "\n"
    tg = targets(rows)
    lines = ["# Headline benchmark", "",
             f"{r0.get('device', '?')}; driver {r0.get('driver') or 'n/a'}; torch {r0.get('torch')}, triton "
             f"{r0.get('triton')}, timm {r0.get('timm')}, CUDA {r0.get('cuda')}; {r0.get('date')}, commit "
             f"{r0.get('commit')} (run {r0.get('run_id')}).", "", body, "## Targets", "",
             store.markdown(tg, ["target", "value", "bound", "status"]) if tg else "(nothing measured)\n"]
    path = os.path.join(out, "headline.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (created; its CSVs are appended to)")
    p.add_argument("--budget-s", type=float, default=None, help="cases not started within this many seconds fail")
    p.add_argument("--select", default="headline", choices=("headline", "lease"), help="the marker to run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{args.select}.json")
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE), "-m", args.select, "--benchmark-only",
           f"--benchmark-json={json_path}", "-p", "no:cacheprovider", "-v", "-rfEs",
           "--benchmark-columns=median,iqr,min,rounds", "--benchmark-sort=name"]
    if args.budget_s is not None:
        cmd.append(f"--bench-budget-s={args.budget_s}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    code = subprocess.call(cmd + extra, cwd=ROOT, env=env)
    if os.path.isfile(json_path):
        counts = store.add(json_path, args.out)
        print(f"[headline] rows: {counts}; tables and targets: {write_summary(json_path, args.out)}")
    else:
        print("[headline] no results were written")
        code = code or 1
    print(f"[headline] {'ok' if code == 0 else 'FAILED'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
