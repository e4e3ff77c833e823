"""Crash safety: a kill (os._exit, as kill -9) at named points of an epoch's writes, then --resume, ends exactly like
an uninterrupted run, with no lost or duplicated log row; a full disk keeps the last checkpoint; SIGINT / SIGTERM stop
with one line that says how to continue (and does not advise --resume when there is nothing to resume)."""
import csv
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from spvit import cli, engine, interrupts, runs, search
from .pipeline_helpers import repo_root, tiny_search_cfg

DRIVER = """
import json, sys, torch
from spvit import search
torch.set_num_threads(int(sys.argv[2]))  # the reference run's thread count: results depend on it
search.run(json.loads(sys.argv[1]))
"""
# (point, epoch): best.pth is written only when the val accuracy improves, which this tiny run does at epoch 2
POINTS = [("after_train", 1), ("writing_gates.jsonl", 1), ("writing_metrics.csv", 1), ("after_metrics", 1),
          ("writing_best.pth", 2), ("after_best", 2), ("writing_checkpoint.pth", 1), ("after_checkpoint", 1)]


def _cfg(out, **over):
    return tiny_search_cfg(out, epochs=3, train_limit=48, val_limit=16, tensorboard=False, **over)


def _rows(path):
    return list(csv.DictReader(open(path)))


def _same_run(a, b):
    ca = torch.load(os.path.join(a, "checkpoint.pth"), weights_only=True)
    cb = torch.load(os.path.join(b, "checkpoint.pth"), weights_only=True)
    assert ca["epoch"] == cb["epoch"] == 2
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    ra, rb = _rows(os.path.join(a, "metrics.csv")), _rows(os.path.join(b, "metrics.csv"))
    keys = [k for k in ra[0] if not k.endswith("_s")]  # timings differ
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    ga = [json.loads(ln) for ln in open(os.path.join(a, "gates.jsonl"))]
    gb = [json.loads(ln) for ln in open(os.path.join(b, "gates.jsonl"))]
    assert ga == gb and [g["epoch"] for g in gb] == [0, 1, 2]
    assert open(os.path.join(a, "arch.json")).read() == open(os.path.join(b, "arch.json")).read()
    ba = torch.load(os.path.join(a, "best.pth"), weights_only=True)
    bb = torch.load(os.path.join(b, "best.pth"), weights_only=True)
    assert ba["epoch"] == bb["epoch"] and all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])
    assert not [f for f in os.listdir(b) if f.endswith(".spvit-tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("crash") / "full"
    search.run(_cfg(out))
    return out


@pytest.mark.parametrize("point,epoch", POINTS, ids=[f"{p}:{e}" for p, e in POINTS])
def test_kill_at_any_point_then_resume_equals_an_uninterrupted_run(point, epoch, reference, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, runs.CRASH_ENV: f"{point}:{epoch}", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(_cfg(out)), str(torch.get_num_threads())], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 137, p.stderr[-2000:]
    ck = torch.load(out / "checkpoint.pth", weights_only=True)  # the last complete checkpoint is readable
    assert ck["epoch"] == (epoch if point == "after_checkpoint" else epoch - 1)
    if point != "after_train":  # the logs may be ahead of the checkpoint: resume trims them
        assert [int(r["epoch"]) for r in _rows(out / "metrics.csv")][-1] >= ck["epoch"]
    res = search.run(_cfg(out, resume=True))  # the lock left by the dead process is taken over
    assert not res["stopped"]
    _same_run(reference, out)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = runs.atomic_write

    def full_disk(path, write, binary=True):
        if path.endswith("checkpoint.pth") and runs.CURRENT_EPOCH == 1:
            def partial(f):
                f.write(b"some bytes")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, partial, binary)
        return real(path, write, binary)

    monkeypatch.setattr(runs, "atomic_write", full_disk)
    cfg = _cfg(out)
    argv = ["search", "--out", str(out), "--model-kwargs", json.dumps(cfg["model_kwargs"])]
    for k in ("model", "pretrained", "data", "device", "batch_size", "epochs", "num_workers", "target_gflops",
              "loss_lambda", "arc_lr", "min_lr", "lr", "mixup", "cutmix"):
        argv += [f"--{k.replace('_', '-')}", str(cfg[k])]
    y = tmp_path / "rest.yaml"
    y.write_text("train_limit: 48\nval_limit: 16\ntensorboard: false\nrepeated_aug: false\nscale_lr: false\n"
                 "progress: false\n")
    rc = cli.main(["search", "--config", str(y), *argv[1:]])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and "disk is full" in lines[0] and "checkpoint.pth" in lines[0], err
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert not [f for f in os.listdir(out) if f.endswith(".spvit-tmp")]
    monkeypatch.setattr(runs, "atomic_write", real)
    assert cli.main(["search", "--out", str(out), "--resume"]) == 0  # once there is space again
    assert [int(r["epoch"]) for r in _rows(out / "metrics.csv")] == [0, 1, 2]


def _signal_at(monkeypatch, target, attr, epoch, signum):
    """Send ``signum`` to this process from inside ``target.attr`` during ``epoch``."""
    real = getattr(target, attr)

    def wrapped(*a, **k):
        if runs.CURRENT_EPOCH == epoch:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(target, attr, wrapped)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_before_the_first_checkpoint_does_not_advise_resume(signum, tmp_path, capsys, monkeypatch):
    _signal_at(monkeypatch, engine, "evaluate", 0, signum)
    with pytest.raises(interrupts.Interrupted) as info:
        search.run(_cfg(tmp_path / "run"))
    msg = str(info.value)
    assert "nothing to resume" in msg and "--resume" not in msg and info.value.signum == signum
    assert not (tmp_path / "run" / "checkpoint.pth").exists() and not (tmp_path / "run" / runs.LOCK).exists()


def test_signal_mid_run_says_how_to_resume_and_resume_works(tmp_path, monkeypatch, reference):
    _signal_at(monkeypatch, engine, "evaluate", 1, signal.SIGTERM)
    with pytest.raises(interrupts.Interrupted) as info:
        search.run(_cfg(tmp_path / "run"))
    assert "last checkpoint is after epoch 1/" in str(info.value) and "--resume" in str(info.value)
    monkeypatch.undo()
    search.run(_cfg(tmp_path / "run", resume=True))
    _same_run(reference, tmp_path / "run")


class _SignalInFinaliser:
    """Sends a signal from ``__del__``: its handler runs there, where Python drops the exception the handler raises
    ("Exception ignored in ..."), as it does in logging's at-fork hook when a DataLoader forks its workers, or in a
    DataLoader iterator's ``__del__``. ``raised`` records the exceptions the handler raised there."""
    raised = []

    def __init__(self, signum):
        self.signum = signum

    def __del__(self):
        try:
            os.kill(os.getpid(), self.signum)
            for _ in range(1000):  # the handler runs at the eval loop's next check: here, inside __del__
                pass
        except BaseException as exc:
            _SignalInFinaliser.raised.append(exc)
            raise


def test_a_signal_whose_exception_python_dropped_still_stops_the_run(tmp_path, monkeypatch):
    dropped = []  # what Python would report as "Exception ignored in ..."
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_value))
    monkeypatch.setattr(_SignalInFinaliser, "raised", [])
    real = engine.evaluate

    def evaluate(*a, **k):
        if runs.CURRENT_EPOCH == 1:
            _SignalInFinaliser(signal.SIGTERM)  # gone at once: its __del__ runs here
        return real(*a, **k)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    with pytest.raises(interrupts.Interrupted) as info:
        search.run(_cfg(tmp_path / "run"))
    # the handler raised inside __del__, where Python drops it; its report is not printed (one line in the end)
    assert [type(e) for e in _SignalInFinaliser.raised] == [interrupts.Interrupted] and dropped == []
    # stopped in epoch 1's evaluation, before its checkpoint, as if the signal had not been dropped
    assert "interrupted (SIGTERM)" in str(info.value) and info.value.signum == signal.SIGTERM
    assert "last checkpoint is after epoch 1/" in str(info.value) and "--resume" in str(info.value)
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert interrupts._FIRED is None  # nothing left over for a later run in this process


