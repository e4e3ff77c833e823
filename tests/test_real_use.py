"""What a first real user meets: settings that a run must not keep, training failures that are not the user's input,
architectures that carry their model's settings, and bad values found before anything is written (one
`spvit: error:` line, exit code 2)."""
import json
import math
import os

import pytest
import torch
import yaml

from spvit import cli, engine, search
from .pipeline_helpers import TINY_MODEL, dense_gflops, tiny_args, tiny_yaml


def _rc(argv, capsys):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors (same one-line format)
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_error_line(err, prefix="spvit: error:"):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith(prefix)


def _search_argv(tmp_path, out, *extra, target=0.7):
    argv = ["search", "--config", tiny_yaml(tmp_path), *tiny_args(), "--out", out, "--target-gflops",
            str(target * dense_gflops()), *extra]
    return [str(a) for a in argv]


def _epochs(out):
    return [int(r.split(",")[0]) for r in list(open(os.path.join(out, "metrics.csv")))[1:]]


def test_run_control_flags_are_not_saved_and_a_plain_resume_runs_to_the_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = _rc(_search_argv(tmp_path, out, "--epochs", "3", "--stop-after-epoch", "0"), capsys)
    assert rc == 0 and _epochs(out) == [0]
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["stop_after_epoch"] is None and not saved["resume"] and not saved["overwrite"]
    assert "epoch 1/3" in stdout and "ETA" in stdout  # progress of the whole run
    # a folder written before (stop_after_epoch saved in it) resumes to the end too
    saved["stop_after_epoch"] = 0
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    rc, stdout, _ = _rc(["search", "--out", out, "--resume", "--no-progress"], capsys)
    assert rc == 0 and _epochs(out) == [0, 1, 2], stdout
    assert yaml.safe_load(open(out / "config.yaml"))["stop_after_epoch"] is None
    # the gates line follows the line of its epoch, and says what its notation means
    lines = stdout.splitlines()
    i = next(k for k, ln in enumerate(lines) if "epoch 3/3" in ln)
    assert lines[i + 1].lstrip().startswith("gates (per block, attention/FFN units kept")


def test_a_failure_inside_training_is_not_reported_as_bad_input(tmp_path, capsys, monkeypatch):
    from spvit.data import DigitsDataset

    calls = {"n": 0}
    real = DigitsDataset.__getitem__

    def flaky(self, i):  # what an augmentation op failing at random looks like to the loop
        calls["n"] += 1
        if self.split == "train" and calls["n"] > 20:
            raise ValueError("bits must be between or equal to 1 and 8")
        return real(self, i)

    monkeypatch.setattr(DigitsDataset, "__getitem__", flaky)
    rc, _, err = _rc(_search_argv(tmp_path, tmp_path / "o"), capsys)
    assert rc == 1, err
    assert _one_error_line(err, "spvit: training failed:") and "search failed in epoch 1/1" in err, err
    assert "ValueError: bits must be" in err and "spvit: error:" not in err


DIVERGING = [(["--lr", "1e30"], "--lr 1e+30"), (["--loss-lambda", "1e300"], "--loss-lambda 1e+300")]


@pytest.mark.parametrize("flags,cause", DIVERGING, ids=[" ".join(f) for f, _ in DIVERGING])
def test_a_diverging_run_is_one_line_naming_the_setting(flags, cause, tmp_path, capsys):
    rc, _, err = _rc(_search_argv(tmp_path, tmp_path / "o", *flags), capsys)
    assert rc == 2 and _one_error_line(err) and "diverged" in err and cause in err, err
    assert "no checkpoint was written yet" in err


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    orig = engine.train_one_epoch

    def nan_in_second_epoch(model, loader, opts, loss_fn, dist, epoch, **kw):
        if epoch == 1:
            loss_fn = lambda *x: (torch.tensor(math.nan), {})  # noqa: E731
        return orig(model, loader, opts, loss_fn, dist, epoch, **kw)

    monkeypatch.setattr(engine, "train_one_epoch", nan_in_second_epoch)
    rc, _, err = _rc(_search_argv(tmp_path, out, "--epochs", "2"), capsys)
    assert rc == 2 and _one_error_line(err) and "in epoch 2/2" in err, err
    assert "last good checkpoint (after epoch 1/2)" in err, err
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0


