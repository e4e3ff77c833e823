"""What differs across the supported torch / triton versions, in one place.

Supported: torch 2.11 / triton 3.6 up to the newest release (tested in CI: torch 2.11 / triton 3.6 and the newest
``pip install torch``). Everything version- or mode-dependent that the op files need lives here:

* :func:`interpret` -- whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, CPU tensors);
* :func:`wrap_triton` -- ``torch.library.wrap_triton`` for compiled kernels (so ``torch.compile`` can trace the launch),
  the plain kernel under the interpreter (torch 2.11 refuses to wrap interpreted kernels);
* :func:`define_op` -- registers a Python function as the ``torch.library`` op ``spvit::<name>``: a ``triton_op``
  where its body only launches Triton kernels and runs torch ops (``torch.compile`` then traces into the kernels), an
  opaque ``custom_op`` with a fake (shape) function otherwise. A registration that fails raises;
* :func:`allow_tf32` -- whether fp32 matmuls may use TF32, read from the new ``fp32_precision`` setting when the user
  set it (reading the legacy ``allow_tf32`` then raises on torch >= 2.9) and from ``allow_tf32`` otherwise;
* :func:`autocast_dtype` / :func:`autocast_cast` -- what ``torch.autocast`` would cast a matmul's inputs to;
* :func:`tl_dot` -- one ``tl.dot`` helper for every kernel (fp32 accumulation, TF32 or exact fp32 products, and the
  fp32 upcast that the interpreter needs for bf16 operands).
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Callable, Iterable, Optional, Sequence

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None
    HAS_TRITON = False

LIB = "spvit"


def interpret() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_AUTOTUNE = {}


def autotune_enabled() -> bool:
    """Whether the autotuned kernels (``deploy_conv``, ``masked_ffn`` on CUDA) try their tile configs per new shape
    (``SPVIT_AUTOTUNE`` != ``0``, read once; default on), or launch one pinned config (fewer compilations: for
    correctness runs). :func:`set_autotune` changes it in a running process."""
    if "on" not in _AUTOTUNE:
        _AUTOTUNE["on"] = os.environ.get("SPVIT_AUTOTUNE", "1").strip() != "0"
    return _AUTOTUNE["on"]


def set_autotune(enabled: Optional[bool]) -> None:
    """Turn autotuning on or off for this process; None reads ``SPVIT_AUTOTUNE`` again."""
    _AUTOTUNE.clear()
    if enabled is not None:
        _AUTOTUNE["on"] = bool(enabled)


def autotune(configs, key):
    """``triton.autotune`` that keeps its results across processes in Triton's cache where this triton can
    (``cache_results``)."""
    import inspect

    kwargs = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, **kwargs)


def triton_can_run(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` here (CUDA, or CPU under the interpreter)."""
    return HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpret()))


def require_triton_device(op: str, device: torch.device) -> None:
    """Raise a clear error when Triton kernels cannot run on ``device``."""
    if not triton_can_run(device):
        raise RuntimeError(
            f"{op} (Triton) runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 (set before triton "
            f"is imported); got a {device.type} tensor" + ("" if HAS_TRITON else " and triton is not installed"))


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)`` for compiled kernels; the kernel itself under the interpreter."""
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None or interpret():
        return kernel
    return wrap(kernel)


def _use_triton_op() -> bool:
    return HAS_TRITON and hasattr(torch.library, "triton_op") and not interpret()


def _one_device(qualname: str, fake: Callable) -> Callable:
    """``fake`` refusing tensors on different devices.

    The fake (meta) kernel also runs on real tensors when any argument is a ``meta`` tensor; it would then return an
    unwritten tensor on the other arguments' device instead of an error.
    """
    sig = inspect.signature(fake)

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        named = [(k, v) for k, v in sig.bind(*args, **kwargs).arguments.items() if isinstance(v, torch.Tensor)]
        if len({v.device for _, v in named}) > 1:
            where = ", ".join(f"{k} on {v.device}" for k, v in named)
            raise ValueError(f"{qualname}: all tensors must be on one device, got {where}")
        return fake(*args, **kwargs)

    return checked


def define_op(name: str, fn: Callable, fake: Optional[Callable] = None, mutates_args: Sequence[str] = (),
              traceable: bool = True):
    """Register ``fn`` (schema from its type hints) as the op ``spvit::<name>`` and return the op.

    Args:
        name: op name without namespace; ``fn``'s type hints give the schema.
        fake: shape function (``register_fake``); required unless the op is a ``triton_op`` (whose body torch traces).
        mutates_args: names of the arguments ``fn`` writes in place.
        traceable: ``fn`` only launches Triton kernels through :func:`wrap_triton` and runs torch ops, so it can be a
            ``triton_op`` (compiled kernels only: the interpreter's kernels cannot be traced). Otherwise (or under the
            interpreter) it is an opaque ``custom_op`` with ``fake`` as its shape function.
    Raises:
        RuntimeError: when the registration fails (e.g. the name is already taken), naming the op.
    """
    qualname = f"{LIB}::{name}"
    try:
        if traceable and _use_triton_op():
            return torch.library.triton_op(qualname, fn, mutates_args=tuple(mutates_args))
        if fake is None:
            raise ValueError("an opaque custom op needs a fake (shape) function")
        op = torch.library.custom_op(qualname, fn, mutates_args=tuple(mutates_args))
        op.register_fake(_one_device(qualname, fake))
        return op
    except Exception as exc:  # noqa: BLE001 - re-raised with the op's name
        raise RuntimeError(f"spvit_kernels: registering the op {qualname} failed: {exc}") from exc


def allow_tf32() -> bool:
    """Whether fp32 matmuls may use TF32 here, as PyTorch's own CUDA matmuls decide it.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ('tf32' | 'ieee' | 'none' = follow the global
    ``torch.backends.fp32_precision``); once a user sets it, reading the legacy ``allow_tf32`` raises. Older torch has
    only ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    glob = getattr(torch.backends, "fp32_precision", None)
    if glob in ("tf32", "ieee"):
        return glob == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # mixed legacy / new settings: the new one decides, and it said neither tf32 nor ieee
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for :func:`tl_dot`: 'tf32' where allowed for fp32 (always for bf16/fp16), else 'ieee'."""
    return "tf32" if (dtype != torch.float32 or allow_tf32()) else "ieee"


def upcast_dot(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`tl_dot` must upcast bf16 operands to fp32: only under the interpreter, whose bf16 ``tl.dot`` is
    wrong (a bf16 x bf16 product is exact in fp32, and the GPU accumulates in fp32 too, so the result is the same)."""
    return device.type != "cuda" and dtype == torch.bfloat16


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts matmul inputs to on ``device_type`` now, or None when it is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(device_type: str, tensors: Iterable[Optional[torch.Tensor]]) -> tuple:
    """Cast floating tensors to the autocast dtype (as ``F.linear`` under autocast would); unchanged when off."""
    dt = autocast_dtype(device_type)
    if dt is None:
        return tuple(tensors)
    return tuple(t.to(dt) if (t is not None and t.is_floating_point()) else t for t in tensors)


if HAS_TRITON:

    @triton.jit
    def tl_dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """``acc + a @ b`` with fp32 accumulation; PRECISION is 'tf32' or 'ieee' (fp32 operands); UPCAST computes in
        fp32 (interpreter with bf16 operands, see :func:`upcast_dot`)."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision=PRECISION)
