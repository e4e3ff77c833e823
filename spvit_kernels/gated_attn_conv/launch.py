"""Launchers of the kernels of :mod:`spvit_kernels.gated_attn_conv.kernels` (block sizes, buffers, grids).

The backward's launches are the ``torch.library`` ops ``spvit::gated_attn_conv_bn_bwd_stats``,
``spvit::gated_attn_conv_conv_bwd`` and ``spvit::gated_attn_conv_dot`` (:data:`bn_bwd_stats`, :data:`conv_bwd`,
:data:`dot`), so that a traced backward (``torch.compile`` / AOT autograd) sees them.
"""
from typing import Tuple

import torch
import triton

from .._compat import define_op, wrap_triton
from .kernels import (_gated_attn_conv_bn_bwd_stats_kernel, _gated_attn_conv_bn_relu_kernel,
                      _gated_attn_conv_bwd_kernel, _gated_attn_conv_dot_kernel, _gated_attn_conv_fwd_kernel)

_TILE_ELEMS = 4096  # elements of a (BLOCK_P, BLOCK_H, BLOCK_D) register tile; 8192 spilled up to 2.3 KB/thread
# in the 3x3 path at sm_90 (ptxas, bench/results/triton_compile_*): 4096 leaves 10 of 127 configs spilling <= 0.5 KB
_ROW_ELEMS = 4096  # elements of a (BLOCK_P, BLOCK_D) tile in the elementwise kernels


def pow2(n: int) -> int:
    """The next power of two of ``n`` (at least 1): a block size covering ``n``."""
    return triton.next_power_of_2(max(int(n), 1))


