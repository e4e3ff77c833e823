"""Run folders and user files: the marker, --overwrite rules, the lock, safe loading (a crafted pickle must not run
code through any path), and one `spvit: error:` line with exit code 2 for every bad input."""
import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
import yaml

from spvit import cli, runs, search
from .pipeline_helpers import dense_gflops, repo_root, tiny_args, tiny_cfg, tiny_search_cfg, tiny_yaml


def _rc(argv, capsys):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors (same one-line format)
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.err


def _main(argv):
    return cli.main([str(a) for a in argv])


def _one_error_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith("spvit: error:")


def _search_argv(tmp_path, out, *extra):
    argv = ["search", "--config", tiny_yaml(tmp_path), *tiny_args(), "--out", out, "--target-gflops",
            str(0.7 * dense_gflops()), *extra]
    return [str(a) for a in argv]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A finished tiny search and fine-tune (shared by the tests that need real checkpoints)."""
    from spvit import finetune

    d = tmp_path_factory.mktemp("runs")
    s = search.run(tiny_search_cfg(d / "search", epochs=1, train_limit=64, val_limit=32))
    finetune.run(tiny_cfg(finetune.DEFAULTS, d / "ft", arch=s["arch"], init="none", epochs=1, train_limit=64,
                          val_limit=32))
    return d


# ----------------------------------------------------------------------------------------------------------------
# --overwrite and the marker


def test_overwrite_refuses_cwd_home_root_and_foreign_folders(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep")
    rc, err = _rc(_search_argv(tmp_path, mine, "--overwrite"), capsys)
    assert rc == 2 and _one_error_line(err) and "not a run folder" in err
    assert (mine / "important.txt").read_text() == "keep"
    # the current folder, even when it is a run folder
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("keep")
    (cwd / runs.MARKER).write_text("{}")
    monkeypatch.chdir(cwd)
    rc, err = _rc(_search_argv(tmp_path, ".", "--overwrite"), capsys)
    assert rc == 2 and _one_error_line(err) and "refused" in err and (cwd / "notes.txt").read_text() == "keep"
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(runs.RunError, match="home folder"):
        runs.check_out(str(home), overwrite=True)
    with pytest.raises(runs.RunError, match="refused"):
        runs.check_out("/", overwrite=True)
    assert (home / "thesis.tex").read_text() == "keep"


def test_overwrite_removes_only_what_the_package_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(_search_argv(tmp_path, out)) == 0
    assert (out / runs.MARKER).exists() and (out / "checkpoint.pth").exists()
    (out / "my_notes.txt").write_text("keep")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.py").write_text("keep")
    assert _main(_search_argv(tmp_path, out, "--overwrite")) == 0
    assert (out / "my_notes.txt").read_text() == "keep" and (out / "analysis" / "plot.py").read_text() == "keep"
    assert (out / "checkpoint.pth").exists() and not list(out.glob("*.spvit-tmp"))


def test_nothing_is_written_before_validation_and_a_retry_needs_no_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    for bad in (["--target-gflops", "1e-9"], ["--pretrained", str(tmp_path / "missing.pth")], ["--lr", "inf"],
                ["--num-classes", "3"]):
        rc, err = _rc(_search_argv(tmp_path, out, *bad), capsys)
        assert rc == 2 and _one_error_line(err), (bad, err)
        assert not out.exists(), bad
    assert _main(_search_argv(tmp_path, out)) == 0


# ----------------------------------------------------------------------------------------------------------------
# The lock


HOLD = """
import sys, time
from spvit import runs
lock = runs.try_lock(sys.argv[1])
print("locked" if lock else "busy", flush=True)
time.sleep(60)
"""


def test_a_folder_in_use_is_refused_and_a_dead_owner_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(_search_argv(tmp_path, out)) == 0
    env = {**os.environ, "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "locked"
        for extra in (["--overwrite"], ["--resume", "--epochs", "2", "--allow-changes"]):
            rc, err = _rc(_search_argv(tmp_path, out, *extra), capsys)
            assert rc == 2 and _one_error_line(err) and "in use by process" in err and str(p.pid) in err, extra
        assert (out / "checkpoint.pth").exists()  # --overwrite did not touch the live run
    finally:
        p.kill()
        p.wait()
    # the holder died (as after kill -9): its lock file stays, but the lock is free
    assert (out / runs.LOCK).exists()
    assert _main(_search_argv(tmp_path, out, "--overwrite")) == 0
    assert not (out / runs.LOCK).exists()  # released at the end of the run


# ----------------------------------------------------------------------------------------------------------------
# Safe loading: a crafted pickle runs no code


class _Boom:
    """Unpickling this calls open(path, "w"): it creates a file, proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(tmp_path, name, raw=False):
    marker = tmp_path / f"{name}.ran"
    path = tmp_path / f"{name}.pth"
    obj = {"model": {"w": torch.zeros(1)}, "payload": _Boom(str(marker)), "model_name": "spvit_demo_vit",
           "arch": {}, "epoch": 0, "optimizers": [], "rng": []}
    if raw:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path)
    return path, marker


