"""Loads the compiled extension ``spvit_kernels._C`` in one place.

If it is missing (not built, or ``SPVIT_NO_EXT=1``), a single warning says so and callers fall back to the Triton
or eager implementations.
"""
from __future__ import annotations

import os
import warnings

_C = None
_error = None
_warned = False


def load():
    """Return the extension module or None (warns once when it cannot be loaded)."""
    global _C, _error, _warned
    if _C is not None or _error is not None:
        return _C
    if os.environ.get("SPVIT_NO_EXT", "0") == "1":
        _error = "disabled by SPVIT_NO_EXT=1"
        return None
    try:
        import torch  # noqa: F401  (registers the torch libraries the extension links against)
        from . import _C as ext  # type: ignore[attr-defined]
        _C = ext
    except ImportError as exc:  # not built
        _error = str(exc)
        if not _warned:
            _warned = True
            warnings.warn(
                f"spvit_kernels._C (C++/CUDA extension) is not available ({exc}); using Triton/eager fallbacks. "
                "Reinstall with `pip install --no-build-isolation -e .` to build it.",
                RuntimeWarning, stacklevel=2,
            )
    return _C


def available() -> bool:
    return load() is not None


def error() -> str | None:
    load()
    return _error


def has_op(name: str) -> bool:
    """Whether the extension registers ``torch.ops.spvit.<name>``."""
    if load() is None:
        return False
    import torch
    return hasattr(torch.ops.spvit, name)
