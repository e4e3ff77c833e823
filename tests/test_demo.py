"""`spvit demo`, smoke version: tiny epochs on the embedded digits; the full figures are checked by hand
(bench/results/demo_cpu.json)."""
import json
import os

import pytest

from spvit import cli, demo

FAST = {"teacher_epochs": 1, "search_epochs": 1, "finetune_epochs": 1, "train_limit": 128, "progress": False,
        "model_kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
                         "mlp_ratio": 2.0}}


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    s = demo.run({**FAST, "out": str(out)})
    printed = capsys.readouterr().out
    assert "teacher" in printed and "SPViT pruned" in printed and "FLOPs cut" in printed and "block" in printed
    summary = json.load(open(out / "summary.json"))
    for k in ("teacher_acc", "pruned_acc", "teacher_gflops", "pruned_gflops", "wall_s", "blocks"):
        assert k in summary
    assert summary == json.loads(json.dumps(s))
    assert len(summary["blocks"]) == 2
    assert {b["attn"] for b in summary["blocks"]} <= {"msa", "3x3", "1x1", "skip"}
    assert summary["pruned_gflops"] <= summary["teacher_gflops"]
    for stage in ("teacher", "search", "finetune"):
        assert os.path.exists(out / stage / "config.yaml") and os.path.exists(out / stage / "metrics.csv")
        assert os.path.exists(out / stage / "checkpoint.pth")
    assert os.path.exists(out / "search" / "arch.json") and os.path.exists(out / "demo.yaml")
    pytest.importorskip("matplotlib")
    assert os.path.getsize(out / "demo.png") > 1000


def test_demo_never_overwrites(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["demo", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