def test_a_dropped_signal_at_the_end_of_a_run_is_still_raised(monkeypatch):
    dropped = []
    recorder = lambda u: dropped.append(u.exc_value)  # noqa: E731
    monkeypatch.setattr(sys, "unraisablehook", recorder)
    monkeypatch.setattr(_SignalInFinaliser, "raised", [])
    with pytest.raises(interrupts.Interrupted) as info:
        with interrupts.StopSignals():
            _SignalInFinaliser(signal.SIGINT)
            sys.unraisablehook(type("U", (), {"exc_value": ValueError("another")})())  # others are still reported
    assert [type(e) for e in _SignalInFinaliser.raised] == [interrupts.Interrupted]
    assert [str(e) for e in dropped] == ["another"] and sys.unraisablehook is recorder  # restored on exit
    assert info.value.signum == signal.SIGINT and interrupts._FIRED is None
    with interrupts.StopSignals():  # a later run in the same process is not stopped by it
        pass
    # dropped before training began: the training loop stops on entry, with the signal's name for its message
    handlers = {sig: signal.getsignal(sig) for sig in interrupts.STOP_SIGNALS}
    try:
        interrupts.install_stop_handlers()
        _SignalInFinaliser(signal.SIGTERM)
        assert "before training began" in str(_SignalInFinaliser.raised[-1]) and len(dropped) == 1
        with pytest.raises(interrupts.Interrupted) as info:
            with interrupts.StopSignals():
                pytest.fail("the training loop ran")
        assert str(info.value) == "SIGTERM" and info.value.signum == signal.SIGTERM and interrupts._FIRED is None
        # nor are its handlers left installed
        assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), interrupts.StopSignals)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
        sys.unraisablehook = recorder  # install_stop_handlers wrapped it; monkeypatch restores pytest's


