"""Hardening of run folders and user files: a setting that lets a file run code is honoured only from the command line
(never from a --config or a saved config.yaml, never saved); every file a run reads is tried with a crafted pickle
(torch zip and plain pickle) that would write a marker file; no file of a run folder or of `spvit deploy` is written
or read through a symbolic link; a full disk while deploying is one line naming the file (exit 1); an interrupted
creation of a run folder leaves a folder the same command accepts; signals print one line."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from spvit import cli, runs
from spvit import engine as E
from spvit.arch import Architecture
from .pipeline_helpers import repo_root, tiny_args, tiny_yaml
from .test_runs import _crafted, _one_error_line, _rc, _search_argv, runs_dir  # noqa: F401  (fixture)


def _ft_argv(tmp_path, runs_dir, out, *extra):
    return ["finetune", "--config", tiny_yaml(tmp_path), *tiny_args(), "--arch", str(runs_dir / "search" / "arch.json"),
            "--init", "none", "--out", str(out), *extra]


def _no_tmp(folder):
    return not [f for f in os.listdir(folder) if f.endswith(".spvit-tmp") or ".tmp" in f]


# ----------------------------------------------------------------------------------------------------------------
# Code-running settings come from the command line only


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "plain-pickle"])
def test_code_running_setting_is_not_taken_from_files(raw, tmp_path, runs_dir, capsys):
    payload, marker = _crafted(tmp_path, "teacher", raw)
    # a --config file that allows it
    cfg = tmp_path / "allow.yaml"
    cfg.write_text(yaml.safe_dump({"train_limit": 64, "val_limit": 32, "tensorboard": False,
                                   "teacher_file_runs_code": True}))
    argv = _ft_argv(tmp_path, runs_dir, tmp_path / "a", "--distillation", "hard", "--teacher", payload)
    argv[argv.index("--config") + 1] = str(cfg)
    rc, err = _rc(argv, capsys)
    assert not marker.exists()
    assert rc == 2 and _one_error_line(err) and "only on the command line" in err, err
    assert not (tmp_path / "a").exists()
    # a run folder whose saved config allows it: a plain --resume
    planted = tmp_path / "planted"
    shutil.copytree(runs_dir / "ft", planted)
    saved = yaml.safe_load(open(planted / "config.yaml"))
    saved.update(teacher_file_runs_code=True, distillation="hard", teacher=str(payload), epochs=3)
    (planted / "config.yaml").write_text(yaml.safe_dump(saved))
    rc, err = _rc(["finetune", "--out", planted, "--resume"], capsys)
    assert not marker.exists(), "code ran through a saved config.yaml"
    assert rc == 2 and _one_error_line(err) and "--teacher-file-runs-code" in err, err


def test_code_running_setting_is_never_saved_and_must_be_typed_again(tmp_path, runs_dir, capsys):
    from spvit.models.registry import spvit_demo_vit
    from .pipeline_helpers import TINY_MODEL

    module = tmp_path / "teacher_module.pth"
    torch.save(spvit_demo_vit(num_classes=10, **TINY_MODEL), module)
    out = tmp_path / "b"
    argv = _ft_argv(tmp_path, runs_dir, out, "--distillation", "hard", "--teacher", module, "--stop-after-epoch", "0",
                    "--epochs", "2")
    assert cli.main([str(a) for a in argv + ["--teacher-file-runs-code"]]) == 0
    capsys.readouterr()
    assert "teacher_file_runs_code" not in yaml.safe_load(open(out / "config.yaml"))
    rc, err = _rc(["finetune", "--out", out, "--resume"], capsys)
    assert rc == 2 and _one_error_line(err) and "--teacher-file-runs-code" in err, err
    rc, err = _rc(["finetune", "--out", out, "--resume", "--teacher-file-runs-code"], capsys)
    assert rc == 0, err
    assert "teacher_file_runs_code" not in yaml.safe_load(open(out / "config.yaml"))


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "plain-pickle"])
def test_crafted_pickle_in_every_other_file_runs_no_code(raw, tmp_path, runs_dir, capsys):
    """--config, --arch (JSON name and checkpoint name), --latency-table (search and bench), deploy --checkpoint;
    (the checkpoint, weights, init, teacher and resume paths: tests/test_runs.py). No torch warning either."""
    best = str(runs_dir / "ft" / "best.pth")
    cases = {
        "config": lambda p: _search_argv(tmp_path, tmp_path / "o1", "--config", p),
        "arch-json": lambda p: _ft_argv(tmp_path, runs_dir, tmp_path / "o2", "--arch", p),
        "arch-pth": lambda p: _ft_argv(tmp_path, runs_dir, tmp_path / "o3", "--arch", p, "--model", "spvit_demo_vit"),
        "search-latency-table": lambda p: _search_argv(tmp_path, tmp_path / "o4", "--latency-table", p,
                                                       "--target-speedup", "1.5"),
        "bench-latency-table": lambda p: ["bench", "--checkpoint", best, "--latency-table", p, "--iters", "1",
                                          "--device", "cpu"],
        "deploy": lambda p: ["deploy", "--checkpoint", p, "--out", tmp_path / "o5"],
    }
    for case, argv_of in cases.items():
        payload, marker = _crafted(tmp_path, case, raw)
        if case == "arch-json":
            payload = payload.rename(payload.with_suffix(".json"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc, err = _rc(argv_of(str(payload)), capsys)
        assert not marker.exists(), f"code ran through {case}"
        assert rc == 2 and _one_error_line(err), (case, err)
        assert not [w for w in caught if "torch" in str(w.filename) or "pickle" in str(w.message).lower()], \
            (case, [str(w.message) for w in caught])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


# ----------------------------------------------------------------------------------------------------------------
# No file through a symbolic link


def test_lock_and_logs_are_never_opened_through_a_link(tmp_path, runs_dir, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    out = tmp_path / "r"
    runs.open_run(str(out)).release()
    os.symlink(victim, out / runs.LOCK)
    rc, err = _rc(_search_argv(tmp_path, out, "--overwrite"), capsys)
    assert rc == 2 and _one_error_line(err) and "symbolic link" in err, err
    with pytest.raises(runs.RunError, match="symbolic link"):
        runs.try_lock(str(out))  # also when the link appears after the checks
    assert victim.read_text() == "mine\n"
    # metrics.csv of a run replaced by a link to someone else's table
    planted = tmp_path / "planted"
    shutil.copytree(runs_dir / "search", planted)
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("epoch,val_acc1\n0,99\n1,99\n")
    os.remove(planted / "metrics.csv")
    os.symlink(foreign, planted / "metrics.csv")
    rc, err = _rc(["search", "--out", planted, "--resume", "--epochs", "2", "--allow-changes"], capsys)
    assert rc == 2 and _one_error_line(err) and "metrics.csv is a symbolic link" in err, err
    with pytest.raises(runs.RunError, match="symbolic link"):
        runs.trim_logs(str(planted), 0)
    assert foreign.read_text() == "epoch,val_acc1\n0,99\n1,99\n"


def test_deploy_replaces_a_link_instead_of_writing_through_it(tmp_path, runs_dir, capsys):
    best = runs_dir / "ft" / "best.pth"
    out = tmp_path / "d"
    assert cli.main(["deploy", "--checkpoint", str(best), "--out", str(out)]) == 0
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"mine")
    for name in ("model.pt2", "deployed.pth", "arch.json"):
        os.remove(out / name)
        os.symlink(victim, out / name)
    assert cli.main(["deploy", "--checkpoint", str(best), "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert victim.read_bytes() == b"mine"
    for name in ("model.pt2", "deployed.pth", "arch.json"):
        assert not os.path.islink(out / name) and os.path.getsize(out / name) > 0
    assert torch.export.load(str(out / "model.pt2")) is not None and _no_tmp(out)


# ----------------------------------------------------------------------------------------------------------------
# A full disk while deploying


def test_full_disk_while_deploying_is_one_line_naming_the_file(tmp_path, runs_dir, capsys, monkeypatch):
    best = runs_dir / "ft" / "best.pth"
    out = tmp_path / "d"
    assert cli.main(["deploy", "--checkpoint", str(best), "--out", str(out), "--format", "onnx"]) == 0
    capsys.readouterr()
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    real = runs.atomic_write

    def full(path, write, binary=True):
        if path.endswith("model.pt2"):
            def partial(f):
                f.write(b"some bytes")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, partial, binary)
        return real(path, write, binary)

    monkeypatch.setattr(runs, "atomic_write", full)
    rc, err = _rc(["deploy", "--checkpoint", best, "--out", out, "--overwrite"], capsys)
    assert rc == 1 and _one_error_line(err) and "model.pt2" in err and "disk is full" in err, err
    assert (out / "model.pt2").read_bytes() == before["model.pt2"] and _no_tmp(out)
    monkeypatch.setattr(runs, "atomic_write", real)

    real_export = torch.onnx.export

    def onnx_full(model, args, f, **kw):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", onnx_full)
    rc, err = _rc(["deploy", "--checkpoint", best, "--out", out, "--overwrite", "--format", "onnx"], capsys)
    assert rc == 1 and _one_error_line(err) and "model.onnx" in err and "disk is full" in err, err
    assert (out / "model.onnx").read_bytes() == before["model.onnx"] and _no_tmp(out)
    monkeypatch.setattr(torch.onnx, "export", real_export)


def _mount_tmpfs(folder, size):
    folder.mkdir()
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def test_full_disk_while_deploying_on_a_real_small_filesystem(tmp_path, runs_dir):
    """A tmpfs with room for deployed.pth and arch.json only: torch.export's program does not fit (skipped where
    mounting is not allowed)."""
    best = runs_dir / "ft" / "best.pth"
    ref = tmp_path / "ref"
    assert cli.main(["deploy", "--checkpoint", str(best), "--out", str(ref)]) == 0
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "4M"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        need = sum(-(-os.path.getsize(ref / n) // 4096) * 4096 for n in ("deployed.pth", "arch.json"))
        room = os.statvfs(small)
        with open(small / "filler", "wb") as f:
            f.write(b"\0" * (room.f_bavail * room.f_frsize - need - 4096))
        assert os.path.getsize(ref / "model.pt2") > 8192
        env = {**os.environ, "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        p = subprocess.run([sys.executable, "-m", "spvit", "deploy", "--checkpoint", str(best), "--out",
                            str(small / "d")], capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 1 and _one_error_line(p.stderr), p.stderr[-3000:]
        assert "model.pt2" in p.stderr and "disk is full" in p.stderr, p.stderr
        assert sorted(os.listdir(small / "d")) == ["arch.json", "deployed.pth"]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True, timeout=30)


# ----------------------------------------------------------------------------------------------------------------
# Creating a run folder: an interruption leaves a folder the same command accepts

KILL_AT_MARKER = f"writing_{runs.MARKER}"


def test_a_kill_while_creating_the_run_folder_then_the_same_command_works(tmp_path, capsys):
    out = tmp_path / "run"
    argv = _search_argv(tmp_path, out)
    env = {**os.environ, runs.CRASH_ENV: KILL_AT_MARKER,
           "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "spvit", *argv], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 137, p.stderr[-2000:]
    left = sorted(os.listdir(out))
    assert runs.LOCK in left and any(f.endswith(".spvit-tmp") for f in left) and runs.MARKER not in left, left
    runs.check_out(str(out))
    runs.check_out(str(out), overwrite=True)
    with pytest.raises(runs.RunError, match="without --resume"):
        runs.check_out(str(out), resume=True)
    assert cli.main(argv) == 0  # the same command
    capsys.readouterr()
    assert (out / "checkpoint.pth").exists() and _no_tmp(out)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "ENOSPC"])
def test_a_signal_or_a_full_disk_while_creating_the_run_folder(how, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = runs.atomic_write

    def at_marker(path, write, binary=True):
        if path.endswith(runs.MARKER):
            if how == "ENOSPC":
                raise runs.RunIOError(errno.ENOSPC, f"could not write {path}: No space left on device (the disk is "
                                                    f"full); the previous version of the file is intact")
            os.kill(os.getpid(), getattr(signal, how))
        return real(path, write, binary)

    monkeypatch.setattr(runs, "atomic_write", at_marker)
    rc, err = _rc(_search_argv(tmp_path, out), capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    want = {"SIGTERM": 143, "SIGHUP": 129, "ENOSPC": 1}[how]
    assert rc == want and len(lines) == 1, err
    assert (runs.MARKER in lines[0]) if how == "ENOSPC" else (f"interrupted ({how})" in lines[0]), err
    assert not out.exists() or runs._leftover_only(str(out))
    monkeypatch.setattr(runs, "atomic_write", real)
    runs.check_out(str(out))


def test_a_leftover_marker_and_lock_count_as_not_yet_created(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / runs.LOCK).write_text("{}")
    (out / runs.MARKER).write_text("{}")
    runs.check_out(str(out))
    (out / "mine.txt").write_text("keep")
    with pytest.raises(runs.RunError, match="not empty"):
        runs.check_out(str(out))


# ----------------------------------------------------------------------------------------------------------------
# Smaller cases


def test_overwrite_enters_no_foreign_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    runs.open_run(str(out)).release()
    inner = out / "colleague"
    runs.open_run(str(inner)).release()
    (inner / "config.yaml").write_text("theirs")
    (inner / "metrics.csv").write_text("theirs")
    (out / "config.yaml").write_text("ours")
    runs.open_run(str(out), overwrite=True).release()
    assert not (out / "config.yaml").exists()
    assert (inner / "config.yaml").read_text() == "theirs" and (inner / "metrics.csv").read_text() == "theirs"
    assert (inner / runs.MARKER).exists()


def test_architecture_save_into_a_folder_leaves_no_temporary(tmp_path, runs_dir):
    arch = Architecture.load(str(runs_dir / "search" / "arch.json"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError):
        arch.save(str(tmp_path / "folder"))
    assert sorted(os.listdir(tmp_path)) == ["folder"]


def test_unreadable_arch_and_a_link_loop_in_the_data_are_bad_input(tmp_path, runs_dir, capsys, monkeypatch):
    def unreadable(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(Architecture, "load", staticmethod(unreadable))
    rc, err = _rc(_ft_argv(tmp_path, runs_dir, tmp_path / "o"), capsys)
    assert rc == 2 and _one_error_line(err) and "cannot read" in err, err
    monkeypatch.undo()
    data = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
    os.symlink(data / "train" / "a" / "loop2", data / "train" / "a" / "loop1")
    os.symlink(data / "train" / "a" / "loop1", data / "train" / "a" / "loop2")
    argv = _search_argv(tmp_path, tmp_path / "o")
    argv[argv.index("--data") + 1] = str(data)
    rc, err = _rc(argv, capsys)
    assert rc == 2 and _one_error_line(err), err


def test_a_signal_after_start_up_before_training_is_one_line(tmp_path, capsys, monkeypatch):
    # what this process had (the default handler; SIG_IGN when started in the background by a shell without job
    # control)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        real = E.setup

        def setup(*a, _signum=signum, **k):
            os.kill(os.getpid(), _signum)
            return real(*a, **k)

        monkeypatch.setattr(E, "setup", setup)
        rc, err = _rc(_search_argv(tmp_path, tmp_path / "o"), capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 128 + signum and len(lines) == 1, err
        assert "before training began" in lines[0] and "--resume" not in lines[0], err
        assert not (tmp_path / "o").exists()
        monkeypatch.undo()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # main() restores the handlers


# ----------------------------------------------------------------------------------------------------------------
# Signals to the whole process group of a real run with DataLoader workers, and during start-up


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def test_signals_to_the_process_group_print_one_line(tmp_path):
    import time

    env = {**os.environ, "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    y = tmp_path / "long.yaml"
    y.write_text(yaml.safe_dump({"train_limit": 256, "val_limit": 32, "tensorboard": False}))  # 16 steps per epoch
    procs = {}
    # nohup-SIGTERM: started with SIGHUP ignored, as nohup does; the SIGHUPs it gets at start-up and in epoch 1 are
    # ignored (the run goes on), the SIGTERM that follows stops it
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "start-SIGINT", "start-SIGTERM", "nohup-SIGTERM"):
        out = tmp_path / name
        argv = _search_argv(tmp_path, out, "--config", str(y), "--num-workers", "2", "--epochs", "200")
        nohup = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if name.startswith("nohup") else None
        procs[name] = (out, subprocess.Popen([sys.executable, "-m", "spvit", *argv], env=env, start_new_session=True,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                             preexec_fn=nohup))
    time.sleep(1.5)  # importing torch takes longer than this
    for name in ("start-SIGINT", "start-SIGTERM"):
        os.killpg(procs[name][1].pid, getattr(signal, name.split("-")[1]))
    os.killpg(procs["nohup-SIGTERM"][1].pid, signal.SIGHUP)
    deadline = time.time() + 500
    pending = {"SIGINT", "SIGTERM", "SIGHUP", "nohup-SIGTERM"}
    while pending and time.time() < deadline:  # after epoch 0, while the workers of epoch 1 run
        for name in sorted(pending):
            out, p = procs[name]
            assert not (name.startswith("nohup") and p.poll() is not None), \
                ("a SIGHUP stopped a run started under nohup", p.communicate()[1][-2000:])
            if (out / "metrics.csv").exists() and _children(p.pid):
                time.sleep(0.5)
                if name.startswith("nohup"):
                    os.killpg(p.pid, signal.SIGHUP)
                    time.sleep(1.0)
                    assert p.poll() is None, ("a SIGHUP stopped a run started under nohup", p.communicate()[1])
                os.killpg(p.pid, getattr(signal, name.split("-")[-1]))
                pending.discard(name)
        time.sleep(0.2)
    try:
        assert not pending, "the runs did not reach epoch 1"
        for name, (out, p) in procs.items():
            err = p.communicate(timeout=120)[1]
            lines = [ln for ln in err.splitlines() if ln.strip()]
            sig = getattr(signal, name.split("-")[-1])
            assert p.returncode == 128 + sig, (name, err[-3000:])
            assert len(lines) == 1 and lines[0].startswith(f"spvit: interrupted ({sig.name})"), (name, err[-3000:])
            if not name.startswith("start"):
                assert "--resume" in lines[0] and not (out / runs.LOCK).exists(), (name, lines)
            if name.startswith("nohup"):  # it got through start-up and epoch 0
                assert (out / "metrics.csv").exists() and "SIGHUP" not in err, err
    finally:
        for _, p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# What a signal sent to the whole process group does to a DataLoader worker caught between torch's own SIGTERM handler
# and our worker_init_fn: the worker dies of it while the main process gets the same signal. The worker does here
# what the race does, at a chosen moment: it signals its parent, waits, then dies of SIGTERM under the default action.
_WORKER_CAUGHT = """
import os, signal, sys, time
from spvit import cli, interrupts, runs