def tile_block_p(block_h: int, block_d: int) -> int:
    """Positions per program of the conv kernels (a (BLOCK_P, BLOCK_H, BLOCK_D) register tile)."""
    return max(1, min(64, _TILE_ELEMS // (block_h * block_d)))


def row_block_p(block_d: int) -> int:
    """Positions per program of the elementwise kernels (a (BLOCK_P, BLOCK_D) tile)."""
    return max(1, min(128, _ROW_ELEMS // block_d))


def conv_fwd(u: torch.Tensor, m: torch.Tensor, c_bias: torch.Tensor, gh: int, gw: int, prefix: int, center: int,
             do3: bool, do1: bool, stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-BN conv responses and BN partial statistics.

    Args:
        u: (B, N, h*d) value projection without bias (last dim contiguous); m: (h, 9) fp32;
        c_bias: (2, d) fp32 conv biases [3x3, 1x1].
    Returns:
        y3, y1: (B, P, d) fp32 (empty (0,) when not asked for);
        st3, st1: (B * n_pblocks, 2, d) fp32 per-program [sum, centred sum of squares] (empty when not asked for).
    """
    bsz, _, _ = u.shape
    h = m.shape[0]
    d = c_bias.shape[1]
    p = gh * gw
    block_h, block_d = pow2(h), pow2(d)
    block_p = tile_block_p(block_h, block_d)
    n_pb = triton.cdiv(p, block_p)
    dev = u.device
    y3 = torch.empty((bsz, p, d) if do3 else (0,), device=dev, dtype=torch.float32)
    y1 = torch.empty((bsz, p, d) if do1 else (0,), device=dev, dtype=torch.float32)
    st3 = torch.empty((bsz * n_pb, 2, d) if do3 and stats else (0,), device=dev, dtype=torch.float32)
    st1 = torch.empty((bsz * n_pb, 2, d) if do1 and stats else (0,), device=dev, dtype=torch.float32)
    _gated_attn_conv_fwd_kernel[(n_pb, bsz)](
        u, m, c_bias, y3, y1, st3, st1, u.stride(0), u.stride(1), p, gh, gw, h, d, prefix, center,
        BLOCK_P=block_p, BLOCK_H=block_h, BLOCK_D=block_d, DO3=do3, DO1=do1, STATS=stats,
    )
    return y3, y1, st3, st1


def bn_relu(y: torch.Tensor, chan: torch.Tensor, n_tokens: int, prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """r = ReLU(BN(y)) laid out over all tokens. y: (B, P, d) fp32; chan: (>=4, d) fp32.

    Returns:
        (B, N, d) in ``dtype`` with zero prefix rows.
    """
    bsz, p, d = y.shape
    r = torch.empty((bsz, n_tokens, d), device=y.device, dtype=dtype)
    if prefix:
        r[:, :prefix].zero_()
    block_d = pow2(d)
    block_p = row_block_p(block_d)
    _gated_attn_conv_bn_relu_kernel[(triton.cdiv(p, block_p), bsz)](
        y, chan, r, p, n_tokens, d, prefix, BLOCK_P=block_p, BLOCK_D=block_d,
    )
    return r


def _bn_bwd_stats_impl(dr: torch.Tensor, y: torch.Tensor, chan: torch.Tensor, prefix: int) -> torch.Tensor:
    """Sums over all patch positions of (dz, dz*xn, dr*r). dr: (B, N, d) (last dim contiguous); y: (B, P, d) fp32.

    Returns:
        (3, d) fp32.
    """
    bsz, p, d = y.shape
    block_d = pow2(d)
    block_p = row_block_p(block_d)
    n_pb = triton.cdiv(p, block_p)
    part = torch.empty((bsz * n_pb, 3, d), device=y.device, dtype=torch.float32)
    wrap_triton(_gated_attn_conv_bn_bwd_stats_kernel)[(n_pb, bsz)](
        dr, y, chan, part, dr.stride(0), dr.stride(1), p, d, prefix, BLOCK_P=block_p, BLOCK_D=block_d,
    )
    return part.sum(0)


def _conv_bwd_impl(dr: torch.Tensor, y: torch.Tensor, chan: torch.Tensor, u: torch.Tensor, m: torch.Tensor, gh: int,
              gw: int, prefix: int, center: int, kind3: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conv-path backward of the live candidate down to the value projection.

    Args:
        dr: (B, N, d) dL/dr (last dim contiguous); y: (B, P, d) fp32; chan: (7, d) fp32;
        u: (B, N, h*d) value projection without bias; m: (h, 9) fp32.
    Returns:
        du: (B, N, h*d) in u's dtype (zero prefix rows); dm: (h, 9) fp32 sum_p <u_g[p], dU_k[p]>;
        dc: (d,) fp32 sum_p dy[p], the gradient of the conv bias.
    """
    bsz, n, hdim = u.shape
    h = m.shape[0]
    p, d = y.shape[1], y.shape[2]
    block_h, block_d = pow2(h), pow2(d)
    block_p = tile_block_p(block_h, block_d)
    n_pb = triton.cdiv(p, block_p)
    du = torch.empty((bsz, n, hdim), device=u.device, dtype=u.dtype)
    if prefix:
        du[:, :prefix].zero_()
    dm = torch.zeros((bsz * n_pb, block_h, 9), device=u.device, dtype=torch.float32)
    dc = torch.empty((bsz * n_pb, d), device=u.device, dtype=torch.float32)
    wrap_triton(_gated_attn_conv_bwd_kernel)[(n_pb, bsz)](
        dr, y, chan, u, m, du, dm, dc, dr.stride(0), dr.stride(1), u.stride(0), u.stride(1), n, p, gh, gw, h, d,
        prefix, center, BLOCK_P=block_p, BLOCK_H=block_h, BLOCK_D=block_d, KIND3=kind3,
    )
    return du, dm[:, :h].sum(0), dc.sum(0)


def _dot_impl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 inner product of two same-shaped contiguous tensors. Returns a 0-dim fp32 tensor."""
    n = a.numel()
    block = 4096
    grid = max(1, triton.cdiv(n, block))
    part = torch.empty((grid,), device=a.device, dtype=torch.float32)
    wrap_triton(_gated_attn_conv_dot_kernel)[(grid,)](a, b, part, n, BLOCK=block)
    return part.sum()


def _bn_bwd_stats_fake(dr, y, chan, prefix):
    return y.new_empty((3, y.shape[2]))


def _conv_bwd_fake(dr, y, chan, u, m, gh, gw, prefix, center, kind3):
    return torch.empty_like(u, memory_format=torch.contiguous_format), m.new_empty(m.shape), y.new_empty(y.shape[2])


def _dot_fake(a, b):
    return a.new_empty((), dtype=torch.float32)


# The backward's Triton launches are ops too, so that a traced backward (torch.compile / AOT autograd) sees them.
bn_bwd_stats = define_op("gated_attn_conv_bn_bwd_stats", _bn_bwd_stats_impl, _bn_bwd_stats_fake)
conv_bwd = define_op("gated_attn_conv_conv_bwd", _conv_bwd_impl, _conv_bwd_fake)
dot = define_op("gated_attn_conv_dot", _dot_impl, _dot_fake)
