"""Stopping a run cleanly: SIGINT / SIGTERM / SIGHUP become :class:`Interrupted` at a safe point (deferred while files
are written), DataLoader workers leave the signals to the main process, and a lost torchrun peer is recognised.

This module imports nothing from the rest of the package.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Tuple


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

# The last stop signal whose handler raised Interrupted, and its message. A handler runs in whatever Python code the
# main thread executes next, and where an exception cannot propagate Python drops it (it prints "Exception ignored
# in: ..."): in an at-fork hook (logging's runs in the parent each time a DataLoader forks its workers), a finaliser or
# a weakref callback. The signal would be lost and the run would go on; check() raises it again at the next step.
_FIRED: Optional[Tuple[int, str]] = None


def _stop(signum: int, message: str) -> None:
    global _FIRED
    _FIRED = (signum, message)
    raise Interrupted(message, signum)


def _quiet_dropped(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that says nothing of a dropped :class:`Interrupted` (``check`` raises it again, and the
    command prints its one line then) and passes everything else to ``previous``."""
    if getattr(previous, "_spvit_quiet", False):
        return previous

    def hook(unraisable):
        if isinstance(unraisable.exc_value, Interrupted) and _FIRED is not None:
            return
        previous(unraisable)

    hook._spvit_quiet = True  # type: ignore[attr-defined]
    return hook


def check() -> None:
    """Raise :class:`Interrupted` again for a stop signal whose first raise was dropped (see ``_FIRED``). The training
    and evaluation loops call it at every step: one global read."""
    if _FIRED is not None:
        _stop(*_FIRED)


def _in_child(owner_pid: int) -> bool:
    """Whether this is a process forked after the handler was installed (a DataLoader worker): it leaves the signal
    to the main process, which stops the workers and prints the one line."""
    return os.getpid() != owner_pid


def install_stop_handlers() -> None:
    """For the ``spvit`` command, outside the training loop: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`
    (the ``finally`` blocks release the lock, the CLI prints one line, exit 128 + the signal's number)."""
    global TRAINING_BEGAN, _FIRED
    TRAINING_BEGAN, _FIRED = False, None
    if threading.current_thread() is not threading.main_thread():
        return
    pid = os.getpid()

    def handle(signum, frame):
        if _in_child(pid):
            return
        name = signal.Signals(signum).name
        if TRAINING_BEGAN:
            _stop(signum, f"interrupted ({name}) outside the training loop; every file written is complete")
        _stop(signum, f"interrupted ({name}) before training began; nothing was saved to resume")

    for sig in filter(catchable, STOP_SIGNALS):
        signal.signal(sig, handle)
    sys.unraisablehook = _quiet_dropped(sys.unraisablehook)


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
    previous handlers on exit; a stop signal whose first raise was dropped (see ``check``) is raised on entry and on
    leaving a critical section, and on exit when the run ended without an error, and Python's "Exception ignored"
    report of it is not printed. A no-op outside the main thread."""

    def __init__(self):
        self.pending: Optional[int] = None
        self.depth = 0
        self.old: Dict[int, Any] = {}
        self.pid = os.getpid()
        self.old_hook: Optional[Callable[[Any], None]] = None

    def __enter__(self) -> "StopSignals":
        global TRAINING_BEGAN, _FIRED
        fired, _FIRED = _FIRED, None
        if fired is not None:  # one that arrived before training began (the caller names where the run stopped)
            raise Interrupted(signal.Signals(fired[0]).name, fired[0])
        TRAINING_BEGAN = True
        if threading.current_thread() is threading.main_thread():
            for sig in filter(catchable, STOP_SIGNALS):
                self.old[sig] = signal.signal(sig, self._handle)
            self.old_hook = sys.unraisablehook
            sys.unraisablehook = _quiet_dropped(self.old_hook)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        global _FIRED
        for sig, h in self.old.items():
            signal.signal(sig, h)
        if self.old_hook is not None:
            sys.unraisablehook = self.old_hook
        fired, _FIRED = _FIRED, None  # raised by now, or on its way out with the exception that ends the run
        if exc_type is None and fired is not None:
            raise Interrupted(fired[1], fired[0])

    def _handle(self, signum, frame) -> None:
        if _in_child(self.pid):
            return
        if self.depth > 0:
            self.pending = signum
            return
        _stop(signum, signal.Signals(signum).name)

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
        if self.depth == 0:
            check()


PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
             "nccl communicator was aborted", "socket timeout")


def peer_lost(exc: BaseException) -> bool:
    """True for the error a torchrun rank sees when another rank of its job died (its connection closed)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world >= 2 and any(s in str(exc).lower() for s in PEER_LOST)