def test_finetune_takes_the_model_settings_from_the_architecture(tmp_path, capsys):
    s = tmp_path / "s"
    assert _rc(_search_argv(tmp_path, s), capsys)[0] == 0
    arch = json.load(open(s / "arch.json"))
    assert arch["meta"]["model_kwargs"]["patch_size"] == TINY_MODEL["patch_size"]
    common = ["--config", tiny_yaml(tmp_path), "--data", "digits", "--device", "cpu", "--batch-size", "16",
              "--epochs", "1", "--num-workers", "0", "--no-progress", "--pretrained", "none", "--mixup", "0",
              "--cutmix", "0"]
    # no --model, no --model-kwargs: patch size, depth, width and image size come from arch.json
    for init in ("none", str(s / "checkpoint.pth")):
        out = tmp_path / f"ft_{os.path.basename(init)}"
        rc, _, err = _rc(["finetune", "--arch", s / "arch.json", "--init", init, "--out", out, *common], capsys)
        assert rc == 0, err
        assert torch.load(out / "best.pth", weights_only=True)["model_kwargs"]["patch_size"] == 2
    # `spvit bench` with a batch that cannot fit: one line, no allocation attempt
    rc, _, err = _rc(["bench", "--checkpoint", out / "best.pth", "--batch-size", "1000000000", "--device", "cpu"],
                     capsys)
    assert rc == 2 and _one_error_line(err) and "GiB" in err, err
    # an older arch.json without recorded kwargs: from its signature
    del arch["meta"]["model_kwargs"]
    old = tmp_path / "old_arch.json"
    old.write_text(json.dumps(arch))
    rc, _, err = _rc(["finetune", "--arch", old, "--init", "none", "--out", tmp_path / "ft_old", *common], capsys)
    assert rc == 0, err
    # a model that does not fit the architecture is blamed on the model settings, not on the --init checkpoint
    rc, _, err = _rc(["finetune", "--arch", s / "arch.json", "--init", s / "checkpoint.pth", "--out",
                      tmp_path / "ft_bad", "--model-kwargs", json.dumps({"embed_dim": 64}), *common], capsys)
    assert rc == 2 and _one_error_line(err) and "does not fit the architecture" in err and "embed_dim" in err, err
    # a search checkpoint of another model is blamed on --init, naming what differs
    s2 = tmp_path / "s2"
    argv = _search_argv(tmp_path, s2)
    argv[argv.index("--model-kwargs") + 1] = json.dumps({**TINY_MODEL, "mlp_ratio": 1.0})
    assert _rc(argv, capsys)[0] == 0
    rc, _, err = _rc(["finetune", "--arch", s / "arch.json", "--init", s2 / "checkpoint.pth", "--out",
                      tmp_path / "ft_bad2", *common], capsys)
    assert rc == 2 and _one_error_line(err) and "--init checkpoint" in err and "mlp_ratio 1.0 vs 2.0" in err, err


BAD_SEARCH = [  # flags, what the message must name
    (["--model-kwargs", json.dumps({**TINY_MODEL, "embed_dim": 33})], "divisible"),
    (["--model-kwargs", json.dumps({**TINY_MODEL, "num_heads": 0})], "cannot build"),
    (["--model-kwargs", json.dumps({**TINY_MODEL, "global_pool": "bogus"})], "pooling"),
    (["--model-kwargs", json.dumps({**TINY_MODEL, "class_token": False})], "class token"),
    (["--model-kwargs", json.dumps({**TINY_MODEL, "img_size": 1000000})], "beyond 4096"),
    (["--theta", "1e308"], "--theta"), (["--ffn-align", "1000000000"], "--ffn-align"),
    (["--color-jitter", "1e308"], "--color-jitter"), (["--digits-shift", "1000"], "digits_shift"),
    (["--model", "spvit_demo_vt"], "did you mean spvit_demo_vit"),
]


def test_bad_search_settings_are_one_line_before_any_write(tmp_path, capsys):
    from spvit import config as C

    failures = []
    for flags, msg in BAD_SEARCH:
        argv = _search_argv(tmp_path, tmp_path / "o")
        if flags[0] in ("--color-jitter", "--digits-shift"):  # YAML-only settings
            key = flags[0][2:].replace("-", "_")
            argv[argv.index("--config") + 1] = tiny_yaml(tmp_path, **{key: float(flags[1])
                                                                       if key == "color_jitter" else int(flags[1])})
            flags = []
        if flags and flags[0] == "--model-kwargs":
            argv[argv.index("--model-kwargs") + 1] = flags[1]
            flags = []
        rc, _, err = _rc(argv + flags, capsys)
        if not (rc == 2 and _one_error_line(err) and msg in err) or (tmp_path / "o").exists():
            failures.append((msg, rc, err))
    assert not failures, failures
    assert C.MAX_IMAGE_SIZE == 4096


def test_image_settings_with_the_digits_are_said_to_be_ignored(tmp_path, capsys):
    rc, stdout, err = _rc(_search_argv(tmp_path, tmp_path / "o", "--aa", "none", "--reprob", "0.5"), capsys)
    assert rc == 0, err
    assert "ignored: aa=None, reprob=0.5" in stdout


def test_a_search_far_from_its_target_warns(capsys):
    meta = {"gflops": 0.0153}
    assert search.warn_off_target(meta, None, 0.01) and "+53% from the target 0.01" in capsys.readouterr().out
    assert search.warn_off_target({"gflops": 0.0105}, None, 0.01) is None
    assert search.warn_off_target({"predicted_ms": 5.0, "gflops": 1.0}, 10.0, 1.0).count("-50%") == 1


