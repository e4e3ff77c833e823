"""Checkpoints: an interrupted run resumed with --resume ends bit-identical to an uninterrupted one; atomic writes."""
import csv
import errno
import os

import pytest
import torch

from spvit import runs
from spvit import finetune, search
from spvit.runs import RunError
from .pipeline_helpers import tiny_cfg, tiny_search_cfg


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_run(a, b):
    ca, cb = _weights(os.path.join(a, "checkpoint.pth")), _weights(os.path.join(b, "checkpoint.pth"))
    assert ca["epoch"] == cb["epoch"]
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for oa, ob in zip(ca["optimizers"], cb["optimizers"]):
        for pa, pb in zip(oa["state"].values(), ob["state"].values()):
            for k in pa:
                assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k]))
    ra = list(csv.DictReader(open(os.path.join(a, "metrics.csv"))))
    rb = list(csv.DictReader(open(os.path.join(b, "metrics.csv"))))
    keys = [k for k in ra[0] if not k.endswith(("_s", "img_s"))]  # timings differ
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]


def test_search_resume_is_bit_identical(tmp_path):
    # Mixup (numpy + torch RNG), random shifts (torch RNG) and gate sampling all have to continue exactly.
    over = dict(epochs=3, mixup=0.8, cutmix=1.0, repeated_aug=True)
    search.run(tiny_search_cfg(tmp_path / "full", **over))
    part = tiny_search_cfg(tmp_path / "split", stop_after_epoch=0, **over)
    assert search.run(part)["stopped"]
    assert _weights(tmp_path / "split" / "checkpoint.pth")["epoch"] == 0
    # the interrupted folder is not overwritten by accident
    with pytest.raises(RunError, match="already exists"):
        search.run(tiny_search_cfg(tmp_path / "split", **over))
    res = search.run(tiny_search_cfg(tmp_path / "split", resume=True, **over))
    assert not res["stopped"]
    _assert_same_run(tmp_path / "full", tmp_path / "split")
    assert open(tmp_path / "full" / "arch.json").read() == open(tmp_path / "split" / "arch.json").read()


def test_finetune_resume_with_ema_is_bit_identical(tmp_path):
    s = search.run(tiny_search_cfg(tmp_path / "s", epochs=1))
    over = dict(arch=s["arch"], init="none", epochs=3, model_ema=True, model_ema_decay=0.9, mixup=0.8, cutmix=1.0)
    finetune.run(tiny_cfg(finetune.DEFAULTS, tmp_path / "full", **over))
    finetune.run(tiny_cfg(finetune.DEFAULTS, tmp_path / "split", stop_after_epoch=1, **over))
    finetune.run(tiny_cfg(finetune.DEFAULTS, tmp_path / "split", resume=True, **over))
    _assert_same_run(tmp_path / "full", tmp_path / "split")
    ea = _weights(tmp_path / "full" / "checkpoint.pth")["ema"]
    eb = _weights(tmp_path / "split" / "checkpoint.pth")["ema"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(RunError, match="no checkpoint.pth"):
        search.run(tiny_search_cfg(tmp_path / "nothing", resume=True))


def test_atomic_write_keeps_last_good_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    runs.save_torch({"epoch": 1}, path)

    def dies(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(runs.RunIOError, match="disk is full"):
        runs.atomic_write(path, dies)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
