"""The benchmark harness on CPU: the headline suite in smoke mode end to end, its files, and its exit status."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common, headline, run_all  # noqa: E402

SECTIONS = ("peaks", "supernet_step", "inference", "kernels")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_headline_smoke_cpu(tmp_path):
    """``run_all --suite headline --device cpu --smoke`` runs every section, writes every file, exits 0."""
    out = tmp_path / "res"
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="0")  # Triton rows: skipped (noted), not interpreted
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run_all.py"), "--suite", "headline",
                           "--device", "cpu", "--smoke", "--out", str(out), "--no-plots"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.rstrip().endswith("[run_all] ok")
    for name in SECTIONS:
        for ext in ("csv", "json", "md"):
            assert (out / f"headline_{name}.{ext}").is_file(), f"headline_{name}.{ext} missing"
    for name in ("headline.md", "headline.json", "run_all.md", "run_all.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "run_all.json").read_text())
    assert summary["status"] == "ok" and summary["parts"][0]["error_rows"] == 0

    rows = {name: _read_csv(out / f"headline_{name}.csv") for name in SECTIONS}
    for name, rs in rows.items():
        assert rs, name
        for r in rs:  # every row keyed by device, versions, date and run
            assert r["device"] and r["torch"] == torch.__version__ and r["date"] and r["run_id"]
            assert not r.get("error"), (name, r)
    peaks = {r["what"].split()[0]: r for r in rows["peaks"]}
    assert float(peaks["GEMM"]["TFLOP/s"]) > 0 and float(peaks["device-to-device"]["GB/s"]) > 0

    step = {r["provider"]: r for r in rows["supernet_step"]}
    assert set(step) == {"fused", "eager", "eager_compiled", "timm_compiled"}
    for prov, r in step.items():
        assert float(r["img_s"]) > 0 and float(r["first_call_s"]) > 0
    for prov in ("eager_compiled", "timm_compiled"):
        assert int(step[prov]["graphs"]) >= 1, "the compiled provider captured no graph"
    assert "eager" in step["eager"]["impl"]

    inf = {r["provider"]: r for r in rows["inference"]}
    assert set(inf) == {"deployed", "deployed_compiled", "pruned", "pruned_compiled", "dense_compiled"}
    for r in inf.values():
        assert float(r["img_s"]) > 0
    assert float(inf["deployed"]["max_abs_err_vs_pruned"]) < 1e-4  # fp32 deploy equals the pruned model
    assert float(inf["deployed"]["flops_ratio"]) > 1

    kern = rows["kernels"]
    ops = {r["op"] for r in kern}
    assert ops == {"gated_attn_conv", "masked_ffn", "pruned_ffn", "deploy_conv", "shift_sum"}
    for r in kern:
        if r["provider"] == "eager":
            assert float(r["ms"]) > 0 and float(r["frac_of_peak"]) > 0 and r["bound"] in ("compute", "memory")
        elif r["provider"] == "triton":  # no interpreter in this run: skipped with a note, not an error
            assert r["note"].startswith("skipped")
    assert {r["mode"] for r in kern if r["op"] in ("gated_attn_conv", "masked_ffn", "shift_sum")} == \
        {"forward", "backward"}


def test_deploy_e2e_smoke_cpu(tmp_path):
    """bench_deploy_e2e --smoke: the deployed model eager, compiled and in onnxruntime; the dense one in onnxruntime."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    provs = ["ours", "ours_compiled", "ours_onnxruntime", "dense", "dense_onnxruntime"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_deploy_e2e.py"), "--device", "cpu",
                           "--smoke", "--providers", ",".join(provs), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    all_rows = _read_csv(tmp_path / "deploy_e2e_cpu.csv")
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


