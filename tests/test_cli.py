"""The `spvit` command: config resolution, shipped configs, exit code 2 on bad input, eval / deploy round trip."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from spvit import cli, search
from .pipeline_helpers import dense_gflops, repo_root, tiny_search_cfg

TINY = ["--model", "spvit_demo_vit", "--model-kwargs", json.dumps({"img_size": 8, "patch_size": 2, "in_chans": 1,
        "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}), "--pretrained", "none", "--data", "digits",
        "--device", "cpu", "--batch-size", "16", "--epochs", "1", "--num-workers", "0", "--no-progress",
        "--no-repeated-aug", "--no-scale-lr", "--mixup", "0", "--cutmix", "0"]


def _tiny_yaml(tmp_path, **over):
    cfg = {"train_limit": 64, "val_limit": 32, "tensorboard": False, **over}
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_config_then_flags_and_resolved_config_saved(tmp_path):
    conf = _tiny_yaml(tmp_path, loss_lambda=123.0, arc_lr=0.3, seed=7)
    out = tmp_path / "run"
    rc = cli.main(["search", "--config", conf, *TINY, "--out", str(out), "--arc-lr", "0.05",
                   "--target-gflops", str(0.7 * dense_gflops())])
    assert rc == 0
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["loss_lambda"] == 123.0  # from the YAML
    assert saved["arc_lr"] == 0.05  # the flag overrides the YAML
    assert saved["seed"] == 7 and saved["config_file"] == conf
    assert saved["weight_decay"] == 0.05  # default
    assert os.path.exists(out / "arch.json")


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(repo_root(), "configs"))
                                        if n.startswith("deit_")))
def test_shipped_configs_resolve(name):  # Swin configs: tests/test_swin_cli.py
    from spvit.config import FinetuneConfig, SearchConfig

    cls = SearchConfig if "search" in name else FinetuneConfig
    args = cli.build_parser().parse_args(["search" if "search" in name else "finetune", "--config", name[:-5]])
    c = cli.resolve_config(cls, args)
    assert c.lr == 5e-5 and c.weight_decay == 0.05 and c.drop_path == 0.1
    assert c.mixup == 0.8 and c.cutmix == 1.0 and c.smoothing == 0.1 and c.repeated_aug
    gpus = 4 if "_ti_" in name else 8
    assert c.lr * c.batch_size * gpus / 512 == pytest.approx(1e-4)  # effective lr of the original runs
    if "search" in name:
        tag = name.split("_")[2:4]  # e.g. l30, t32
        assert c.loss_lambda == pytest.approx(int(tag[0][1:].lstrip("0") or 0) / (100 if tag[0][1] == "0" else 10))
        assert c.target_gflops == pytest.approx(int(tag[1][1:]) / 10)
        assert c.epochs == 21 and c.sched_epochs == 300 and c.min_lr == 1e-4
        assert c.arc_lr == (5e-4 if "_sm_" in name else 1e-3)
    else:
        assert c.min_lr == 1e-5 and c.epochs == (200 if "dist" in name else 130)
        assert c.distillation == ("hard" if "dist" in name else "none")


def _rc(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def test_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    rc, err = _rc(["search", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], capsys)
    assert rc == 2 and "dataset folder not found" in err
    rc, err = _rc(["search", "--data", str(tmp_path / "flat"), "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "no 'train' folder" in err
    conf = _tiny_yaml(tmp_path)
    for t, msg in ((1e-9, "cannot be met"), (10 * dense_gflops(), "cannot be met")):
        rc, err = _rc(["search", "--config", conf, *TINY, "--out", str(tmp_path / f"t{t}"), "--target-gflops",
                       str(t)], capsys)
        assert rc == 2 and msg in err and "dense model" in err
        assert not os.path.exists(tmp_path / f"t{t}")  # nothing written before validation passed
    rc, err = _rc(["search", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o3")], capsys)
    assert rc == 2 and "config file not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1\nnot_a_setting: 3\n")
    rc, err = _rc(["search", "--config", str(bad)], capsys)
    assert rc == 2 and "not_a_setting" in err
    rc, err = _rc(["finetune", "--arch", str(tmp_path / "none.json"), "--data", "digits", "--out",
                   str(tmp_path / "o4")], capsys)
    assert rc == 2 and "not found" in err


def test_existing_run_folder_and_incompatible_arch(tmp_path, capsys):
    res = search.run(tiny_search_cfg(tmp_path / "s", epochs=1, train_limit=64, val_limit=32))
    conf = _tiny_yaml(tmp_path)
    argv = ["search", "--config", conf, *TINY, "--out", str(tmp_path / "s"), "--target-gflops",
            str(0.6 * dense_gflops())]
    rc, err = _rc(argv, capsys)
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert cli.main(argv + ["--overwrite"]) == 0
    # the architecture of the tiny model applied to a bigger model
    other = TINY.copy()
    other[other.index("--model-kwargs") + 1] = json.dumps({"img_size": 8, "patch_size": 2, "in_chans": 1,
                                                           "embed_dim": 48, "depth": 2, "num_heads": 2})
    rc, err = _rc(["finetune", "--config", conf, *other, "--arch", res["arch"], "--out", str(tmp_path / "f")],
                  capsys)
    assert rc == 2 and "does not fit" in err


def test_finetune_eval_deploy_round_trip(tmp_path, capsys):
    res = search.run(tiny_search_cfg(tmp_path / "s", epochs=1, train_limit=64, val_limit=32))
    conf = _tiny_yaml(tmp_path)
    ft = tmp_path / "ft"
    assert cli.main(["finetune", "--config", conf, *TINY, "--arch", res["arch"], "--out", str(ft)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(ft / "best.pth"), "--data", "digits", "--device", "cpu"]) == 1 - 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    r = json.loads(line)
    best = torch.load(ft / "best.pth", weights_only=True)
    assert r["images"] == 360 and r["gflops"] == pytest.approx(res["gflops"]) and 0 <= r["acc1"] <= 100
    dep = tmp_path / "deployed"
    assert cli.main(["deploy", "--checkpoint", str(ft / "best.pth"), "--out", str(dep)]) == 0
    assert os.path.exists(dep / "arch.json") and best["arch"] == json.load(open(dep / "arch.json"))
    if importlib.util.find_spec("onnx") is not None:  # --format onnx: the ONNX file beside deployed.pth
        assert cli.main(["deploy", "--checkpoint", str(ft / "best.pth"), "--out", str(dep), "--overwrite",
                         "--no-export", "--format", "onnx"]) == 0
        assert os.path.getsize(dep / "model.onnx") > 0
    assert cli.main(["bench", "--checkpoint", str(ft / "best.pth"), "--iters", "2", "--batch-size", "8",
                     "--device", "cpu"]) == 0


def test_entry_points_as_a_user_runs_them(tmp_path):
    env = {**os.environ, "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "spvit", "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "demo" in p.stdout and "finetune" in p.stdout
    p = subprocess.run([sys.executable, "-m", "spvit", "search", "--data", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.strip().startswith("spvit: error:") and len(p.stderr.splitlines()) == 1


def test_version_and_help_import_neither_torch_nor_timm(tmp_path):
    """`spvit --version` and `spvit <command> --help` are answered by the parser alone: with a `torch` and a `timm`
    that fail on import first on the path, they still work (and a command that runs does import them)."""
    for name in ("torch", "timm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), repo_root()])}
    for argv, expect in ((["--version"], "spvit 0."), (["-h"], "compress"), (["deploy", "--help"], "--format"),
                         (["compress", "--recipe", "quick", "-h"], "--stop-after")):
        p = subprocess.run([sys.executable, "-m", "spvit", *argv], capture_output=True, text=True, env=env)
        assert p.returncode == 0 and expect in p.stdout, (argv, p.stdout[-300:], p.stderr[-600:])
    p = subprocess.run([sys.executable, "-m", "spvit"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.startswith("spvit: error:") and "COMMAND" in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "spvit", "eval", "--data", "digits"], capture_output=True, text=True,
                       env=env)
    assert p.returncode != 0 and "torch imported" in p.stderr, p.stderr[-600:]
