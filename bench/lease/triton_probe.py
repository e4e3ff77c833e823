"""Counts Triton kernel-cache hits and misses in this process (and, as a pytest plugin, in xdist workers).

Each JIT compilation looks its kernel up in the on-disk cache (``TRITON_CACHE_DIR``) by the group file of the
kernel's metadata: found is a hit (the binary is loaded, nothing is compiled), not found is a miss (the kernel is
compiled now and stored). Every lookup is appended as one JSON line to ``LEASE_TRITON_EVENTS`` (when set):
``{"pid", "kernel", "hit", "key"}``; :func:`tally` sums a file of them.

Use: ``import bench.lease.triton_probe as p; p.install()`` before the first launch, or ``pytest -p
bench.lease.triton_probe``. Without triton, or under the interpreter (nothing is compiled), it counts nothing.
"""
from __future__ import annotations

import json
import os
from typing import Dict

_INSTALLED = False


def install() -> bool:
    """Wrap the file cache manager's group lookup; returns whether the probe is active."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from triton.runtime import cache
    except ImportError:
        return False
    orig = cache.FileCacheManager.get_group

    def get_group(self, filename, _orig=orig):
        grp = _orig(self, filename)
        if filename.endswith(".json"):  # the kernel's metadata group (other lookups are launcher stubs, autotune)
            _record(filename[:-len(".json")], grp is not None and grp.get(filename) is not None, self.key)
        return grp

    cache.FileCacheManager.get_group = get_group
    _INSTALLED = True
    return True


def _record(kernel: str, hit: bool, key: str) -> None:
    path = os.environ.get("LEASE_TRITON_EVENTS")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "kernel": kernel, "hit": hit, "key": key}) + "\n")


def tally(path: str) -> Dict[str, object]:
    """``{"hits", "misses", "missed_kernels"}`` of an events file (zeros when it does not exist)."""
    hits, misses, missed = 0, 0, {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("hit"):
                    hits += 1
                else:
                    misses += 1
                    missed[ev.get("kernel", "?")] = missed.get(ev.get("kernel", "?"), 0) + 1
    return {"hits": hits, "misses": misses, "missed_kernels": dict(sorted(missed.items()))}


def pytest_configure(config):  # pytest plugin entry (``-p bench.lease.triton_probe``)
    install()