def test_progress_bars_only_on_a_terminal(capsys):
    bar = engine.progress(range(3), 3, "x", True)
    list(bar)
    assert bar.disable and "\r" not in capsys.readouterr().err  # pytest's stderr is not a terminal


def _bad_tables():
    """(edit of a valid table's dict, expected message), each written as JSON (Infinity / NaN as Python's json
    writes them)."""
    def set_all(d, v):
        d["fixed_ms"] = {k: v for k in d["fixed_ms"]}
        for g in d["groups"]:
            g["attn_ms"] = {k: v for k in g["attn_ms"]}
            g["ffn_ms"] = [v] * len(g["ffn_ms"])

    def one(d, v):
        d["groups"][0]["ffn_ms"][-1] = v

    return [(lambda d: set_all(d, 0.0), "dense latency is 0"), (lambda d: one(d, math.inf), "finite"),
            (lambda d: one(d, math.nan), "finite"), (lambda d: one(d, -1.0), ">= 0"),
            (lambda d: d.update(batch=0), "batch"), (lambda d: d.update(batch=-4), "batch")]


def test_bad_latency_tables_are_refused(tmp_path):
    from spvit import latency as L
    from spvit.models import supernet
    from spvit.models.convert import signature_of
    from .test_latency import small_vit, synthetic_table

    good = synthetic_table(signature_of(small_vit())).to_dict()
    for i, (edit, msg) in enumerate(_bad_tables()):
        d = json.loads(json.dumps(good))
        edit(d)
        p = tmp_path / f"t{i}.json"
        p.write_text(json.dumps(d))
        with pytest.raises(L.LatencyTableError, match=msg):
            L.LatencyTable.load(str(p))
    # supernet temperatures and logits that make no sense
    for kw, msg in (({"theta": math.nan}, "theta"), ({"theta": 1e308}, "theta"), ({"alpha": 0.0}, "alpha"),
                    ({"alpha": -1.0}, "alpha"), ({"alpha": math.inf}, "alpha")):
        with pytest.raises(ValueError, match=msg):
            supernet(small_vit(), **kw)


def test_architecture_indices_must_be_integers():
    from spvit.arch import BlockArch

    assert BlockArch("msa", (0, 2, torch.tensor(3))).ffn_keep == (0, 2, 3)
    for bad in ((0.5, 1.5), (1.0,), (True,), ("1",)):
        with pytest.raises(ValueError, match="integers"):
            BlockArch("msa", bad)


def test_non_checkpoint_files_and_profile_budget(tmp_path, capsys):
    files = {"a.json": b'{"a": 1}', "b.txt": b"hello\n", "c.bin": bytes(range(256)) * 4}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        rc, _, err = _rc(["eval", "--checkpoint", tmp_path / name, "--data", "digits", "--device", "cpu"], capsys)
        assert rc == 2 and _one_error_line(err) and "not a" in err and "PyTorch checkpoint" in err, err
        assert "weights_only" not in err and "Python objects" not in err, err
    rc, _, err = _rc(["profile", "--model", "spvit_demo_vit", "--budget", "nan", "--out", tmp_path / "t.json"],
                     capsys)
    assert rc == 2 and _one_error_line(err) and "--budget" in err and not (tmp_path / "t.json").exists(), err


def test_image_folder_problems_found_before_or_named_during_the_run(tmp_path, capsys):
    from .test_data import _make_imagefolder

    data = tmp_path / "data"
    _make_imagefolder(data, n=8, size=8)
    argv = _search_argv(tmp_path, tmp_path / "o")
    argv[argv.index("--data") + 1] = str(data)
    # RGB images for a 1-channel model: refused before the run folder is written
    rc, _, err = _rc(argv + ["--batch-size", "4"], capsys)
    assert rc == 2 and _one_error_line(err) and "1-channel" in err and "3 channel" in err, err
    assert not (tmp_path / "o").exists()
    # an image whose header is fine but whose pixels are cut: one line naming it when the loader meets it
    bad = data / "train" / "cat" / "0.png"
    bad.write_bytes(bad.read_bytes()[:60])
    argv[argv.index("--model-kwargs") + 1] = json.dumps({**TINY_MODEL, "in_chans": 3})
    rc, _, err = _rc(argv + ["--batch-size", "4", "--aa", "none"], capsys)
    assert rc == 2 and _one_error_line(err) and "cannot read image" in err and "0.png" in err, err
    assert (tmp_path / "o" / "config.yaml").exists()  # met during training, not by the header check


def test_the_likely_cause_of_a_divergence():
    from spvit.config import FinetuneConfig, SearchConfig

    cases = [(SearchConfig(alpha=1e-300), "--alpha 1e-300"), (SearchConfig(lr=1e308), "--lr 1e+308"),
             (SearchConfig(loss_lambda=1e300, lr=1e-3), "--loss-lambda 1e+300"),
             (FinetuneConfig(distillation_tau=1e-300), "--distillation-tau 1e-300"),
             (SearchConfig(), "--lr 5e-05")]
    assert [engine.likely_divergence_cause(c) for c, _ in cases] == [want for _, want in cases]
