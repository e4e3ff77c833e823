"""Stopping a run cleanly: SIGINT / SIGTERM / SIGHUP become :class:`Interrupted` at a safe point (deferred while files
are written), DataLoader workers leave the signals to the main process, and a lost torchrun peer is recognised.

This module imports nothing from the rest of the package.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
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
# The last stop signal the main process received in this command (deferred ones included); kept after the run ended.
RECEIVED: Optional[int] = None
_ACTIVE: Optional["StopSignals"] = None  # the StopSignals of the training loop running now (main thread)


def _stop(signum: int, message: str) -> None:
    global _FIRED
    _FIRED = (signum, message)
    raise Interrupted(message, signum)


# torch's errors for a dead DataLoader worker: from its SIGCHLD handler, and from a read that found the worker gone
_WORKER_DIED = re.compile(r"DataLoader worker \(pids?(?:\(s\))? [\d, ]+\) (?:is killed by signal|exited unexpectedly)")


def worker_killed_by_stop(exc: BaseException) -> Optional[int]:
    """The stop signal the main process received in this command, when ``exc`` is torch's error for a dead DataLoader
    worker ("DataLoader worker (pid N) is killed by signal: Terminated.", "... exited unexpectedly"); None otherwise.

    A signal sent to the whole process group (a scheduler's SIGTERM, ``kill -- -PGID``) also reaches the DataLoader
    workers. They ignore it (:func:`quiet_workers`) from the moment their ``worker_init_fn`` runs, but torch installs
    its own SIGTERM handler in a new worker just before, and under that handler the worker dies. The main process
    then hears of the dead worker while it stops the run for the same signal: in a finaliser (Python would print
    "Exception ignored in ..."), while the stop unwinds, or at the next read, when the stop's own exception was
    dropped (see ``_FIRED``). The run was stopping for that signal: the dead worker is part of the stop, not a second
    failure."""
    if RECEIVED is None or not isinstance(exc, RuntimeError):
        return None
    return RECEIVED if _WORKER_DIED.search(str(exc)) else None


def _quiet_dropped(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that says nothing of a dropped :class:`Interrupted` (``check`` raises it again, and the
    command prints its one line then), nor of a DataLoader worker killed by the stop signal (see
    :func:`worker_killed_by_stop`), and passes everything else to ``previous``."""
    if getattr(previous, "_spvit_quiet", False):
        return previous

    def hook(unraisable):
        if isinstance(unraisable.exc_value, Interrupted) and _FIRED is not None:
            return
        if worker_killed_by_stop(unraisable.exc_value) is not None:
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
    global TRAINING_BEGAN, _FIRED, RECEIVED
    TRAINING_BEGAN, _FIRED, RECEIVED = False, None, None
    if threading.current_thread() is not threading.main_thread():
        return
    pid = os.getpid()

    def handle(signum, frame):
        global RECEIVED
        if _in_child(pid):
            return
        RECEIVED = signum
        _stop(signum, outside_message(signum))

    for sig in filter(catchable, STOP_SIGNALS):
        signal.signal(sig, handle)
    sys.unraisablehook = _quiet_dropped(sys.unraisablehook)


def outside_message(signum: int) -> str:
    """What the ``spvit`` command says of a stop signal outside the training loop."""
    name = signal.Signals(signum).name
    if TRAINING_BEGAN:
        return f"interrupted ({name}) outside the training loop; every file written is complete"
    return f"interrupted ({name}) before training began; nothing was saved to resume"


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


def start(loader: Any) -> Iterator[Any]:
    """``iter(loader)`` with the training loop's stop signals held until the iterator is whole.

    Making a DataLoader's iterator forks its workers and starts its threads. A stop raised in the middle (a handler
    raises at whatever line runs) leaves a half-made iterator, whose finaliser then fails ("... object has no attribute
    '_workers_status'"), or a thread whose start was cut short, and Python prints either as "Exception ignored in ...".
    Held, the stop is raised once the iterator is whole, and its finaliser shuts the workers down as usual. Outside a
    training loop (no :class:`StopSignals` active) this is ``iter(loader)``."""
    active = _ACTIVE
    if active is None:
        return iter(loader)
    with active.critical():
        return iter(loader)


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
        self.old_active: Optional[StopSignals] = None

    def __enter__(self) -> "StopSignals":
        global TRAINING_BEGAN, _FIRED, RECEIVED, _ACTIVE
        fired, _FIRED, RECEIVED = _FIRED, None, None
        if fired is not None:  # one that arrived before training began (the caller names where the run stopped)
            raise Interrupted(signal.Signals(fired[0]).name, fired[0])
        TRAINING_BEGAN = True
        if threading.current_thread() is threading.main_thread():
            for sig in filter(catchable, STOP_SIGNALS):
                self.old[sig] = signal.signal(sig, self._handle)
            self.old_hook = sys.unraisablehook
            sys.unraisablehook = _quiet_dropped(self.old_hook)
            self.old_active, _ACTIVE = _ACTIVE, self
        return self

    def __exit__(self, exc_type, *exc) -> None:
        global _FIRED, _ACTIVE
        for sig, h in self.old.items():
            signal.signal(sig, h)
        if self.old_hook is not None:
            sys.unraisablehook = self.old_hook
            _ACTIVE = self.old_active
        fired, _FIRED = _FIRED, None  # raised by now, or on its way out with the exception that ends the run
        if exc_type is None and fired is not None:
            raise Interrupted(fired[1], fired[0])

    def _handle(self, signum, frame) -> None:
        global RECEIVED
        if _in_child(self.pid):
            return
        RECEIVED = signum
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
