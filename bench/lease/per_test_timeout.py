"""A per-test time limit for the lease check's pytest steps where pytest-timeout is not installed.

Loaded with ``-p bench.lease.per_test_timeout``; the limit is ``LEASE_TEST_TIMEOUT`` seconds (unset or 0: none). A test
that runs past it gets the stacks of all its threads written to the process's stderr, and its process ends with exit
status 1. faulthandler's watchdog thread does this, so it also ends a test stuck inside C code (a CUDA call, a
compiler), which a Python-level alarm could not interrupt. Without pytest-xdist the run stops there and the ``-v``
log's last line names the test; under pytest-xdist only that worker ends: the log says which test it was running, a
new worker takes its place and the other tests go on.

The dump goes to the stderr the process had when this module was imported, before pytest captures output, so it lands
in the step's log rather than in a capture buffer.
"""
from __future__ import annotations

import faulthandler
import os

import pytest

_STDERR_FD = os.dup(2)  # the real stderr: pytest's fd capture replaces fd 2 later


def limit_s() -> float:
    """``LEASE_TEST_TIMEOUT`` as seconds; 0 when unset. A value that is not a number is an error, named."""
    value = os.environ.get("LEASE_TEST_TIMEOUT", "").strip()
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        raise pytest.UsageError(f"LEASE_TEST_TIMEOUT must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise pytest.UsageError(f"LEASE_TEST_TIMEOUT must not be negative, got {value!r}")
    return seconds


_LIMIT = pytest.StashKey[float]()


def pytest_configure(config):
    config.stash[_LIMIT] = limit_s()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    seconds = item.config.stash.get(_LIMIT, 0.0)
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True, file=_STDERR_FD)
    try:
        yield
    finally:
        if seconds > 0:
            faulthandler.cancel_dump_traceback_later()
