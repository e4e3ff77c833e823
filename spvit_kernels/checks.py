"""Argument checks of the public op entry points (:mod:`spvit_kernels.ops`): one clear error naming the argument.

Every op checks, before any kernel runs, that each tensor argument is a tensor (``TypeError``), on the device of the
op's first tensor (``ValueError``), of a floating dtype the kernels take (``TypeError``), and of the shape the other
arguments imply (``ValueError``); and that its scalar arguments are in range (``ValueError``). Without these a kernel
given e.g. a ``meta`` bias with CPU planes returned uninitialised memory, and a bad ``center`` or an empty folded bias
ended in an internal IndexError / ZeroDivisionError.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

from .reference import BNState

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def tensor(op: str, name: str, t, device: Optional[torch.device] = None, dim: Optional[int] = None,
           shape: Optional[Sequence[Optional[int]]] = None, optional: bool = False, floating: bool = True) -> None:
    """Check one tensor argument: type, device (that of the op's first tensor), dtype, rank and sizes."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the op's first tensor is on {device}; move them to one "
                         "device")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32/float64/bfloat16/float16, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimensions, got shape {_shape(t)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {_shape(t)}")


def grid_pair(op: str, value) -> Tuple[int, int]:
    """``grid`` = (H, W), two positive integers."""
    try:
        hh, ww = value
    except (TypeError, ValueError):
        raise TypeError(f"{op}: grid must be a pair (H, W) of positive integers, got {value!r}") from None
    for v in (hh, ww):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 1:
            raise ValueError(f"{op}: grid must be a pair (H, W) of positive integers, got {value!r}")
    return int(hh), int(ww)


def integer(op: str, name: str, value, low: int, high: Optional[int] = None) -> int:
    """An integer argument in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{op}: {name} must be {bound}, got {value}")
    return int(value)


def flag(op: str, name: str, value) -> None:
    if not isinstance(value, (bool, int)) or isinstance(value, float):
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")


def approximate(op: str, value) -> None:
    if value not in ("none", "tanh"):
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {value!r}")


def _tokens(op: str, x, name: str, grid_hw: Tuple[int, int], num_prefix_tokens) -> Tuple[int, int, int]:
    tensor(op, name, x, dim=3)
    bsz, n, c = x.shape
    prefix = integer(op, "num_prefix_tokens", num_prefix_tokens, 0)
    if n != prefix + grid_hw[0] * grid_hw[1]:
        raise ValueError(f"{op}: {name} has {n} tokens but num_prefix_tokens {prefix} + grid {grid_hw[0]}x"
                         f"{grid_hw[1]} makes {prefix + grid_hw[0] * grid_hw[1]}")
    return bsz, n, c


def shift_sum(planes, bias, grid_hw, relu) -> None:
    op = "shift_sum"
    tensor(op, "planes", planes, dim=4)
    hh, ww = grid_pair(op, grid_hw)
    b, p, t, d = planes.shape
    if p != hh * ww:
        raise ValueError(f"{op}: planes have {p} positions but the grid {hh}x{ww} has {hh * ww}")
    if t not in (1, 9):
        raise ValueError(f"{op}: planes must have 9 or 1 taps (dim 2), got {t}")
    tensor(op, "bias", bias, planes.device, shape=(d,), optional=True)
    flag(op, "relu", relu)


def deploy_conv(x_hat, w_planes, b_fold, w_out, b_out, grid_hw, num_prefix_tokens=1) -> None:
    op = "deploy_conv"
    hw = grid_pair(op, grid_hw)
    _, _, c = _tokens(op, x_hat, "x_hat", hw, num_prefix_tokens)
    dev = x_hat.device
    tensor(op, "b_fold", b_fold, dev, dim=1)
    d = b_fold.shape[0]
    if d < 1:
        raise ValueError(f"{op}: b_fold must be (d,) with d >= 1 conv channels, got shape {_shape(b_fold)}")
    tensor(op, "w_planes", w_planes, dev, dim=2)
    if w_planes.shape not in ((9 * d, c), (d, c)):
        raise ValueError(f"{op}: w_planes must be (9*d, C) = ({9 * d}, {c}) or (d, C) = ({d}, {c}), got "
                         f"{_shape(w_planes)}")
    tensor(op, "w_out", w_out, dev, shape=(c, d))
    tensor(op, "b_out", b_out, dev, shape=(c,), optional=True)


def _ffn(op: str, x, w1, b1, w2, b2, approximate_: str) -> int:
    tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (..., C), got a 0-d tensor")
    c = x.shape[-1]
    dev = x.device
    tensor(op, "w1", w1, dev, dim=2)
    f = w1.shape[0]
    tensor(op, "w1", w1, dev, shape=(f, c))
    tensor(op, "b1", b1, dev, shape=(f,), optional=True)
    tensor(op, "w2", w2, dev, shape=(c, f))
    tensor(op, "b2", b2, dev, shape=(c,), optional=True)
    approximate(op, approximate_)
    return f


def pruned_ffn(x, w1, b1, w2, b2, approximate="none") -> None:
    _ffn("pruned_ffn", x, w1, b1, w2, b2, approximate)


def masked_ffn(x, w1, b1, w2, b2, mask, approximate="none") -> None:
    f = _ffn("masked_ffn", x, w1, b1, w2, b2, approximate)
    tensor("masked_ffn", "mask", mask, x.device, shape=(f,))


def _number(op: str, name: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value!r}")


def gated_attn_conv(x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1, bn3, gates, *, num_heads, alpha, grid,
                    training, num_prefix_tokens=1, center=4, compute_all=None, attn_bias=None,
                    gate_values=None) -> None:
    op = "gated_attn_conv"
    hw = grid_pair(op, grid)
    bsz, n, c = _tokens(op, x_hat, "x_hat", hw, num_prefix_tokens)
    dev = x_hat.device
    h = integer(op, "num_heads", num_heads, 1)
    tensor(op, "w_v", w_v, dev, dim=2)
    hd = w_v.shape[0]
    if hd % h:
        raise ValueError(f"{op}: w_v has {hd} rows, not a multiple of num_heads {h}")
    d = hd // h
    tensor(op, "w_v", w_v, dev, shape=(hd, c))
    tensor(op, "b_v", b_v, dev, shape=(hd,), optional=True)
    tensor(op, "w_qk", w_qk, dev, shape=(2 * hd, c))
    tensor(op, "b_qk", b_qk, dev, shape=(2 * hd,), optional=True)
    tensor(op, "w_o", w_o, dev, shape=(c, hd))
    tensor(op, "b_o", b_o, dev, shape=(c,), optional=True)
    tensor(op, "head_probs", head_probs, dev, shape=(h, 9))
    for bn_name, bn in (("bn1", bn1), ("bn3", bn3)):
        if not isinstance(bn, BNState):
            raise TypeError(f"{op}: {bn_name} must be a reference.BNState, got {type(bn).__name__}")
        for field in ("weight", "bias", "running_mean", "running_var"):
            tensor(op, f"{bn_name}.{field}", getattr(bn, field), dev, shape=(d,))
        _number(op, f"{bn_name}.eps", bn.eps, positive=True)
        _number(op, f"{bn_name}.momentum", bn.momentum)
    tensor(op, "gates", gates, dev, shape=(3,))
    _number(op, "alpha", alpha, positive=True)
    flag(op, "training", training)
    integer(op, "center", center, 0, 8)
    if compute_all is not None:
        flag(op, "compute_all", compute_all)
    if attn_bias is not None:
        tensor(op, "attn_bias", attn_bias, dev, dim=4)
        g = attn_bias.shape[0]
        if attn_bias.shape[1:] != (h, n, n) or g < 1 or bsz % g:
            raise ValueError(f"{op}: attn_bias must be (G, {h}, {n}, {n}) with G dividing the batch {bsz}, got "
                             f"{_shape(attn_bias)}")
    if gate_values is not None:
        if isinstance(gate_values, torch.Tensor) or len(gate_values) != 3:
            raise ValueError(f"{op}: gate_values must be 3 numbers on the host (the values of gates), got "
                             f"{gate_values!r}")
        for i, v in enumerate(gate_values):
            _number(op, f"gate_values[{i}]", v)


__all__ = ["FLOAT_DTYPES", "tensor", "grid_pair", "integer", "flag", "approximate", "shift_sum", "deploy_conv",
           "pruned_ffn", "masked_ffn", "gated_attn_conv"]
