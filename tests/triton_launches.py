"""pytest plugin: count the distinct Triton binaries a test run would compile on a GPU, from its launches under the
interpreter.

Usage (CPU, ``TRITON_INTERPRET=1``)::

    python -m pytest -p tests.triton_launches tests/test_deploy_conv.py ...   # prints the count at the end
    SPVIT_LAUNCHES_OUT=counts.json python -m pytest -p tests.triton_launches ...

Each launch is recorded as its kernel and specialisation, as the JIT compiles one binary per: the constexpr values,
the dtype and 16-byte alignment of each pointer, and for each integer whether it is 1 or divisible by 16 (unless the
kernel does not specialise it), plus ``num_warps`` / ``num_stages``. The interpreter runs the tile sizes of its own
path; for an autotuned kernel the tile sizes are dropped from the signature and each signature counts once per
autotune config when autotuning is on (``spvit_kernels._compat.autotune_enabled()``), once otherwise.
"""
from __future__ import annotations

import inspect
import json
import os
from collections import Counter

import pytest
import torch

# kernel name -> (its autotune configs, the tile-size constexprs the interpreter path chooses itself)
AUTOTUNED = {}


def _autotuned():
    if not AUTOTUNED:
        from spvit_kernels import deploy_conv as dc
        AUTOTUNED["_deploy_conv_fwd_kernel"] = (len(dc._deploy_conv_fwd_tuned.configs),
                                                ("BLOCK_M", "BLOCK_K", "BLOCK_N"))
        from spvit_kernels import masked_ffn as mf
        tuned = mf.AUTOTUNED_KERNELS
        for name, (n_cfg, tiles) in tuned.items():
            AUTOTUNED[name] = (n_cfg, tiles)
    return AUTOTUNED


def _autotune_on() -> bool:
    from spvit_kernels import _compat
    fn = getattr(_compat, "autotune_enabled", None)
    return True if fn is None else bool(fn())


def _spec(v, specialize: bool):
    if isinstance(v, torch.Tensor):
        return ("ptr", str(v.dtype), v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        if not specialize:
            return "i"
        return 1 if v == 1 else ("d16" if v % 16 == 0 else "i")
    if isinstance(v, float):
        return "f"
    return repr(v)


class Recorder:
    def __init__(self):
        self.sigs = Counter()  # (kernel, signature) -> binaries it stands for
        self.launches = 0

    def record(self, fn, args, kwargs):
        sig = inspect.signature(fn.fn)
        bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        no_spec = set(getattr(fn, "kwargs", {}).get("do_not_specialize", None) or ())
        name = fn.fn.__name__
        n_cfg, tiles = _autotuned().get(name, (1, ()))
        parts = []
        for pname, p in sig.parameters.items():
            if pname not in bound.arguments or pname in tiles:
                continue
            v = bound.arguments[pname]
            is_constexpr = "constexpr" in str(p.annotation)
            parts.append((pname, repr(v) if is_constexpr else _spec(v, pname not in no_spec)))
        if not tiles:
            parts.append(("num_warps", kwargs.get("num_warps", 4)))
            parts.append(("num_stages", kwargs.get("num_stages", 3)))
        key = (name, tuple(parts))
        mult = n_cfg if (tiles and _autotune_on()) else 1
        self.sigs[key] = max(self.sigs[key], mult)
        self.launches += 1

    def summary(self):
        per_kernel = Counter()
        for (name, _), mult in self.sigs.items():
            per_kernel[name] += mult
        return {"binaries": sum(per_kernel.values()), "launches": self.launches,
                "signatures": len(self.sigs), "per_kernel": dict(sorted(per_kernel.items()))}


_REC = Recorder()


def pytest_configure(config):
    from triton.runtime.interpreter import InterpretedFunction

    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            _REC.record(self, args, kwargs)
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def pytest_terminal_summary(terminalreporter):
    s = _REC.summary()
    terminalreporter.write_line(f"triton launches: {json.dumps(s)}")
    out = os.environ.get("SPVIT_LAUNCHES_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(s, f, indent=1)


@pytest.fixture
def triton_launch_recorder():
    return _REC
