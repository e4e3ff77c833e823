"""Run folders and the files in them: the marker, the lock, ``--overwrite``, atomic writes, safe loading of user
files, checkpoints that load with ``torch.load(weights_only=True)`` and crash-consistent logs (stopping a run on a
signal is :mod:`spvit.interrupts`).

A run folder is one that holds the marker file :data:`MARKER` (written by the package when it creates the folder).
``--overwrite`` only ever removes what the package writes (:data:`OWNED`) and only in a run folder; a folder the
package did not create, ``.``, ``$HOME`` and ``/`` are refused. While a run uses a folder it holds an exclusive
``flock`` on :data:`LOCK` (released by the OS when the process dies, so a lock left by a killed run is stale and
taken over); a second run or an ``--overwrite`` of a folder in use is refused.

Crash consistency: every file is written to a unique temporary name in the same folder, flushed, fsynced and renamed
into place (then the folder is fsynced). Per epoch, the logs (``metrics.csv``, ``gates.jsonl``) and the read-outs
are written before the checkpoint that covers them; on resume they are trimmed to the checkpoint's epoch, so a kill
at any moment loses or duplicates no row.

This module imports nothing from the rest of the package.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fnmatch
import io
import json
import os
import pickle
import random
import shutil
import socket
import stat
import sys
import time
import uuid
import warnings
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

MARKER = ".spvit-run"
LOCK = ".spvit-lock"
CHECKPOINT = "checkpoint.pth"
# What the package writes into a run folder (all that --overwrite may remove). The demo's stages are run folders in
# the demo's (one that holds demo.yaml) and are cleaned the same way; no other sub-folder is entered.
DEMO_STAGES = ("teacher", "search", "finetune")
OWNED = ("config.yaml", "demo.yaml", "metrics.csv", "gates.jsonl", "arch.json", "arch_epoch*.json", CHECKPOINT,
         "best.pth", "summary.json", "demo.png", "tb", "*.spvit-tmp", LOCK, MARKER,
         # spvit compress: its settings, stages, latency table, measurements, report and deployed model
         "compress.yaml", "stages.json", "latency.json", "measure.json", "report.md", "report.png", "deployed.pth")
# An environment variable naming a point where the process kills itself (os._exit), for crash-consistency tests:
# ``SPVIT_CRASH_AT=<point>:<epoch>``; the points are the calls of :func:`crash_point`.
CRASH_ENV = "SPVIT_CRASH_AT"
CURRENT_EPOCH = -1  # the epoch being written (set by the training loop; names crash points inside writes)


class RunError(ValueError):
    """Bad run input (unusable run folder, nothing to resume, unreadable file); the CLI prints one line, exit 2."""


class RunIOError(OSError):
    """A write failed (e.g. the disk is full); the previous files are intact. The CLI prints one line, exit 1."""


# ----------------------------------------------------------------------------------------------------------------
# Crash injection (tests)


def crash_point(name: str, epoch: int = -1) -> None:
    """Kill the process here (``os._exit(137)``, like ``kill -9``) when ``SPVIT_CRASH_AT`` names this point
    (``point``, ``point:epoch`` or ``point:epoch:rank``)."""
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    point, _, rest = want.partition(":")
    ep, _, rank = rest.partition(":")  # an optional rank: only that process of a torchrun job dies
    if point == name and (not ep or int(ep) == epoch) and (not rank or os.environ.get("RANK", "0") == rank):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(137)


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A unique temporary name next to ``path`` (never shared by two processes or two writes)."""
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.spvit-tmp")


