"""Folded depthwise 3x3 shift-sum (docs/method.md §1.4, §10.4): C++/CUDA extension op and a Triton kernel.

``shift_sum(planes, bias, grid, relu)`` computes, for planes ``(B, P, T, d)`` (P = H*W row-major, T = 9 taps in
``reference.TAP_OFFSETS`` order or T = 1)::

    y[b, p] = act(sum_t planes[b, p + offset_t, t] + bias)      (neighbours outside the H x W grid are zero)

Providers (all with the signature of :func:`spvit_kernels.reference.shift_sum`):

* :func:`shift_sum_ext` -- ``torch.ops.spvit.shift_sum`` from the compiled extension ``spvit_kernels._C``
  (``csrc/shift_sum.cpp`` CPU kernel, ``csrc/cuda/shift_sum.cu`` CUDA kernel), with a fake (meta) kernel and an
  autograd formula backed by ``torch.ops.spvit.shift_sum_backward``;
* :func:`shift_sum_triton` -- ``torch.ops.spvit.shift_sum_triton``, a ``torch.library.triton_op`` (visible to
  ``torch.compile``) with a Triton backward.

The deployed conv layer built on the extension's shift-sum (``deploy_conv_ext``) is a provider of ``deploy_conv``
and lives in :mod:`spvit_kernels.deploy_conv`.

Backward of the shift-sum (both providers): with ``g = grad_y * (y > 0 if relu)``,
``grad_planes[b, q, t] = g[b, q - offset_t]`` (zero where that is outside the grid) and ``grad_bias = sum_{b,p} g``.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import _ext
from ._compat import HAS_TRITON, define_op, require_triton_device, wrap_triton
from .reference import TAP_OFFSETS

if HAS_TRITON:
    import triton
    import triton.language as tl


def _check(planes: torch.Tensor, bias: Optional[torch.Tensor], grid: Tuple[int, int]) -> Tuple[int, int]:
    if planes.dim() != 4:
        raise ValueError(f"shift_sum: planes must be (B, P, T, d), got {tuple(planes.shape)}")
    hh, ww = int(grid[0]), int(grid[1])
    b, p, t, d = planes.shape
    if p != hh * ww:
        raise ValueError(f"shift_sum: planes have {p} positions but the grid {hh}x{ww} has {hh * ww}")
    if t not in (1, 9):
        raise ValueError(f"shift_sum: expected 9 or 1 taps, got {t}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"shift_sum: bias must be (d,) = ({d},), got {tuple(bias.shape)}")
    if bias is not None and bias.device != planes.device:
        raise ValueError(f"shift_sum: bias is on {bias.device} but planes are on {planes.device}")
    return hh, ww


# ----------------------------------------------------------------------------------------------------------------
# C++/CUDA extension op
# ----------------------------------------------------------------------------------------------------------------

def _bias_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def shift_sum_ext(
    planes: torch.Tensor, bias: Optional[torch.Tensor], grid: Tuple[int, int], relu: bool,
) -> torch.Tensor:
    """Shift-sum (+bias, ReLU) by the extension op ``torch.ops.spvit.shift_sum`` (differentiable).

    Args:
        planes: (B, P, T, d) with P = H*W, T = 9 or 1; fp32/fp64/bf16/fp16 (reduced precision sums in fp32).
        bias: (d,) or None (cast to planes.dtype, as the reference does).
        grid: (H, W).
        relu: apply ReLU after the bias.
    Returns:
        (B, P, d) in planes.dtype.
    """
    hh, ww = _check(planes, bias, grid)
    if not _ext.has_op("shift_sum"):
        raise RuntimeError(f"spvit_kernels._C does not provide shift_sum ({_ext.error()}); build the extension")
    return torch.ops.spvit.shift_sum.default(planes, bias, hh, ww, bool(relu))


def _register_autograd(register_fwd, register_bwd, fwd, bwd) -> None:
    """Autograd of a (shift_sum, shift_sum_backward) op pair; ``register_*(backward, setup_context=...)``.

    First order: ``bwd(grad_y, y, H, W, T, relu) -> (grad_planes, grad_bias_fp32)``. The backward op is linear in
    ``grad_y`` (the ReLU mask is piecewise constant), and its adjoint is the forward shift-sum itself:
    ``d<grad_planes, A> + <grad_bias, a> / d grad_y = mask * (shift_sum(A) + a)``; so double backward also works.
    """

    def setup_fwd(ctx, inputs, output):
        planes, bias, hh, ww, relu = inputs
        ctx.save_for_backward(output)
        ctx.args = (hh, ww, planes.shape[2], relu)
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward_fwd(ctx, grad):
        (out,) = ctx.saved_tensors
        hh, ww, t, relu = ctx.args
        grad_planes, grad_bias = bwd(grad, out, hh, ww, t, relu)
        grad_bias = None if ctx.bias_dtype is None else grad_bias.to(ctx.bias_dtype)
        return grad_planes, grad_bias, None, None, None

    def setup_bwd(ctx, inputs, output):
        grad, out, hh, ww, t, relu = inputs
        ctx.save_for_backward(out)
        ctx.args = (hh, ww, t, relu)
        ctx.grad_meta = (grad.shape, grad.dtype)

    def backward_bwd(ctx, gg_planes, gg_bias):
        (out,) = ctx.saved_tensors
        hh, ww, t, relu = ctx.args
        shape, dtype = ctx.grad_meta
        if gg_planes is None:
            gg_planes = out.new_zeros(shape[0], shape[1], t, shape[2], dtype=dtype)
        gg = fwd(gg_planes, None if gg_bias is None else gg_bias.to(dtype), hh, ww, False)
        if relu:
            gg = gg * (out > 0).to(gg.dtype)
        return gg, None, None, None, None, None

    register_fwd(backward_fwd, setup_context=setup_fwd)
    register_bwd(backward_bwd, setup_context=setup_bwd)


def _register_ext_op() -> None:
    """Fake (shape) kernels and the autograd formula of the extension ops (only when the extension is loaded)."""

    @torch.library.register_fake("spvit::shift_sum")
    def _(planes, bias, H, W, relu):  # noqa: N803 - schema names
        # also reached with real tensors when one argument is a meta tensor: never return an unwritten real tensor
        if bias is not None and bias.device != planes.device:
            raise ValueError(f"spvit::shift_sum: bias is on {bias.device} but planes are on {planes.device}")
        torch._check(planes.dim() == 4, lambda: "planes must be (B, P, T, d)")
        torch._check(planes.shape[1] == H * W, lambda: "planes positions != H*W")
        torch._check(planes.shape[2] in (1, 9), lambda: "expected 9 or 1 taps")
        return planes.new_empty(planes.shape[0], planes.shape[1], planes.shape[3])

    @torch.library.register_fake("spvit::shift_sum_backward")
    def _(grad_out, out, H, W, T, relu):  # noqa: N803
        b, p, d = grad_out.shape
        return grad_out.new_empty(b, p, T, d), grad_out.new_empty(d, dtype=_bias_grad_dtype(grad_out.dtype))

    fwd = torch.ops.spvit.shift_sum.default
    bwd = torch.ops.spvit.shift_sum_backward.default
    _register_autograd(functools.partial(torch.library.register_autograd, "spvit::shift_sum"),
                       functools.partial(torch.library.register_autograd, "spvit::shift_sum_backward"), fwd, bwd)


if _ext.has_op("shift_sum"):
    _register_ext_op()


# ----------------------------------------------------------------------------------------------------------------
# Triton op
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _shift_sum_fwd_kernel(
        planes_ptr,  # (B, P, T, D) contiguous
        bias_ptr,  # (D,) (unused when HAS_BIAS is False)
        out_ptr,  # (B, P, D) contiguous
        H, W, D,
        T: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, IS_FP64: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pid_d = tl.program_id(2)
        P = H * W
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,) positions
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) channels
        p_ok = offs_p < P
        d_ok = offs_d < D
        i = offs_p // W
        j = offs_p % W
        if IS_FP64:  # fp64 accumulates in fp64 (gradcheck); everything else in fp32
            acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float64)
        else:
            acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        base = planes_ptr + b * P * T * D
        for k in tl.static_range(T):
            if T == 1:
                dy = 0
                dx = 0
            else:
                dy = k % 3 - 1
                dx = k // 3 - 1
            ii = i + dy
            jj = j + dx
            ok = p_ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
            q = ii * W + jj
            ptrs = base + (q[:, None] * T + k) * D + offs_d[None, :]
            acc += tl.load(ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(acc.dtype)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(acc.dtype)[None, :]
        if RELU:
            acc = tl.maximum(acc, 0.0)
        out_ptrs = out_ptr + (b * P + offs_p[:, None]) * D + offs_d[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _shift_sum_bwd_kernel(
        grad_ptr,  # (B, P, D) contiguous: gradient of the output
        out_ptr,  # (B, P, D) contiguous: forward output (for the ReLU mask)
        grad_planes_ptr,  # (B, P, T, D) contiguous
        partial_ptr,  # (B * cdiv(P, BLOCK_P), D) fp32 (fp64 for fp64): per-program column sums of the masked gradient
        H, W, D,
        T: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pid_d = tl.program_id(2)
        P = H * W
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,) positions q of the plane gradient
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        p_ok = offs_p < P
        d_ok = offs_d < D
        i = offs_p // W
        j = offs_p % W
        for k in tl.static_range(T):
            if T == 1:
                dy = 0
                dx = 0
            else:
                dy = k % 3 - 1
                dx = k // 3 - 1
            ii = i - dy
            jj = j - dx
            ok = p_ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
            src = (b * P + (ii * W + jj)[:, None]) * D + offs_d[None, :]
            m2 = ok[:, None] & d_ok[None, :]
            g = tl.load(grad_ptr + src, mask=m2, other=0.0)
            if RELU:
                o = tl.load(out_ptr + src, mask=m2, other=0.0).to(tl.float32)
                g = tl.where(o > 0.0, g, tl.zeros_like(g))
            dst = grad_planes_ptr + ((b * P + offs_p[:, None]) * T + k) * D + offs_d[None, :]
            tl.store(dst, g.to(grad_planes_ptr.dtype.element_ty), mask=p_ok[:, None] & d_ok[None, :])
            if k == T // 2:  # the centre tap (4 of 9, 0 of 1) read the masked gradient at the program's own positions
                row = b * tl.num_programs(0) + pid_p
                tl.store(partial_ptr + row * D + offs_d, tl.sum(g.to(partial_ptr.dtype.element_ty), axis=0), mask=d_ok)

    def _blocks(p: int, d: int) -> Tuple[int, int]:
        block_d = min(128, triton.next_power_of_2(max(d, 1)))
        block_p = max(1, min(64, triton.next_power_of_2(max(p, 1)), 4096 // block_d))
        return block_p, block_d

    def _shift_sum_triton_fwd(
        planes: torch.Tensor, bias: Optional[torch.Tensor], H: int, W: int, relu: bool,  # noqa: N803
    ) -> torch.Tensor:
        planes = planes.contiguous()
        b, p, t, d = planes.shape
        out = planes.new_empty(b, p, d)
        if out.numel() == 0:
            return out
        bias_c = planes if bias is None else bias.to(planes.dtype).contiguous()
        block_p, block_d = _blocks(p, d)
        grid = (triton.cdiv(p, block_p), b, triton.cdiv(d, block_d))
        wrap_triton(_shift_sum_fwd_kernel)[grid](
            planes, bias_c, out, H, W, d, T=t, HAS_BIAS=bias is not None, RELU=relu,
            IS_FP64=planes.dtype == torch.float64, BLOCK_P=block_p, BLOCK_D=block_d,
        )
        return out

    def _shift_sum_triton_fake(planes, bias, H, W, relu):  # noqa: N803
        return planes.new_empty(planes.shape[0], planes.shape[1], planes.shape[3])

    def _shift_sum_triton_bwd(
        grad: torch.Tensor, out: torch.Tensor, H: int, W: int, T: int, relu: bool,  # noqa: N803
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        grad = grad.contiguous()
        out = out.contiguous()
        b, p, d = grad.shape
        grad_planes = grad.new_empty(b, p, T, d)
        block_p, block_d = _blocks(p, d)
        n_p = triton.cdiv(p, block_p)
        partial = grad.new_zeros(b * n_p, d, dtype=_bias_grad_dtype(grad.dtype))
        if grad_planes.numel() == 0:
            return grad_planes, partial.sum(0)
        grid = (n_p, b, triton.cdiv(d, block_d))
        wrap_triton(_shift_sum_bwd_kernel)[grid](
            grad, out, grad_planes, partial, H, W, d, T=T, RELU=relu, BLOCK_P=block_p, BLOCK_D=block_d,
        )
        return grad_planes, partial.sum(0)

    def _shift_sum_triton_bwd_fake(grad, out, H, W, T, relu):  # noqa: N803
        b, p, d = grad.shape
        return grad.new_empty(b, p, T, d), grad.new_empty(d, dtype=_bias_grad_dtype(grad.dtype))

    # The Triton provider of the shift-sum: ``spvit::shift_sum_triton`` (the extension registers ``spvit::shift_sum``).
    shift_sum_triton_op = define_op("shift_sum_triton", _shift_sum_triton_fwd, _shift_sum_triton_fake)
    shift_sum_triton_backward_op = define_op("shift_sum_triton_backward", _shift_sum_triton_bwd,
                                             _shift_sum_triton_bwd_fake)
    _register_autograd(shift_sum_triton_op.register_autograd, shift_sum_triton_backward_op.register_autograd,
                       shift_sum_triton_op, shift_sum_triton_backward_op)


def shift_sum_triton(
    planes: torch.Tensor, bias: Optional[torch.Tensor], grid: Tuple[int, int], relu: bool,
) -> torch.Tensor:
    """Shift-sum (+bias, ReLU) by the Triton op ``torch.ops.spvit.shift_sum_triton`` (differentiable).

    Args/returns as :func:`shift_sum_ext`. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    hh, ww = _check(planes, bias, grid)
    require_triton_device("shift_sum_triton", planes.device)
    return shift_sum_triton_op(planes, bias, hh, ww, bool(relu))


__all__ = ["shift_sum_ext", "shift_sum_triton", "TAP_OFFSETS"]