def test_crafted_pickle_is_a_working_exploit(tmp_path):
    """The control: loading it the unsafe way does run code (so the tests below can fail)."""
    path, marker = _crafted(tmp_path, "control")
    torch.load(path, weights_only=False)  # deliberately unsafe: the test's own crafted file, in a temporary folder
    assert marker.exists()


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "plain-pickle"])
@pytest.mark.parametrize("case", ["eval", "bench", "init", "teacher", "teacher-weights", "search-pretrained",
                                  "finetune-pretrained", "eval-pretrained", "resume"])
def test_crafted_pickle_runs_no_code(case, raw, tmp_path, runs_dir, capsys):
    path, marker = _crafted(tmp_path, case, raw)
    arch = str(runs_dir / "search" / "arch.json")
    ft = ["finetune", "--config", tiny_yaml(tmp_path), *tiny_args(), "--arch", arch, "--out", tmp_path / "o"]
    argv = {
        "eval": ["eval", "--checkpoint", path, "--data", "digits", "--device", "cpu"],
        "bench": ["bench", "--checkpoint", path, "--iters", "1", "--device", "cpu"],
        "init": ft + ["--init", path],
        "teacher": ft + ["--init", "none", "--distillation", "hard", "--teacher", path],
        "teacher-weights": ft + ["--init", "none", "--distillation", "hard", "--teacher", "spvit_demo_vit",
                                 "--teacher-weights", path],
        "search-pretrained": _search_argv(tmp_path, tmp_path / "o", "--pretrained", path),
        "finetune-pretrained": ft + ["--pretrained", path],
        "eval-pretrained": ["eval", "--model", "spvit_demo_vit", "--model-kwargs", '{"img_size": 8, "patch_size": 2, '
                            '"in_chans": 1}', "--pretrained", path, "--data", "digits", "--device", "cpu"],
        "resume": None,
    }[case]
    if case == "resume":  # a planted checkpoint.pth in a real run folder
        out = tmp_path / "planted"
        assert _main(_search_argv(tmp_path, out)) == 0
        os.replace(path, out / "checkpoint.pth")
        argv = ["search", "--out", out, "--resume"]
    rc, err = _rc(argv, capsys)
    assert not marker.exists(), f"code ran through {case}"
    assert rc == 2 and _one_error_line(err), err
    assert "Python objects" in err or "not loaded" in err or "not a" in err, err


def test_whole_module_teacher_needs_the_opt_in_flag(tmp_path, runs_dir, capsys):
    from spvit.models.registry import spvit_demo_vit
    from .pipeline_helpers import TINY_MODEL

    module = tmp_path / "teacher_module.pth"
    torch.save(spvit_demo_vit(num_classes=10, **TINY_MODEL), module)
    ft = ["finetune", "--config", tiny_yaml(tmp_path), *tiny_args(), "--arch", str(runs_dir / "search" / "arch.json"),
          "--init", "none", "--distillation", "hard", "--teacher", module]
    rc, err = _rc(ft + ["--out", tmp_path / "a"], capsys)
    assert rc == 2 and _one_error_line(err) and "--teacher-file-runs-code" in err and "runs" in err
    assert not (tmp_path / "a").exists()
    assert cli.main([str(a) for a in ft + ["--out", tmp_path / "b", "--teacher-file-runs-code"]]) == 0


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit code 2, nothing written


