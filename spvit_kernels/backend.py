"""Per-call choice of the implementation of each op: ``triton``, ``ext`` (C++/CUDA extension) or ``eager``.

This module chooses the provider per device type; torch's dispatcher then routes inside the chosen provider (the
extension's CPU / CUDA kernels, autograd, fake tensors) and is the override: a kernel registered for ``spvit::<op>``
and a device type (``torch.library.register_kernel``) replaces what that provider runs there. See
docs/kernel-design.md.

Selection, in order:
1. ``with use_backend("eager"): ...`` (a context manager, thread-local) if active;
2. the environment variable ``SPVIT_BACKEND`` = ``auto`` (default) | ``triton`` | ``ext`` | ``eager``;
3. ``auto``: on CUDA tensors the Triton kernel if the op has one (else the extension, else eager);
   on CPU tensors the extension if the op has a CPU kernel there, else eager.

The environment (``SPVIT_BACKEND``, ``TRITON_INTERPRET``) is read once, on the first call, and each (op, device type,
backend) choice is resolved once and cached, so that an op call costs a dictionary look-up. After changing
``SPVIT_BACKEND`` in a running process, call :func:`refresh` to read it again.

Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (set before triton is imported); otherwise a
clear error is raised. Forcing a backend that an op does not have falls back to ``eager`` for that op only.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _ext, decompositions, reference

BACKENDS = ("auto", "triton", "ext", "eager")

# op name -> backend -> "module:function" (imported lazily; a missing module means "not available").
# Every provider has exactly the signature of the reference function of the same name.
_PROVIDERS: Dict[str, Dict[str, str]] = {
    "gated_attn_conv": {"triton": "spvit_kernels.gated_attn_conv:gated_attn_conv"},
    "masked_ffn": {"triton": "spvit_kernels.masked_ffn:masked_ffn"},
    "pruned_ffn": {"triton": "spvit_kernels.pruned_ffn:pruned_ffn"},
    "shift_sum": {"ext": "spvit_kernels.shift_sum:shift_sum_ext",
                  "triton": "spvit_kernels.shift_sum:shift_sum_triton"},
    "deploy_conv": {"triton": "spvit_kernels.deploy_conv:deploy_conv",
                    "ext": "spvit_kernels.deploy_conv:deploy_conv_ext"},
}

# ops whose extension provider is built on another registered extension op
_EXT_OP = {"deploy_conv": "shift_sum"}

_local = threading.local()
_cache: Dict[str, Optional[Callable]] = {}
_env: Dict[str, str] = {}  # SPVIT_BACKEND / TRITON_INTERPRET as read by the first call (see refresh())
_resolved: Dict[Tuple[str, str, str], Callable] = {}  # (op, device type, requested backend) -> implementation


def refresh() -> None:
    """Read ``SPVIT_BACKEND`` and ``TRITON_INTERPRET`` again and forget every resolved choice.

    The environment is otherwise read once per process (on the first op call): call this after changing it.

    Raises:
        ValueError: if ``SPVIT_BACKEND`` names no backend.
    """
    _env.clear()
    _resolved.clear()
    _env_backend()


def _env_backend() -> str:
    if "backend" not in _env:
        name = os.environ.get("SPVIT_BACKEND", "auto").strip().lower() or "auto"
        if name == "cuda":
            name = "ext"
        if name not in BACKENDS:
            raise ValueError(f"SPVIT_BACKEND={name!r} is not one of {BACKENDS}")
        _env["backend"] = name
    return _env["backend"]


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (thread-local), e.g. ``with use_backend("eager"):``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    prev = getattr(_local, "name", None)
    _local.name = name
    try:
        yield
    finally:
        _local.name = prev


def requested_backend() -> str:
    """The backend asked for here: the innermost :func:`use_backend`, else ``SPVIT_BACKEND`` (read once)."""
    return getattr(_local, "name", None) or _env_backend()


def _load(spec: str) -> Optional[Callable]:
    if spec in _cache:
        return _cache[spec]
    mod_name, fn_name = spec.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError):
        fn = None
    _cache[spec] = fn
    return fn


def preload() -> None:
    """Import every provider that can be imported here, so that a later :func:`resolve` only reads the cache.

    Called when a model that dispatches per call is built (e.g. :class:`spvit.DeployedModel`): a first call that
    happens inside ``torch.compile(fullgraph=True)`` then finds no import left to trace. Also registers the ops'
    decompositions (:mod:`spvit_kernels.decompositions`) for ``torch.onnx.export(..., dynamo=True)``.
    """
    for op, providers in _PROVIDERS.items():
        for backend in providers:
            available(op, backend)
    decompositions.register()  # the ONNX exporter then lowers the ops to standard operators by itself


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, read once; see :func:`refresh`)."""
    if "interpret" not in _env:
        _env["interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return _env["interpret"] == "1"


def available(op: str, backend: str) -> bool:
    """Whether ``backend`` has an implementation of ``op`` importable here."""
    if backend == "eager":
        return True
    spec = _PROVIDERS.get(op, {}).get(backend)
    if spec is None:
        return False
    if backend == "triton" and not triton_available():
        return False
    if backend == "ext":
        if not _ext.has_op(_EXT_OP.get(op, op)):
            return False
    return _load(spec) is not None


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to use for tensors on ``device`` (resolved once per op, device type and requested
    backend, then cached)."""
    name = requested_backend()
    key = (op, device.type, name)
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _resolve(op, device, name)
    return fn


def _resolve(op: str, device: torch.device, name: str) -> Callable:
    if op not in _PROVIDERS and not hasattr(reference, op):
        raise KeyError(f"unknown op {op!r}")
    on_cuda = device.type == "cuda"
    if name == "auto":
        order = ["triton", "ext"] if on_cuda else ["ext"]
    elif name == "triton":
        if not on_cuda and not triton_interpret():
            raise RuntimeError(
                f"SPVIT_BACKEND=triton was asked for op {op!r} on a {device.type} tensor; Triton kernels run on CUDA "
                "tensors, or on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
            )
        order = ["triton"]
    elif name == "ext":
        order = ["ext"]
    else:
        order = []
    for b in order:
        if available(op, b):
            return _load(_PROVIDERS[op][b])
    return getattr(reference, op)


def backend_of(op: str, device: torch.device) -> str:
    """Name of the backend :func:`resolve` picks (for logging and benchmarks)."""
    fn = resolve(op, device)
    for b, spec in _PROVIDERS.get(op, {}).items():
        if _load(spec) is fn:
            return b
    return "eager"


def register_provider(op: str, backend: str, spec: str) -> None:
    """Add or replace a provider (``"module:function"``)."""
    _PROVIDERS.setdefault(op, {})[backend] = spec
    _cache.pop(spec, None)
    _resolved.clear()