@pytest.mark.parametrize("signalled", [True, False], ids=["after a stop signal", "no signal"])
def test_a_dead_worker_is_part_of_a_stop_only_after_a_stop_signal(tmp_path, monkeypatch, signalled):
    # torch's error for a worker found dead at the next read, after the stop's own exception was dropped (as at a
    # DataLoader's fork): the run stops for the signal, as the signal asked; with no signal it is a training failure
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_value))
    monkeypatch.setattr(_SignalInFinaliser, "raised", [])
    real = engine.evaluate
    dead = "DataLoader worker (pid(s) 4242) exited unexpectedly"

    def evaluate(*a, **k):
        if runs.CURRENT_EPOCH == 1:
            if signalled:
                _SignalInFinaliser(signal.SIGTERM)
            raise RuntimeError(dead)
        return real(*a, **k)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    with pytest.raises((interrupts.Interrupted, engine.TrainingError)) as info:
        search.run(_cfg(tmp_path / "run"))
    if signalled:
        assert isinstance(info.value, interrupts.Interrupted) and info.value.signum == signal.SIGTERM
        assert str(info.value).startswith("interrupted (SIGTERM) in search epoch 2/3; the last checkpoint is after "
                                          "epoch 1/3") and "--resume" in str(info.value)
        assert [type(e) for e in _SignalInFinaliser.raised] == [interrupts.Interrupted] and dropped == []
    else:
        assert isinstance(info.value, engine.TrainingError) and dead in str(info.value)
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 0


def test_a_dead_worker_reported_in_a_finaliser_after_a_stop_is_not_printed(monkeypatch):
    # torch's SIGCHLD handler raising in a DataLoader iterator's __del__ as the stop unwinds: Python hands it to
    # sys.unraisablehook, which says nothing of it once a stop signal was received, and reports anything else
    seen = []
    recorder = lambda u: seen.append(str(u.exc_value))  # noqa: E731
    unraisable = lambda exc: type("U", (), {"exc_value": exc})()  # noqa: E731
    hook = interrupts._quiet_dropped(recorder)
    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
    monkeypatch.setattr(interrupts, "RECEIVED", None)
    hook(unraisable(killed))  # no stop signal: a real failure
    monkeypatch.setattr(interrupts, "RECEIVED", signal.SIGTERM)
    hook(unraisable(killed))
    hook(unraisable(RuntimeError("CUDA error: an illegal memory access was encountered")))
    hook(unraisable(ValueError("DataLoader worker (pid 4242) is killed by signal: Terminated.")))
    assert seen == [str(killed), "CUDA error: an illegal memory access was encountered",
                    "DataLoader worker (pid 4242) is killed by signal: Terminated."]


def test_a_stop_while_a_loader_makes_its_iterator_waits_for_the_iterator():
    # a DataLoader's iterator forks its workers and starts threads as it is made: a stop raised half-way left a
    # half-made iterator whose finaliser failed; held, it is raised once the iterator is whole
    class Loader:
        whole = False

        def __iter__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler would raise here
                pass
            Loader.whole = True
            return iter([1, 2])

    with pytest.raises(interrupts.Interrupted) as info:
        with interrupts.StopSignals():
            interrupts.start(Loader())
    assert Loader.whole and info.value.signum == signal.SIGINT
    assert list(interrupts.start([1, 2])) == [1, 2]  # outside a training loop: plain iter()


def test_signal_while_writing_is_deferred_until_the_checkpoint_is_complete(tmp_path, monkeypatch, reference):
    _signal_at(monkeypatch, runs, "log_epoch_row", 1, signal.SIGINT)
    with pytest.raises(interrupts.Interrupted) as info:
        search.run(_cfg(tmp_path / "run"))
    assert "last checkpoint is after epoch 2/" in str(info.value)
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    search.run(_cfg(tmp_path / "run", resume=True))
    _same_run(reference, tmp_path / "run")


def test_cli_exit_codes_on_signals(tmp_path, capsys, monkeypatch):
    _signal_at(monkeypatch, engine, "evaluate", 0, signal.SIGTERM)
    y = tmp_path / "t.yaml"
    cfg = _cfg(tmp_path / "run")
    y.write_text(json.dumps({k: cfg[k] for k in ("model", "model_kwargs", "pretrained", "data", "device", "batch_size",
                                                  "epochs", "num_workers", "target_gflops", "loss_lambda", "arc_lr",
                                                  "train_limit", "val_limit", "tensorboard", "progress",
                                                  "repeated_aug")}))
    rc = cli.main(["search", "--config", str(y), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM and err.count("\n") == 1 and err.startswith("spvit: interrupted (SIGTERM)")
