"""Signals while the ``spvit`` command imports its modules (torch, timm: seconds), before any file is written: one
line on stderr and exit 128 + the signal's number, instead of a ``KeyboardInterrupt`` traceback or a silent exit.

Imports only the standard library and :mod:`spvit.interrupts` (which records the signals ignored at start: they stay
ignored); installed by the package's ``__init__`` only when it is run as the command.
"""
import os
import signal
import sys
import threading

from .interrupts import STOP_SIGNALS as SIGNALS
from .interrupts import catchable


def _on_signal(signum, frame):
    try:
        os.write(2, f"spvit: interrupted ({signal.Signals(signum).name}) while starting; nothing was "
                    f"written\n".encode())
    finally:
        os._exit(128 + signum)


def _quiet_exit(signum, frame):
    os._exit(128 + signum)


def finished() -> None:
    """After the command's one line: a signal while the interpreter shuts down ends it without another line."""
    if threading.current_thread() is threading.main_thread():
        for sig in filter(catchable, SIGNALS):
            signal.signal(sig, _quiet_exit)


def launched_as_command() -> bool:
    """``python -m spvit`` (not ``-m spvit.<module>``) or the ``spvit`` script."""
    orig = list(getattr(sys, "orig_argv", []))
    if "-m" in orig[1:]:
        i = orig.index("-m", 1)
        return orig[i + 1:i + 2] == ["spvit"]
    first = sys.argv[0] if sys.argv else ""
    return os.path.basename(first) in ("spvit", "spvit.exe")


def install() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in filter(catchable, SIGNALS):
            signal.signal(sig, _on_signal)