def atomic_write(path: str, write: Callable[[io.IOBase], None], binary: bool = True) -> None:
    """Write ``path`` through ``write(file)`` atomically: a unique temporary file, flushed and fsynced, renamed over
    ``path``. On any failure the temporary file is removed and ``path`` is untouched; an ``OSError`` (e.g. ENOSPC)
    becomes :class:`RunIOError` naming the file."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("writing_" + os.path.basename(path), CURRENT_EPOCH)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, RunIOError):
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
            raise RunIOError(exc.errno or errno.EIO, f"could not write {path}: {why}{hint}; "
                                                     f"the previous version of the file is intact") from exc
        raise
    _fsync_dir(os.path.dirname(path))


def save_torch(obj: Any, path: str) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`). The file is serialised in memory first, so a failing
    write (a full disk) is an ``OSError`` of the write itself, not an error inside torch's zip writer."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def write_json(obj: Any, path: str) -> None:
    write_text(path, json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Safe loading of user files


def load_torch_file(path: str, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings, lists and dicts only; nothing in the file
    can run code. Every failure is a :class:`RunError` naming the file and the problem."""
    if not os.path.exists(path):
        raise RunError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise RunError(f"{what} {path} is a folder, not a file")
    if os.path.getsize(path) == 0:
        raise RunError(f"{what} {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error below says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Unsupported operand" in msg:
            protocol = _pickle_protocol(path)
            if protocol is not None:  # pickle.dump's framed protocols, which the safe loader does not read
                raise RunError(f"{what} {path} is a plain pickle file (protocol {protocol}), not one written by "
                               f"torch.save; it may hold Python objects and is not loaded, since unpickling them can "
                               f"run code") from None
            raise RunError(f"{what} {path} is not a PyTorch checkpoint (not pickle data)") from None  # text, bytes
        if "Unsupported global" in msg or "GLOBAL" in msg or "weights_only" in msg and "load key" not in msg:
            raise RunError(f"{what} {path} holds Python objects other than tensors, numbers, strings, lists and "
                           f"dicts; it is not loaded, since unpickling them can run code") from None
        raise RunError(f"{what} {path} is not a PyTorch checkpoint (unreadable pickle data)") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if isinstance(exc, KeyError):  # an unknown pickle opcode: the bytes are no pickle
            first = "not pickle data"
        raise RunError(f"{what} {path} is not a readable PyTorch checkpoint (truncated, or not a checkpoint "
                       f"file: {first})") from None


def _pickle_protocol(path: str) -> Optional[int]:
    """The protocol of a file that starts like a pickle of protocol 2 or later, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL else None


def state_dict_of(obj: Any, path: str, what: str = "weights file") -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: ours (``{"model": ...}``), timm / DeiT files, bare state dicts."""
    if isinstance(obj, dict):
        for k in ("model", "state_dict", "model_ema"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    raise RunError(f"{what} {path} holds no model weights (expected a state dict of tensors)")


# ----------------------------------------------------------------------------------------------------------------
# RNG state in a form weights_only=True loads


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors, ints and lists."""
    version, words, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    s: Dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict[str, Any]) -> None:
    """Restore a state from :func:`rng_state`."""
    p = s["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["state"].tolist()), p["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Run folders


def _refused_places() -> List[str]:
    places = ["/", os.path.expanduser("~"), os.getcwd()]
    return [os.path.realpath(p) for p in places]


def is_run_folder(path: str) -> bool:
    """Whether ``path`` holds the marker (a regular file: a symbolic link named like it does not count)."""
    try:
        return stat.S_ISREG(os.lstat(os.path.join(path, MARKER)).st_mode)
    except OSError:
        return False


def _leftover_only(path: str) -> bool:
    """Whether ``path`` holds nothing but what an interrupted creation of a run folder leaves (the lock, the marker,
    temporary files): such a folder is treated as not yet created."""
    for entry in os.scandir(path):
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            return False
        if entry.name not in (LOCK, MARKER) and not entry.name.endswith(".spvit-tmp"):
            return False
    return True


def _refuse_links(out: str) -> None:
    """Refuse a run folder in which a file the package writes is a symbolic link (spvit never creates one, and reading
    or writing through it would reach a file outside the run)."""
    for entry in os.scandir(out):
        if entry.is_symlink() and any(fnmatch.fnmatch(entry.name, pat) for pat in OWNED):
            raise RunError(f"{entry.path} is a symbolic link; spvit writes and reads no file of a run folder through "
                           f"a link (remove it, or choose another --out)")


def check_out(out: Optional[str], overwrite: bool = False, resume: bool = False) -> str:
    """Validate ``--out`` without writing anything: a new or empty folder, a run folder with ``--overwrite`` or
    ``--resume``. Returns the path."""
    if not out:
        raise RunError("--out is required (the run folder)")
    if len(os.path.basename(os.path.normpath(out)).encode()) > 200 or len(os.path.abspath(out).encode()) > 3800:
        raise RunError(f"--out {out[:60]}... is too long a path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a folder")
    real = os.path.realpath(out)
    parent = os.path.dirname(os.path.abspath(out))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(out) and not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {out}: cannot create it ({parent} is not writable)")
    if os.path.isdir(out) and not os.access(out, os.W_OK | os.X_OK):
        raise RunError(f"--out {out} is not writable")
    # a folder left by a creation that was interrupted (only the lock, the marker, temporary files) counts as empty
    empty = not os.path.isdir(out) or not any(os.scandir(out)) or _leftover_only(out)
    if os.path.isdir(out):
        _refuse_links(out)
    if resume:
        if not is_run_folder(out) or not os.path.isfile(os.path.join(out, CHECKPOINT)):
            why = (" (the folder does not exist)" if not os.path.isdir(out) else
                   " (the run stopped before its first checkpoint: start it again without --resume)" if empty else "")
            raise RunError(f"--resume: no {CHECKPOINT} of a run in {out} to resume from{why}")
        return out
    if empty:
        return out
    if not overwrite:
        raise RunError(f"run folder {out} already exists and is not empty; pass --overwrite to replace the run in it, "
                       f"--resume to continue it, or choose another --out")
    if real in _refused_places() or os.getcwd().startswith(real.rstrip("/") + "/"):
        raise RunError(f"--overwrite refused for {out}: it is /, your home folder, the current folder or one of its "
                       f"parents; choose a dedicated --out")
    if not is_run_folder(out):
        raise RunError(f"--overwrite refused: {out} is not a run folder of spvit (no {MARKER} in it) and is not "
                       f"empty; nothing was removed. Choose another --out")
    return out


def _clean(folder: str) -> List[str]:
    """Remove what the package wrote in a run folder (and in the demo's stage folders); returns what stays."""
    kept = []
    demo = os.path.isfile(os.path.join(folder, "demo.yaml")) and not os.path.islink(os.path.join(folder, "demo.yaml"))
    for entry in os.scandir(folder):
        owned = any(fnmatch.fnmatch(entry.name, pat) for pat in OWNED)
        if (entry.is_dir(follow_symlinks=False) and entry.name in DEMO_STAGES and demo
                and is_run_folder(entry.path)):
            sub_lock = try_lock(entry.path)
            if sub_lock is None:
                raise RunError(f"--overwrite refused: {entry.path} is in use by another run")
            sub_lock.release()
            rest = _clean(entry.path)
            if not rest:
                os.rmdir(entry.path)
            else:
                kept.append(entry.name)
        elif owned and entry.name not in (LOCK,):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)
        elif entry.name != LOCK:
            kept.append(entry.name)
    return kept


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.spvit-lock`` holding the owner's pid and host."""

    def __init__(self, folder: str, fd: int):
        self.folder, self.fd = folder, fd

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.folder, LOCK))
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _lock_owner(path: str) -> str:
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)) as f:
            info = json.load(f)
        return f"process {info.get('pid')} on {info.get('host')} (since {info.get('since')})"
    except (OSError, ValueError):
        return "another process"


