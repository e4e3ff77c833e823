"""``spvit compress``: a tiny ViT on the digits through every stage with a speedup target on CPU; a kill in each stage
then ``--resume``; targets out of reach refused before anything is written; recipes; the report's verdict."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from spvit import checkpoints, cli, compress, compress_plan, engine, runs
from spvit.config import ConfigError
from spvit.distributed import DistInfo
from spvit.data import DataConfig, build_datasets
from .pipeline_helpers import TINY_MODEL, repo_root


def tiny(out, **over):
    """A run of a few seconds: 8x8 digits, a 2-block ViT trained 1 epoch as the teacher, 1-epoch search and
    fine-tune, the latency measured with small budgets."""
    d = dict(model="spvit_demo_vit", model_kwargs=dict(TINY_MODEL), pretrained="none", data="digits", out=str(out),
             device="cpu", threads=1, progress=False, target_speedup=1.3, recipe="quick", teacher_epochs=1,
             train={"train_limit": 64, "val_limit": 32, "batch_size": 16, "num_workers": 0, "tensorboard": False,
                    "lr": 1e-3, "scale_lr": False, "min_lr": 1e-5, "mixup": 0.0, "cutmix": 0.0,
                    "repeated_aug": False},
             search={"epochs": 1, "arc_lr": 0.2, "min_lr": 1e-3}, finetune={"epochs": 1},
             profile_budget=0.0, measure_rounds=3, measure_budget=0.0)
    d.update(over)
    return d


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    s = compress.run(compress_plan.CompressConfig.from_dict(tiny(out)))
    return out, s


def test_every_stage_with_a_speedup_target(full):
    out, s = full
    for f in ("compress.yaml", "stages.json", "latency.json", "teacher/best.pth", "search/arch.json",
              "search/checkpoint.pth", "finetune/best.pth", "finetune/arch.json", "deploy/deployed.pth",
              "deploy/arch.json", "measure.json", "report.md", "summary.json"):
        assert os.path.isfile(out / f), f
    assert json.load(open(out / "stages.json"))["done"] == list(compress_plan.STAGES)
    assert s == json.load(open(out / "summary.json"))
    # the search ran against the table profiled in this run, FFN widths aligned to its grid step
    table = json.load(open(out / "latency.json"))
    import yaml

    scfg = yaml.safe_load(open(out / "search" / "config.yaml"))
    assert scfg["latency_table"] == str(out / "latency.json") and scfg["target_speedup"] == 1.3
    dense_gflops = s["achieved"]["dense_gflops"]  # no original lambda for this model: lambda_rel / dense GFLOPs^2
    assert scfg["loss_lambda"] == pytest.approx(compress_plan.LAMBDA_REL / dense_gflops ** 2)
    assert scfg["ffn_align"] == s["ffn_align"] == table["meta"]["ffn_step"]
    fcfg = yaml.safe_load(open(out / "finetune" / "config.yaml"))
    assert fcfg["teacher"] == str(out / "teacher" / "best.pth") and fcfg["distillation"] == "hard"
    assert fcfg["init"] == str(out / "search" / "checkpoint.pth")
    # the measured speedup is a real measurement: finite, recorded per round with its spread
    a = s["achieved"]
    sp = a["measured_speedup_spread"]
    m = json.load(open(out / "measure.json"))["latency"]
    assert len(m["speedup_rounds"]) == sp["rounds"] == 3
    assert all(math.isfinite(v) and v > 0 for v in m["speedup_rounds"])
    assert sp["min"] == min(m["speedup_rounds"]) and sp["max"] == max(m["speedup_rounds"])
    assert sp["min"] <= sp["q1"] <= a["measured_speedup"] <= sp["q3"] <= sp["max"]
    assert a["measured_speedup"] == sorted(m["speedup_rounds"])[1]
    assert math.isfinite(a["predicted_ms"]) and a["predicted_speedup"] >= 1.0
    # accuracies: the checkpoints evaluated independently on the validation split
    _, val = build_datasets("digits", DataConfig(input_size=8), need_train=False)
    loader = torch.utils.data.DataLoader(val, batch_size=50)
    for path, key in (("teacher/best.pth", "dense_val_acc"), ("finetune/best.pth", "compressed_val_acc")):
        model = checkpoints.model_from_checkpoint(runs.load_torch_file(str(out / path)), path).eval()
        assert engine.evaluate(model, loader, DistInfo(), show=False)["acc1"] == pytest.approx(a[key])
    arch = json.load(open(out / "finetune" / "arch.json"))
    assert [b["attn"] for b in s["blocks"]] == [b["attn"] for b in arch["blocks"]]
    assert a["compressed_gflops"] <= a["dense_gflops"]
    # the deployed model is the fine-tuned one
    from spvit import load_deployed

    dep = load_deployed(str(out / "deploy" / "deployed.pth"))
    pruned = checkpoints.model_from_checkpoint(runs.load_torch_file(str(out / "finetune/best.pth")), "ft").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), pruned(x), rtol=1e-4, atol=1e-4)
    report = open(out / "report.md").read()
    assert "Measured speedup" in report and f"{a['measured_speedup']:.3f}x" in report
    assert f"spvit compress --out {out} --resume" in report and "torch" in report
    metrics = _rows(out / "search" / "metrics.csv")
    assert [r["epoch"] for r in s["search_epochs"]] == [int(r["epoch"]) for r in metrics] == [0]
    assert s["search_epochs"][0]["predicted_ms"] == pytest.approx(float(metrics[0]["pred_ms"]))
    off = abs(a["measured_speedup"] / 1.3 - 1) > compress.MISS_TOLERANCE
    assert (s["verdict"] is not None) == off and ((s["verdict"] in report) if off else True)
    pytest.importorskip("matplotlib")
    assert os.path.getsize(out / "report.png") > 1000


DRIVER = """
import json, sys
from spvit import compress
compress.cli_run(json.loads(sys.argv[1]), None)
"""


def _rows(path):
    return list(csv.DictReader(open(path)))


@pytest.mark.slow
def test_kill_in_each_stage_then_resume(tmp_path):
    """A kill (os._exit, as kill -9) in every stage in turn; each ``--resume`` continues the stage it stopped in."""
    out = tmp_path / "run"
    cfg = tiny(out, teacher_epochs=2, search={"epochs": 2, "arc_lr": 0.2, "min_lr": 1e-3}, finetune={"epochs": 2})
    env = {**os.environ, "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # (crash point, the stage it is in): the teacher and the search are killed after their first epoch's checkpoint,
    # the fine-tune after its last one (finished, not yet marked done)
    kills = [("after_checkpoint:0", "teacher"), ("writing_latency.json", "profile"), ("after_checkpoint:0", "search"),
             ("compress_finetune_done", "finetune"), ("writing_deployed.pth", "deploy"),
             ("writing_measure.json", "measure"), ("writing_report.md", "report")]
    for i, (point, stage) in enumerate(kills):
        flags = cfg if i == 0 else {"out": str(out), "resume": True}
        p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(flags)], env={**env, runs.CRASH_ENV: point},
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 137, (point, p.stderr[-2000:])
        done = json.load(open(out / "stages.json"))["done"]
        assert done == list(compress_plan.STAGES[:compress_plan.STAGES.index(stage)]), (point, done)
    s = compress.cli_run({"out": str(out), "resume": True}, None)
    assert json.load(open(out / "stages.json"))["done"] == list(compress_plan.STAGES)
    assert s == json.load(open(out / "summary.json")) and math.isfinite(s["achieved"]["measured_speedup"])
    for stage in ("teacher", "search", "finetune"):  # resumed from their checkpoints: no epoch lost or repeated
        assert [int(r["epoch"]) for r in _rows(out / stage / "metrics.csv")] == [0, 1], stage
        assert torch.load(out / stage / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert json.load(open(out / "finetune" / "arch.json"))["blocks"] == json.load(open(out / "search" / "arch.json"))[
        "blocks"]
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".spvit-tmp")]
    assert not leftovers
    assert cli.main(["compress", "--out", str(out), "--resume"]) == 0  # a finished run: nothing left to do


def test_unreachable_target_and_bad_input_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["compress", "--model", "spvit_demo_vit", "--model-kwargs", json.dumps(TINY_MODEL), "--pretrained",
            "none", "--data", "digits", "--device", "cpu", "--out", str(out), "--no-progress", "--profile-budget",
            "0"]
    cases = [(["--target-gflops", "1e-9"], "between"), (["--target-gflops", "5"], "between"),
             (["--target-speedup", "1000"], "between 1"), (["--target-speedup", "1.5", "--target-gflops", "1"],
                                                           "exactly one target"),
             (["--target-gflops", "1e-4", "--recipe", "paper"], "no original configuration"),
             (["--target-gflops", "1e-4", "--device", "cuda:x"], "--device")]
    for extra, want in cases:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("spvit: error:") and want in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists(), extra
        if "--target-speedup" in extra and "--target-gflops" not in extra:
            # the range named is the one of the table just measured (dense / everything pruned)
            hi = float(err.split("between 1 (dense")[1].split(") and ")[1].split()[0])
            assert 1 < hi < 1000
    for flag, value, want in (("--model", "no_such_model_xyz", "no_such_model_xyz"),
                              ("--data", str(tmp_path / "missing"), "missing")):
        args = list(base) + ["--target-gflops", "1e-4"]
        args[args.index(flag) + 1] = value
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("spvit: error:") and want in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_recipes():
    paper = compress_plan.recipe_settings("paper", "deit_small_patch16_224")
    assert paper["search"]["epochs"] == 21 and paper["search"]["loss_lambda"] == 3.0
    assert paper["search"]["sched_epochs"] == 300 and paper["finetune"]["epochs"] == 200
    assert paper["finetune"]["distillation"] == "hard" and "teacher" not in paper["finetune"]
    assert "target_gflops" not in paper["search"] and "out" not in paper["search"]
    quick = compress_plan.recipe_settings("quick", "deit_small_patch16_224")
    f = compress_plan.QUICK_FRACTION
    assert quick["search"]["epochs"] == max(1, round(21 * f)) and quick["finetune"]["epochs"] == round(200 * f)
    assert quick["search"]["sched_epochs"] == round(300 * f) and quick["search"]["lr"] == paper["search"]["lr"]
    assert compress_plan.recipe_settings("paper", "swin_tiny_patch4_window7_224")["search"]["arc_sched_epochs"] == 150
    assert compress_plan.recipe_settings("none", "anything") == {"search": {}, "finetune": {}}
    with pytest.raises(ConfigError, match="no original configuration"):
        compress_plan.recipe_settings("paper", "resnet50")


def test_verdict_says_plainly_when_the_speedup_misses():
    cfg = compress_plan.CompressConfig(model="m", data="digits", out="x", target_speedup=2.0)

    def m(speedup, pred, lo, hi):
        return {"latency": {"speedup": speedup, "predicted_speedup": pred, "speedup_min": lo, "speedup_max": hi,
                            "dense_ms": 10.0}, "compressed_gflops": 1.0}

    assert compress.verdict(cfg, m(2.1, 2.0, 1.9, 2.2), None) is None
    v = compress.verdict(cfg, m(1.5, 2.0, 1.4, 1.6), None)
    assert "1.5x is -25% from the requested 2x" in v and "prediction" in v
    v = compress.verdict(cfg, m(1.5, 1.5, 1.4, 1.6), None)
    assert "search ended away from its target" in v and "moved too little" in v
    assert "overshot" in compress.verdict(cfg, m(3.0, 3.1, 2.8, 3.2), None)
    g = compress_plan.CompressConfig(model="m", data="digits", out="x", target_gflops=2.0)
    assert compress.verdict(g, m(1, 1, 1, 1), None).startswith("The compressed model has 1 GFLOPs, -50%")


def test_cli_stop_after_a_stage_continue_by_hand_and_resume(tmp_path, capsys):
    """`--stop-after search` leaves the search's files (as `spvit search` writes them); `--resume` goes on from the
    next stage; a YAML file overrides the recipe for every training stage and per stage."""
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {train_limit: 64, val_limit: 32, batch_size: 16, num_workers: 0, tensorboard: false}\n"
                   "search: {epochs: 1, arc_lr: 0.2}\nfinetune: {epochs: 1}\nmeasure_rounds: 1\nmeasure_budget: 0\n")
    base = ["compress", "--config", str(cfg), "--model", "spvit_demo_vit", "--model-kwargs", json.dumps(TINY_MODEL),
            "--pretrained", "none", "--data", "digits", "--device", "cpu", "--threads", "1", "--no-progress",
            "--out", str(out)]
    assert cli.main(base + ["--target-gflops", "2e-4", "--stop-after", "search"]) == 0
    assert "continue with: spvit compress --out" in capsys.readouterr().out
    assert json.load(open(out / "stages.json"))["done"] == ["teacher", "profile", "search"]
    assert os.path.isfile(out / "search" / "arch.json") and not os.path.exists(out / "finetune")
    assert not os.path.exists(out / "latency.json")  # a FLOPs target: no table
    saved = yaml_load(out / "search" / "config.yaml")
    assert (saved["epochs"], saved["arc_lr"], saved["train_limit"], saved["target_gflops"]) == (1, 0.2, 64, 2e-4)
    assert cli.main(["compress", "--out", str(out), "--resume", "--seed", "5"]) == 2  # a changed setting
    assert "--seed 0 -> 5" in capsys.readouterr().err
    assert cli.main(["compress", "--out", str(out), "--resume"]) == 0
    assert "measured speedup" in capsys.readouterr().out
    s = json.load(open(out / "summary.json"))
    assert s["request"] == {"target_gflops": 2e-4} and s["achieved"]["measured_speedup_spread"]["rounds"] == 1
    assert yaml_load(out / "finetune" / "config.yaml")["epochs"] == 1


def yaml_load(path):
    import yaml

    return yaml.safe_load(open(path))