def _bad_files(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("these are my notes\n")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    return txt, empty


def _arch_with(tmp_path, arch, **over):
    d = json.load(open(arch))
    d.update(over)
    p = tmp_path / "arch_bad.json"
    p.write_text(json.dumps(d))
    return p


def test_bad_checkpoint_files(tmp_path, runs_dir, capsys):
    txt, empty = _bad_files(tmp_path)
    best = runs_dir / "ft" / "best.pth"
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    arch = str(runs_dir / "search" / "arch.json")
    ft = ["finetune", "--config", tiny_yaml(tmp_path), *tiny_args(), "--arch", arch]
    cases = {
        "eval truncated": (["eval", "--checkpoint", trunc, "--data", "digits", "--device", "cpu"], "truncated"),
        "eval text file": (["eval", "--checkpoint", txt, "--data", "digits", "--device", "cpu"], "not a"),
        "eval empty file": (["eval", "--checkpoint", empty, "--data", "digits", "--device", "cpu"], "empty"),
        "eval search checkpoint": (["eval", "--checkpoint", runs_dir / "search" / "best.pth", "--data", "digits",
                                    "--device", "cpu"], "not a checkpoint of `spvit finetune`"),
        "bench truncated": (["bench", "--checkpoint", trunc, "--device", "cpu"], "truncated"),
        "bench --iters 0": (["bench", "--checkpoint", best, "--iters", "0"], "--iters"),
        "init text": (ft + ["--init", txt, "--out", tmp_path / "o1"], "not a"),
        "init fine-tune checkpoint": (ft + ["--init", best, "--out", tmp_path / "o2"], "does not fit"),
        "teacher text": (ft + ["--init", "none", "--distillation", "hard", "--teacher", txt, "--out", tmp_path / "o3"],
                         "not a"),
        "teacher-weights truncated": (ft + ["--init", "none", "--distillation", "hard", "--teacher", "spvit_demo_vit",
                                            "--teacher-weights", trunc, "--out", tmp_path / "o4"], "truncated"),
        "deploy --out is a file": (["deploy", "--checkpoint", best, "--out", txt], "not a folder"),
        "arch.json version as a string": (ft[:-2] + ["--arch", _arch_with(tmp_path, arch, version="1"), "--out",
                                                     tmp_path / "o5"], "--arch"),
        "arch.json not JSON": (ft[:-2] + ["--arch", txt, "--out", tmp_path / "o6"], "--arch"),
    }
    for name, (argv, msg) in cases.items():
        rc, err = _rc(argv, capsys)
        assert rc == 2 and _one_error_line(err) and msg in err, (name, err)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    assert txt.read_text() == "these are my notes\n"


def test_size_mismatch_from_another_image_size(tmp_path, capsys):
    from spvit import finetune

    s8 = search.run(tiny_search_cfg(tmp_path / "s8", epochs=1, train_limit=32, val_limit=16))
    big = {**tiny_cfg(search.DEFAULTS, "x")["model_kwargs"], "img_size": 16}
    s16 = search.run(tiny_search_cfg(tmp_path / "s16", epochs=1, train_limit=32, val_limit=16, model_kwargs=big,
                                     target_gflops=0.6 * dense_gflops() * 4))
    base = ["finetune", "--config", tiny_yaml(tmp_path), *tiny_args()]
    base[base.index("--model-kwargs") + 1] = json.dumps(big)
    rc, err = _rc(base + ["--arch", s16["arch"], "--init", tmp_path / "s8" / "checkpoint.pth", "--out",
                          tmp_path / "f"], capsys)
    assert rc == 2 and _one_error_line(err) and "--init checkpoint" in err and "img_size 8 vs 16" in err, err
    # the size is carried from the architecture: --input-size alone is enough, and a contradiction is refused
    rc, err = _rc(["finetune", "--config", tiny_yaml(tmp_path), *tiny_args()[2:], "--arch", s8["arch"],
                   "--model-kwargs", '{"patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2, '
                   '"mlp_ratio": 2.0}', "--input-size", "16", "--out", tmp_path / "g"], capsys)
    assert rc == 2 and "architecture's (8" in err
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
    assert finetune  # imported for the DEFAULTS of the shared helpers


def test_input_size_builds_the_model_and_the_data(tmp_path, capsys):
    out = tmp_path / "s"
    kw = '{"patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}'
    argv = _search_argv(tmp_path, out, "--input-size", "12")
    argv[argv.index("--model-kwargs") + 1] = kw
    argv[argv.index("--target-gflops") + 1] = str(0.7 * dense_gflops() * (36 / 16))
    assert cli.main(argv) == 0
    arch = json.load(open(out / "arch.json"))
    assert arch["signature"]["grid"] == [6, 6]  # a 12x12 model with patch 2, fed 12x12 digits
    assert yaml.safe_load(open(out / "config.yaml"))["input_size"] == 12


def test_offline_pretrained_fails_fast_naming_the_alternatives(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    argv = _search_argv(tmp_path, tmp_path / "o", "--model", "vit_tiny_patch16_224", "--pretrained", "timm")
    argv[argv.index("--model-kwargs") + 1] = "{}"
    rc, err = _rc(argv, capsys)
    assert rc == 2 and _one_error_line(err), err
    assert "--pretrained none" in err and "--pretrained <file>" in err
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "o").exists()


BAD_FLAGS = [
    (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"), (["--loss-lambda", "nan"], "--loss-lambda"),
    (["--theta", "nan"], "--theta"), (["--alpha", "0"], "--alpha"), (["--drop-path", "5"], "--drop-path"),
    (["--num-classes", "0"], "--num-classes"), (["--num-classes", "3"], "10 classes"),
    (["--model-kwargs", "[1,2]"], "JSON object"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--smoothing", "1.5"], "--smoothing"), (["--device", "tpu"], "--device"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--target-gflops", "-1"], "--target-gflops"),
    (["--model", "no_such_model"], "unknown timm model"), (["--reprob", "2"], "--reprob"),
    (["--data", "nowhere"], "not found"), (["--overwrite", "--resume"], "exclude"),
    (["--input-size", "16"], "disagrees with --model-kwargs img_size"),
]


@pytest.mark.parametrize("flags,msg", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_values(flags, msg, tmp_path, capsys):
    rc, err = _rc(_search_argv(tmp_path, tmp_path / "o", *flags), capsys)
    assert rc == 2 and _one_error_line(err) and msg in err, err
    assert not (tmp_path / "o").exists()


def test_bad_yaml_and_out(tmp_path, capsys):
    y = tmp_path / "bad.yaml"
    y.write_text("epochs: three\n")
    rc, err = _rc(["search", "--config", y, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and _one_error_line(err) and "epochs" in err and "integer" in err
    y.write_text("epochs: [1\n")
    rc, err = _rc(["search", "--config", y, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and _one_error_line(err) and "not valid YAML" in err
    rc, err = _rc(_search_argv(tmp_path, tmp_path / ("x" * 300)), capsys)
    assert rc == 2 and _one_error_line(err) and "too long" in err
    f = tmp_path / "afile"
    f.write_text("x")
    rc, err = _rc(_search_argv(tmp_path, f), capsys)
    assert rc == 2 and "not a folder" in err and f.read_text() == "x"


def test_demo_refuses_an_unreachable_target_before_training(tmp_path, capsys):
    for frac, msg in (("0", "--target-fraction"), ("0.001", "cannot be met")):
        t0 = time.perf_counter()
        rc, err = _rc(["demo", "--out", tmp_path / "d", "--target-fraction", frac], capsys)
        assert rc == 2 and _one_error_line(err) and msg in err, err
        assert time.perf_counter() - t0 < 20 and not (tmp_path / "d").exists()


def test_resume_from_the_folder_alone_and_changed_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(_search_argv(tmp_path, out, "--epochs", "2", "--stop-after-epoch", "0")) == 0
    rc, err = _rc(["search", "--out", out, "--resume", "--lr", "1.0", "--seed", "5"], capsys)
    assert rc == 2 and _one_error_line(err) and "--lr" in err and "--seed" in err and "--allow-changes" in err
    assert cli.main(["search", "--out", str(out), "--resume", "--no-progress"]) == 0  # no other flag needed
    rows = list(open(out / "metrics.csv"))[1:]
    assert [int(r.split(",")[0]) for r in rows] == [0, 1]
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["epochs"] == 2 and saved["lr"] == 5e-5 and saved["seed"] == 0  # the refused values were not applied
    assert cli.main(["search", "--out", str(out), "--resume", "--epochs", "3", "--allow-changes",
                     "--no-progress"]) == 0
    assert yaml.safe_load(open(out / "config.yaml"))["epochs"] == 3  # the saved config tells what ran
    rc, err = _rc(["finetune", "--out", tmp_path / "nothing", "--resume"], capsys)
    assert rc == 2 and _one_error_line(err) and "no checkpoint.pth" in err


def test_version_and_help_on_every_flag():
    env = {**os.environ, "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "spvit", "--version"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.startswith("spvit ")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {a.option_strings}" for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and not a.help]
    assert not missing, missing


def test_an_error_prints_once_under_torchrun(tmp_path):
    from .pipeline_helpers import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "spvit", "search", "--device", "cpu", "--data",
           str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode != 0
    assert (p.stdout + p.stderr).count("spvit: error:") == 1, p.stderr[-2000:]


def test_pretrained_file_of_another_image_size_is_resampled(tmp_path):
    import timm
    import torch.nn.functional as F

    from spvit import hub

    kw = {"patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}
    small = timm.create_model("spvit_demo_vit", num_classes=10, img_size=8, **kw)
    with torch.no_grad():
        small.pos_embed.normal_()
    torch.save(small.state_dict(), tmp_path / "w8.pth")
    big = timm.create_model("spvit_demo_vit", num_classes=10, img_size=16, **kw)
    hub.load_local_weights(big, str(tmp_path / "w8.pth"))
    grid = small.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, 64, 32)
    assert torch.equal(big.pos_embed[:, :1], small.pos_embed[:, :1])
    torch.testing.assert_close(big.pos_embed[:, 1:], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(big.blocks[0].mlp.fc1.weight, small.blocks[0].mlp.fc1.weight)


def test_resume_from_a_truncated_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(_search_argv(tmp_path, out)) == 0
    ck = out / "checkpoint.pth"
    ck.write_bytes(ck.read_bytes()[:1000])
    rc, err = _rc(["search", "--out", out, "--resume", "--epochs", "2", "--allow-changes"], capsys)
    assert rc == 2 and _one_error_line(err) and "truncated" in err, err
    assert (out / "best.pth").exists() and (out / "metrics.csv").exists()  # nothing else was touched


def test_every_reader_of_a_finetune_checkpoint_builds_the_same_model(tmp_path):
    """eval / bench (load_finetuned), deploy (deploy_checkpoint) and the teacher read one format, in one place."""
    import timm

    from spvit import checkpoints, prune, supernet
    from spvit.deploy import deploy_checkpoint
    from .pipeline_helpers import TINY_MODEL

    torch.manual_seed(0)
    dense = timm.create_model("spvit_demo_vit", num_classes=10, **TINY_MODEL)
    arch = supernet(dense, model_name="spvit_demo_vit").architecture()
    pruned = prune(dense, arch).eval()
    with torch.no_grad():
        for p in pruned.parameters():
            p.normal_(0, 0.2)
    meta = checkpoints.model_meta("spvit_demo_vit", TINY_MODEL, 10, arch)
    path = str(tmp_path / "best.pth")
    runs.save_torch({"model": pruned.state_dict(), **meta}, path)
    # the weights as a DDP-wrapped model names them: read alike
    ddp_path = str(tmp_path / "ddp.pth")
    runs.save_torch({"model": {f"module.{k}": v for k, v in pruned.state_dict().items()}, **meta}, ddp_path)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = pruned(x)
        for p in (path, ddp_path):
            model, ck = checkpoints.load_finetuned(p)
            assert ck["model_name"] == "spvit_demo_vit"
            torch.testing.assert_close(model(x), want)
            torch.testing.assert_close(deploy_checkpoint(p)(x), want, atol=1e-4, rtol=1e-4)
    bad = str(tmp_path / "bad.pth")
    state = pruned.state_dict()
    state.pop(next(iter(state)))
    runs.save_torch({"model": state, **meta}, bad)
    for read in (checkpoints.load_finetuned, deploy_checkpoint):
        with pytest.raises(runs.RunError, match="bad.pth does not fit the model"):
            read(bad)
