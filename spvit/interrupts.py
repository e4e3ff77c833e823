"""Stopping a run cleanly: SIGINT / SIGTERM / SIGHUP become :class:`Interrupted` at a safe point (deferred while files
are written), DataLoader workers leave the signals to the main process, and a lost torchrun peer is recognised.

This module imports nothing from the rest of the package.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator, Optional


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived; the run stopped at a safe point (the message says how to continue)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
# Signals the process was started with ignored (``nohup`` ignores SIGHUP; a shell without job control ignores SIGINT in
# the commands it starts in the background): they stay ignored, as the one who started the process asked. Read when
# this module is first imported, before the package installs a handler (``spvit._startup`` imports it first).
IGNORED_AT_START = frozenset(sig for sig in STOP_SIGNALS if signal.getsignal(sig) is signal.SIG_IGN)


def catchable(sig: int) -> bool:
    """Whether the package may handle ``sig`` (it was not ignored when the process started)."""
    return sig not in IGNORED_AT_START


TRAINING_BEGAN = False  # set once a training loop has entered StopSignals (names what a later stop means)


def _in_child(owner_pid: int) -> bool:
    """Whether this is a process forked after the handler was installed (a DataLoader worker): it leaves the signal
    to the main process, which stops the workers and prints the one line."""
    return os.getpid() != owner_pid


def install_stop_handlers() -> None:
    """For the ``spvit`` command, outside the training loop: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`
    (the ``finally`` blocks release the lock, the CLI prints one line, exit 128 + the signal's number)."""
    global TRAINING_BEGAN
    TRAINING_BEGAN = False
    if threading.current_thread() is not threading.main_thread():
        return
    pid = os.getpid()

    def handle(signum, frame):
        if _in_child(pid):
            return
        name = signal.Signals(signum).name
        if TRAINING_BEGAN:
            raise Interrupted(f"interrupted ({name}) outside the training loop; every file written is complete",
                              signum)
        raise Interrupted(f"interrupted ({name}) before training began; nothing was saved to resume", signum)

    for sig in filter(catchable, STOP_SIGNALS):
        signal.signal(sig, handle)


def _quiet_worker(previous: Optional[Callable[[int], None]], worker_id: int) -> None:
    for sig in STOP_SIGNALS:  # torch's worker handler would die by a SIGTERM sent to the whole process group
        signal.signal(sig, signal.SIG_IGN)
    if previous is not None:
        previous(worker_id)


def quiet_workers(loader: Any) -> None:
    """Let the worker processes of a ``DataLoader`` ignore SIGINT / SIGTERM / SIGHUP (Ctrl-C and a scheduler's
    SIGTERM reach the whole process group): the main process stops the run, shuts the workers down and prints the one
    line, instead of each worker printing a traceback and the main process reporting a dead worker."""
    if loader is not None and getattr(loader, "num_workers", 0):
        loader.worker_init_fn = functools.partial(_quiet_worker, loader.worker_init_fn)


class StopSignals:
    """SIGINT / SIGTERM / SIGHUP handling for a run: outside :meth:`critical` a signal stops the run at once (the work
    since the last checkpoint is dropped); inside (while files are written) it is deferred to the end of the section.
    Processes forked inside (DataLoader workers) ignore the signals: the main process stops them. Restores the
    previous handlers on exit. A no-op outside the main thread."""

    def __init__(self):
        self.pending: Optional[int] = None
        self.depth = 0
        self.old: Dict[int, Any] = {}
        self.pid = os.getpid()

    def __enter__(self) -> "StopSignals":
        global TRAINING_BEGAN
        TRAINING_BEGAN = True
        if threading.current_thread() is threading.main_thread():
            for sig in filter(catchable, STOP_SIGNALS):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)

    def _handle(self, signum, frame) -> None:
        if _in_child(self.pid):
            return
        if self.depth > 0:
            self.pending = signum
            return
        raise Interrupted(signal.Signals(signum).name, signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signal.Signals(signum).name, signum)


PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
             "nccl communicator was aborted", "socket timeout")


def peer_lost(exc: BaseException) -> bool:
    """True for the error a torchrun rank sees when another rank of its job died (its connection closed)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world >= 2 and any(s in str(exc).lower() for s in PEER_LOST)
