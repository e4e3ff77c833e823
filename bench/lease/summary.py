"""summary.md and summary.json of a lease check, from its work folder (steps.tsv, env.txt, logs, junit files, Triton
cache events) and its rows; rewritten after every step by ``bench/lease_check.sh``. Needs no torch.

    python -m bench.lease.summary --work WORK --out OUT --t0 EPOCH_S --deadline S [--smoke 0|1]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.lease.rows import read_rows  # noqa: E402
from bench.lease.triton_probe import tally  # noqa: E402

JUNIT = {"b": "junit_ops.xml", "e2": "junit_optests.xml"}


def _steps(work: str) -> List[Dict[str, object]]:
    out = []
    path = os.path.join(work, "steps.tsv")
    if os.path.exists(path):
        for line in open(path):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 7:
                continue
            letter, name, status, rc, wall, lim, log = parts
            out.append({"step": letter, "name": name, "status": status, "exit_code": rc, "wall_s": int(wall),
                        "limit_s": int(lim), "log": log})
    return out


def _tests(work: str, step: Dict[str, object]) -> Dict[str, object]:
    """Counts of a pytest step: from its junit file, else (killed before pytest wrote it) from the -v lines."""
    junit = os.path.join(work, JUNIT.get(str(step["step"]), "-"))
    if os.path.exists(junit):
        try:
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            agg = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                      if c.find("failure") is not None or c.find("error") is not None]
            return {"source": "junit", **agg, "failed": failed[:40]}
        except ET.ParseError:
            pass
    log = os.path.join(work, str(step["log"]))
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}
    failed = []
    if os.path.exists(log):
        for line in open(log, errors="replace"):
            m = re.search(r"(\S+::\S+).*? (PASSED|FAILED|ERROR|SKIPPED)", line) or \
                re.search(r"(PASSED|FAILED|ERROR|SKIPPED) (\S+::\S+)", line)
            if not m:
                continue
            word = m.group(2) if m.group(2) in counts else m.group(1)
            name = m.group(1) if m.group(2) in counts else m.group(2)
            counts[word] += 1
            if word in ("FAILED", "ERROR"):
                failed.append(name)
    return {"source": "log (no junit: the step did not finish)", "tests": sum(counts.values()),
            "failures": counts["FAILED"], "errors": counts["ERROR"], "skipped": counts["SKIPPED"],
            "failed": failed[:40]}


def _grep(work: str, step: Dict[str, object], patterns) -> List[str]:
    log = os.path.join(work, str(step["log"]))
    out = []
    if os.path.exists(log):
        for line in open(log, errors="replace"):
            if any(re.search(p, line) for p in patterns):
                out.append(line.strip()[:300])
    return out[:12]


def build(work: str, out: str, t0: int, deadline: int, smoke: bool) -> Dict[str, object]:
    env: Dict[str, str] = {}
    env_path = os.path.join(work, "env.txt")
    if os.path.exists(env_path):
        for line in open(env_path, errors="replace"):
            k, _, v = line.rstrip("\n").partition(": ")
            if v:
                env[k] = v
    steps = _steps(work)
    for st in steps:
        if st["status"] == "skipped":
            continue
        if st["step"] in JUNIT:
            st["tests"] = _tests(work, st)
        elif st["step"] in ("a", "a2"):
            st["key"] = _grep(work, st, [r"^prebuilt", r"^extension", r"^spvit_kernels\._C", r"^gpu:"])
        elif st["step"] == "d":
            st["key"] = _grep(work, st, [r"cases matched", r"^FAIL", r"ERROR SUMMARY", r"compute-sanitizer",
                                         r"racecheck", r"could not run"])
    rows = read_rows(os.path.join(out, "rows.jsonl"))
    ratios = [r for r in rows if "ratio" in r]
    errors = [r for r in rows if "error" in r]
    failed = any(st["status"] not in ("pass", "skipped") for st in steps)
    return {"overall": "FAIL" if failed else "PASS", "smoke": smoke, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s": int(time.time()) - t0, "deadline_s": deadline, "gpu": env.get("gpu", "-"),
            "device": env.get("device", "-"), "env": env, "steps": steps,
            "triton_cache": tally(os.path.join(work, "triton_events.jsonl")), "ratios": ratios,
            "row_errors": errors, "rows": len(rows)}


def markdown(s: Dict[str, object]) -> str:
    env = s["env"]
    lines = [f"# spvit GPU lease check{' (smoke run on a CPU: measures nothing)' if s['smoke'] else ''}", "",
             f"{s['date']}; {s['wall_s']} s of {s['deadline_s']} s; overall **{s['overall']}**", "",
             f"GPU: {s['gpu']}; device: {s['device']}", "",
             "Versions: " + "; ".join(f"{k} {env[k]}" for k in ("python", "torch", "torch.cuda", "triton", "timm")
                                      if k in env), "",
             "| step | name | status | exit | wall s | limit s | log (in lease_results.tar.gz) |",
             "|---|---|---|---|---|---|---|"]
    for st in s["steps"]:
        lines.append(f"| {st['step']} | {st['name']} | {st['status']} | {st['exit_code']} | {st['wall_s']} | "
                     f"{st['limit_s']} | {st['log']} |")
    lines.append("")
    for st in s["steps"]:
        if "tests" in st:
            t = st["tests"]
            lines.append(f"- {st['step']} {st['name']}: {t['tests']} tests, {t['failures']} failed, {t['errors']} "
                         f"errors, {t['skipped']} skipped ({t['source']})"
                         + (": " + ", ".join(t["failed"][:10]) if t["failed"] else ""))
        for k in st.get("key", []):
            lines.append(f"- {st['step']} {st['name']}: {k}")
    tc = s["triton_cache"]
    lines.append(f"- Triton kernel cache: {tc['hits']} hits, {tc['misses']} misses (compiled here)"
                 + (f": {json.dumps(tc['missed_kernels'])}" if tc["missed_kernels"] else ""))
    lines += ["", "## Ratios", ""]
    if s["ratios"]:
        lines += ["| item | case | ratio | value | details |", "|---|---|---|---|---|"]
        for r in s["ratios"]:
            det = {k: v for k, v in r.items() if k not in ("step", "time", "item", "case", "ratio", "value")}
            lines.append(f"| {r['item']} | {r['case']} | {r['ratio']} | {r['value']} | "
                         f"{json.dumps(det)[:400]} |")
    else:
        lines.append("(none measured)")
    if s["row_errors"]:
        lines += ["", "## Errors in rows", ""]
        lines += [f"- {r.get('item', r.get('step'))}: {str(r['error'])[:300]}" for r in s["row_errors"][:20]]
    lines += ["", f"{s['rows']} rows in rows.jsonl (every measured row, as measured)."]
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".part")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--t0", type=int, required=True)
    ap.add_argument("--deadline", type=int, required=True)
    ap.add_argument("--smoke", default="0")
    args = ap.parse_args(argv)
    s = build(args.work, args.out, args.t0, args.deadline, args.smoke == "1")
    _write(os.path.join(args.out, "summary.json"), json.dumps(s, indent=1, default=str))
    _write(os.path.join(args.out, "summary.md"), markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
