"""The benchmark suite (bench/, pytest-benchmark) on CPU: a smoke run of every case table, a timed run saved and
compared with pytest-benchmark's regression check, the results store and the headline targets."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import cases, headline, store  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # in CI (the test extra installs it) a missing plugin is a failure, elsewhere a skip
    if os.environ.get("CI"):
        raise
    pytest.skip("pytest-benchmark is not installed (pip install -e .[test])", allow_module_level=True)

ONE_CASE = "shift_sum-tiny-T9-b2-fp32-fwd-eager"


def _pytest_bench(*args, timeout=240):
    # a test of an xdist worker: the child pytest is no xdist worker (pytest-benchmark disables itself in those)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = ROOT
    env.pop("SPVIT_BENCH_SMOKE", None)
    env.pop("TRITON_INTERPRET", None)  # the bench conftest sets it for smoke runs
    return subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "bench"), "-p", "no:cacheprovider",
                           "--bench-smoke", "--bench-device", "cpu", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_suite_smoke_runs_every_table():
    """Every op case x mode x provider (Triton in the interpreter, the extension, eager; torch.compile on one op) and
    the end-to-end step and inference once, untimed: the harness cannot rot without this failing."""
    proc = _pytest_bench("--benchmark-disable", "-q", "-rfEs", "-k", "not compiled or shift_sum")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = out.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, summary
    n_expected = 0
    for case in cases.kernel_cases("smoke"):
        n_provs = sum(1 for p in cases.OP_PROVIDERS[case.op] if p != "compiled" or case.op == "shift_sum")
        n_expected += n_provs * len(cases.OP_MODES[case.op])
    n_expected += 3 + 3  # step: fused, eager, timm... ; infer: deployed, pruned, dense (the compiled ones deselected)
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= n_expected - 1, (passed, n_expected, summary)
    assert "skipped" not in summary or os.environ.get("SPVIT_NO_EXT"), summary


def test_timed_runs_are_saved_and_compared(tmp_path):
    """A saved run of one case; a second run compared with it by pytest-benchmark, the stored run made 1000x faster
    first, so that ``--benchmark-compare-fail=median:10%`` must fail; the store reads the saved JSON."""
    storage = f"file://{tmp_path / 'runs'}"
    common = ["--benchmark-only", f"--benchmark-storage={storage}", "--bench-rounds", "3", "-q", "-k", ONE_CASE]
    first = _pytest_bench(*common, "--benchmark-autosave")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = sorted((tmp_path / "runs").rglob("0001_*.json"))
    assert len(saved) == 1
    run = json.loads(saved[0].read_text())
    (bench,) = run["benchmarks"]
    assert bench["stats"]["rounds"] == 3 and bench["group"] == "shift_sum-tiny-T9-b2-fp32-fwd"
    extra = bench["extra_info"]
    assert extra["provider"] == "eager" and extra["gbs"] > 0 and 0 < extra["frac_of_peak"]
    assert extra["bound"] == "memory" and extra["max_abs_err_vs_eager"] == 0.0
    info = run["machine_info"]["spvit"]
    assert info["libraries"]["torch"] == torch.__version__ and info["tier"] == "smoke"

    for b in run["benchmarks"]:  # the stored run, made 1000x faster: the current run is a regression
        b["stats"] = {k: (v / 1000 if isinstance(v, float) else v) for k, v in b["stats"].items()}
    saved[0].write_text(json.dumps(run))
    second = _pytest_bench(*common, "--benchmark-compare=0001", "--benchmark-compare-fail=median:10%")
    out = second.stdout + second.stderr
    assert second.returncode != 0 and "Performance has regressed" in out, out[-3000:]
    assert "(0001_" in out and "(NOW)" in out  # both runs in the comparison table

    rows = store.rows_from_run(json.loads(saved[0].read_text()))
    assert rows[0]["suite"] == "kernels" and rows[0]["torch"] == torch.__version__ and rows[0]["run_id"]
    store.append(rows, str(tmp_path / "kernels.csv"))
    store.append(rows, str(tmp_path / "kernels.csv"))  # the same run again: replaced, not duplicated
    assert len(store.read_csv(str(tmp_path / "kernels.csv"))) == 1


def test_deploy_e2e_script_smoke_cpu(tmp_path):
    """bench_deploy_e2e --smoke (a whole-model script): the deployed model eager, compiled and in onnxruntime; the
    dense one in onnxruntime."""
    import csv

    env = dict(os.environ, PYTHONPATH=ROOT)
    provs = ["ours", "ours_compiled", "ours_onnxruntime", "dense", "dense_onnxruntime"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_deploy_e2e.py"), "--device", "cpu",
                           "--smoke", "--providers", ",".join(provs), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(tmp_path / "deploy_e2e_cpu.csv", newline="") as f:
        all_rows = list(csv.DictReader(f))
    assert {r["arch"] for r in all_rows} == {"demo_like", "swin_demo_like"}  # a small ViT and a small Swin
    for arch in ("demo_like", "swin_demo_like"):
        rows = {r["provider"]: r for r in all_rows if r["arch"] == arch}
        assert set(rows) == set(provs), arch
        for prov, r in rows.items():
            assert not r["error"], (arch, prov, r["error"])
            assert float(r["img_s"]) > 0 and r["batch"] == "2"
        assert float(rows["ours"]["max_abs_err"]) < 1e-4
        assert float(rows["ours_onnxruntime"]["flops_ratio"]) > 1
        assert float(rows["dense_onnxruntime"]["flops_ratio"]) == 1


def test_budget_used_up_fails_the_case():
    """A case not started within ``--bench-budget-s`` fails ("not run"); with time left it starts."""
    from bench import conftest as bench_conftest

    class Item:
        def __init__(self, budget):
            self.config = type("C", (), {"getoption": staticmethod(lambda name: budget)})()

    bench_conftest.pytest_runtest_setup(Item(None))
    bench_conftest.pytest_runtest_setup(Item(1e9))
    with pytest.raises(pytest.fail.Exception, match="not run: the time budget of 0 s was used up"):
        bench_conftest.pytest_runtest_setup(Item(0.0))


def test_case_tables_and_inputs():
    """The tables hold the model shapes; every selection is a subset; inputs are the same for every provider."""
    gpu = cases.kernel_cases("gpu")
    assert {c.shape for c in gpu} >= {"deit_ti", "deit_s", "deit_b", "swin_ts-s1", "swin_ts-s3"}
    assert {c.dtype for c in gpu} == {"bf16", "fp32"} and len({c.id for c in gpu}) == len(gpu)
    for tier in ("gpu", "cpu"):
        ops, e2e = cases.select("headline", tier)
        assert {c.op for c in ops} == set(cases.OPS) and {c.kind for c in e2e} == {"step", "infer"}
        lease_ops, lease_e2e = cases.select("lease", tier)
        assert set(lease_ops) <= set(ops) and set(lease_e2e) <= set(e2e)
    with pytest.raises(ValueError, match="unknown selection"):
        cases.select("nope", "cpu")
    case = cases.kernel_cases("smoke", ops=["masked_ffn"])[0]
    dev = torch.device("cpu")
    f_eager, leaves = cases.build(case, "eager", dev)
    f_again, _ = cases.build(case, "eager", dev)
    torch.testing.assert_close(f_eager(), f_again(), rtol=0, atol=0)  # same seed, same inputs
    assert len(leaves) == 6 and all(t.requires_grad for t in leaves)
    with pytest.raises(cases.Unavailable):
        cases.provider_fn("masked_ffn", "ext", dev)


def test_headline_targets():
    rows = [{"kind": "step", "model": "m", "batch": "8", "provider": p, "img_s": v, "peak_mem_mb": mem}
            for p, v, mem in (("fused", 30, 90), ("eager", 10, 100), ("eager_compiled", 25, 80))]
    got = {t["target"]: t["status"] for t in headline.targets(rows)}
    assert got["m b8 step: fused / eager img/s"] == "met"
    assert got["m b8 step: fused / compiled eager img/s"] == "NOT met"
    assert got["m b8 step: fused / eager peak memory"] == "met"
    assert got["m b8 step: compiled timm / fused img/s"] == "not measured"