def test_error_row_fails_the_run(tmp_path, monkeypatch, capsys):
    """A section that returns a row with an error makes run_all exit 1 without printing ok; the row is written."""
    monkeypatch.setattr(headline, "section_peaks", lambda cfg: [{"what": "GEMM", "error": "injected failure"}])
    code = run_all.main(["--suite", "headline", "--device", "cpu", "--smoke", "--sections", "peaks",
                         "--out", str(tmp_path), "--no-plots"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "[run_all] ok" not in printed and "[run_all] FAILED" in printed
    assert json.loads((tmp_path / "run_all.json").read_text())["status"] == "FAILED"
    rows = json.loads((tmp_path / "headline_peaks.json").read_text())
    assert rows[0]["error"] == "injected failure" and rows[0]["device"]


def test_raising_section_fails_the_run(tmp_path, monkeypatch, capsys):
    def boom(cfg):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(headline, "section_peaks", boom)
    code = run_all.main(["--suite", "headline", "--device", "cpu", "--smoke", "--sections", "peaks",
                         "--out", str(tmp_path), "--no-plots"])
    assert code == 1 and "[run_all] ok" not in capsys.readouterr().out
    rows = json.loads((tmp_path / "headline_peaks.json").read_text())
    assert "kernel launch failed" in rows[0]["error"]


def test_used_up_budget_is_a_failure(tmp_path, capsys):
    """Items not started because the time budget is used up are error rows (an incomplete run is not ok)."""
    code = run_all.main(["--suite", "headline", "--device", "cpu", "--smoke", "--sections", "supernet_step",
                         "--budget-s", "0", "--out", str(tmp_path), "--no-plots"])
    assert code == 1
    rows = json.loads((tmp_path / "headline_supernet_step.json").read_text())
    assert len(rows) == 4 and all(r["error"].startswith("not run: the time budget") for r in rows)
    assert "[run_all] ok" not in capsys.readouterr().out


def test_bench_fn_honours_warmup_and_rep():
    calls = []
    res = common.bench_fn(lambda: calls.append(1), torch.device("cpu"), warmup=3, rep=5)
    assert len(calls) == 8 and res["reps"] == 5 and res["ms_min"] <= res["ms"] <= res["ms_p80"]
    calls.clear()
    res = common.bench_backward(lambda: (calls.append(1), torch.ones(3, requires_grad=True).sum())[1],
                                torch.device("cpu"), warmup=2, rep=4)
    assert len(calls) == 6 and res["reps"] == 4
    with pytest.raises(ValueError, match="rep >= 1"):
        common.bench_fn(lambda: None, torch.device("cpu"), warmup=0, rep=0)


def test_fresh_compile_resets_dynamo():
    """Every fresh_compile starts from an empty dynamo cache: a second shape is a first compilation, not a reuse."""
    def f(x):
        return torch.sin(x) * 2

    for n in (3, 5):
        g = common.fresh_compile(f, backend="eager")
        assert torch.equal(g(torch.ones(n)), f(torch.ones(n)))
        assert common.compile_stats()["graphs"] == 1


def test_unknown_sections_and_scripts_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        run_all.main(["--suite", "full", "--device", "cpu", "--smoke", "--only", "no_such_bench", "--sections",
                      "peaks", "--out", str(tmp_path), "--no-plots"])
    cfg = headline.make_config(torch.device("cpu"), smoke=True)
    with pytest.raises(ValueError, match="unknown headline sections"):
        headline.run(cfg, str(tmp_path), ["nope"])


def test_write_rows_keeps_earlier_rows(tmp_path):
    """Results already in a CSV (other runs, other machines) are kept; a run can rewrite its own rows."""
    common.write_rows("t", [{"a": 1, "run_id": "r1"}], str(tmp_path))
    common.write_rows("t", [{"a": 2, "b": "x", "run_id": "r2"}], str(tmp_path))
    common.write_rows("t", [{"a": 3, "run_id": "r2"}, {"a": 4, "run_id": "r2"}], str(tmp_path), replace_run="r2")
    rows = _read_csv(tmp_path / "t.csv")
    assert [r["a"] for r in rows] == ["1", "3", "4"] and list(rows[0]) == ["a", "run_id", "b"]
    assert json.loads((tmp_path / "t.json").read_text()) == [{"a": 3, "run_id": "r2"}, {"a": 4, "run_id": "r2"}]