def try_lock(folder: str) -> Optional[RunLock]:
    """Take the folder's lock, or None when a live process holds it (a lock left by a dead process is taken)."""
    import fcntl

    path = os.path.join(folder, LOCK)
    for _ in range(5):
        try:  # never through a symbolic link (it would truncate its target), never a FIFO or device
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RunError(f"{path} is a symbolic link; spvit opens its lock file through no link (remove it)") \
                    from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunError(f"{path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:  # the file may have been removed and recreated between open and flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        with contextlib.suppress(OSError):  # the owner's name is advisory: a full disk does not stop the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        return RunLock(folder, fd)
    return None


def open_run(out: str, overwrite: bool = False, resume: bool = False) -> RunLock:
    """Create (or reopen) the run folder, lock it, clean it for ``overwrite`` and write the marker. Call after
    :func:`check_out` and after every other validation: this is the first write of a run."""
    check_out(out, overwrite, resume)
    created = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise RunError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    try:
        lock = try_lock(out)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise
    if lock is None:
        raise RunError(f"run folder {out} is in use by {_lock_owner(os.path.join(out, LOCK))}; wait for that run to "
                       f"end (or stop it) before starting, resuming or overwriting a run there")
    try:
        for entry in os.scandir(out):  # temporary files of a killed run (no live writer: we hold the lock)
            if entry.name.endswith(".spvit-tmp") and entry.is_file():
                os.remove(entry.path)
        if overwrite and not resume:
            _clean(out)
        if not is_run_folder(out):
            write_json({"spvit_run": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S")}, os.path.join(out, MARKER))
    except BaseException:
        lock.release()
        if created:  # a folder this call made goes again (an interrupted creation leaves nothing to clean up)
            with contextlib.suppress(OSError):
                for entry in os.scandir(out):
                    if entry.name.endswith(".spvit-tmp") or entry.name == MARKER:
                        os.remove(entry.path)
                os.rmdir(out)
        raise
    return lock


# ----------------------------------------------------------------------------------------------------------------
# Per-epoch logs (rewritten atomically; trimmed to the checkpoint's epoch on resume)


def _open_log(path: str, **kw) -> Optional[io.TextIOBase]:
    """A run's own log file for reading (None when absent); a symbolic link is refused, not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunError(f"{path} is a symbolic link; spvit reads no file of a run folder through a link") from None
        raise
    return os.fdopen(fd, encoding="utf-8", **kw)


def _read_csv(path: str) -> List[Dict[str, str]]:
    f = _open_log(path, newline="")
    if f is None:
        return []
    with f:
        return list(csv.DictReader(f))


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def write_csv_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def w(f):
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)

    atomic_write(path, w, binary=False)


def log_epoch_row(path: str, row: Dict[str, Any]) -> None:
    """Put ``row`` (with an ``epoch``) into the CSV at ``path``: rows of this and later epochs are replaced."""
    e = int(row["epoch"])
    rows = [r for r in _read_csv(path) if int(r.get("epoch", -1)) < e]
    write_csv_rows(path, rows + [{k: _fmt(v) for k, v in row.items()}])


def log_epoch_json(path: str, record: Dict[str, Any]) -> None:
    """Put ``record`` (with an ``epoch``) as one line into the JSON-lines file at ``path`` (later epochs dropped)."""
    e = int(record["epoch"])
    lines = [ln for ln in _read_lines(path) if json.loads(ln).get("epoch", -1) < e]
    write_text(path, "".join(ln + "\n" for ln in lines + [json.dumps(record)]))


def _read_lines(path: str) -> List[str]:
    f = _open_log(path)
    if f is None:
        return []
    with f:
        out = []
        for ln in f:
            ln = ln.strip()
            if not ln:
                continue
            try:
                json.loads(ln)
            except ValueError:  # a torn line cannot exist with atomic rewrites; skip one from an older writer
                continue
            out.append(ln)
        return out


def trim_logs(out: str, last_epoch: int, names=("metrics.csv", "gates.jsonl")) -> None:
    """Drop log rows of epochs after ``last_epoch`` (written before a kill that came before their checkpoint)."""
    for name in names:
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".csv"):
            rows = _read_csv(path)
            kept = [r for r in rows if int(r.get("epoch", -1)) <= last_epoch]
            if len(kept) != len(rows):
                write_csv_rows(path, kept)
        else:
            lines = _read_lines(path)
            kept = [ln for ln in lines if json.loads(ln).get("epoch", -1) <= last_epoch]
            if len(kept) != len(lines):
                write_text(path, "".join(ln + "\n" for ln in kept))