real, delay = interrupts._quiet_worker, float(os.environ["WORKER_DEATH_DELAY"])

def caught(previous, worker_id):
    if runs.CURRENT_EPOCH == 1 and worker_id == 0:
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(delay)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    real(previous, worker_id)

interrupts._quiet_worker = caught
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_worker_killed_by_the_stop_signal_is_part_of_the_stop(tmp_path):
    # torch's SIGCHLD handler reports the dead worker ("DataLoader worker (pid N) is killed by signal: Terminated."):
    # in the iterator's finaliser (Python printed "Exception ignored in ..." and its traceback under the one line),
    # or while the stop unwinds (it replaced the interruption with a training failure). Either way: one line, 143.
    procs = {}
    for delay in ("0", "0.5"):  # the worker dies with the signal, or while the main process stops the run
        out = tmp_path / f"run-{delay}"
        argv = _search_argv(tmp_path, out, "--num-workers", "2", "--epochs", "3")
        env = {**os.environ, "WORKER_DEATH_DELAY": delay,
               "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs[delay] = (out, subprocess.Popen([sys.executable, "-c", _WORKER_CAUGHT, *argv], env=env,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for delay, (out, p) in procs.items():
            err = p.communicate(timeout=300)[1]
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert p.returncode == 128 + signal.SIGTERM, (delay, err[-3000:])
            assert len(lines) == 1, (delay, err[-3000:])
            assert lines[0].startswith("spvit: interrupted (SIGTERM) in search epoch 2/3; the last checkpoint is "
                                       "after epoch 1/3"), (delay, lines)
            assert "--resume" in lines[0] and not (out / runs.LOCK).exists(), (delay, lines)
            assert torch.load(out / runs.CHECKPOINT, weights_only=True)["epoch"] == 0
    finally:
        for _, p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_dead_rank_under_torchrun_is_one_line_on_the_survivor(tmp_path):
    from .pipeline_helpers import free_port

    out = tmp_path / "run"
    argv = _search_argv(tmp_path, out, "--epochs", "3")
    logs = tmp_path / "logs"
    env = {**os.environ, runs.CRASH_ENV: "after_train:1:1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": repo_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "--log-dir", str(logs), "--redirects", "3", "-m", "spvit",
           *argv]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode != 0
    found = [os.path.join(d, f) for d, _, fs in os.walk(logs) for f in fs if f == "stderr.log"]
    rank0 = [f for f in found if os.path.basename(os.path.dirname(f)) == "0"]
    assert len(rank0) == 1, found
    # torch's own C++ notices ("[rank0]:[W... reducer.cpp] Warning: find_unused_parameters ...") are not ours
    lines = [ln for ln in open(rank0[0]).read().splitlines() if ln.strip() and not ln.startswith("[rank0]:[W")]
    assert len(lines) == 1, lines
    # the agent may stop the survivor (SIGTERM) before the broken connection surfaces: one line either way
    assert ("rank 0: rank 1 of this torchrun job stopped" in lines[0] and "--resume" in lines[0]
            or lines[0].startswith("spvit: interrupted (SIGTERM)")), lines
    assert (out / "checkpoint.pth").exists() and not (out / runs.LOCK).exists()
