"""Fused search-mode SPViT attention layer (docs/method.md §1, §2, §10): MSA, 3x3 and 1x1 from one value projection.

Same signature and semantics as :func:`spvit_kernels.reference.gated_attn_conv`. What runs where:

* GEMMs (q/k/v projection as one ``[Wqk; Wv]`` GEMM, output maps, weight gradients) use cuBLAS through
  ``F.linear`` / ``matmul``; attention uses ``F.scaled_dot_product_attention`` (flash / memory-efficient where
  available) and its own backward.
* Triton kernels handle the conv candidates, so the mixed planes ``U (B, P, 9, d)`` are never materialised:

  - ``_gated_attn_conv_fwd_kernel``: head mixing of ``u`` into the 9 taps on the fly, 3x3 shift-sum with zero
    padding and the 1x1 centre path, mixed biases, and per-program BatchNorm partial statistics (sum and centred
    sum of squares, combined with Chan's formula) for both conv candidates in one pass;
  - ``_gated_attn_conv_bn_relu_kernel``: BN + ReLU of the live conv candidate into ``r (B, N, d)`` (zero prefix
    rows, so the output map is one GEMM over all tokens);
  - ``_gated_attn_conv_bn_bwd_stats_kernel``: ReLU/BN backward reductions (``sum dz``, ``sum dz*xn``) and the
    gate inner product ``<dr, r>`` per candidate;
  - ``_gated_attn_conv_bwd_kernel``: BN backward recomputed at the 9 shifted neighbours, adjoint shift-sum and
    head un-mixing straight into ``du (B, N, h*d)``, plus the partial sums of ``dM`` and of the conv-bias
    gradient;
  - ``_gated_attn_conv_dot_kernel``: fp32 inner product ``<G, out_msa>`` for the MSA gate gradient.

* Plain torch in the op and its backward: the tiny weight-side maths (softmax over heads and its backward, mixed
  biases/output maps and their gradients, combining the per-program partial sums, gate-gradient scalars) and the
  attention backward (the attention is recomputed from the saved q, k, v and differentiated by SDPA's own backward:
  one extra attention forward, a few percent of the layer's FLOPs at ViT token counts).

Gates are exactly 0/1, so exactly one candidate (or none: skip) has coefficient 1. The forward reads the three
gate values on the host (one device sync, as the official code does), produces only the live candidate's
``(B, N, C)`` output and keeps what the gate gradients need: ``out_msa`` for ``S_m`` and the pre-BN responses
``y1, y3 (B, P, d)`` of the conv candidates for ``S_1, S_3`` (``S = <G_patch R, r> + <sum G_patch, bo> +
<G_prefix, x_prefix>``, §10.2). Only the live candidate is back-propagated; the parameters of computed candidates
whose coefficient is 0 get exact zero gradients, and parameters of candidates that were not computed get None
(as in the eager reference).

The value projection ``u = x Wv^T`` is computed once without bias (in one GEMM with q and k when MSA runs) and
shared: the conv path adds its mixed bias like the reference, and MSA folds ``bv`` into its output bias
(attention rows sum to 1, so ``attn (u + bv) Wo^T + bo = attn u Wo^T + (bo + Wo bv)``, exactly).

Windowed attention (Swin, docs/method.md §7.2): the batch rows are windows (B = images x windows, ``grid`` the
window, no prefix token, so the conv candidates' zero padding falls at the window border), and ``attn_bias``
(G, h, N, N) adds to the MSA logits, row b using ``attn_bias[b % G]`` (G = 1: the relative position bias; G = windows
per image: bias plus shift mask). The G consecutive rows that share the bias groups are folded into the head axis
(a (B/G, G*h, N, d) copy of q, k, v for G > 1), so that SDPA sees a 4-D attention with one (1, G*h, N, N) mask
broadcast over B/G; the backward recomputes it the same way and SDPA's backward returns the bias gradient summed over
the rows of each group. The bias is cast to the compute dtype like the logits (before the op, differentiably, so an
fp32 bias gets an fp32 gradient); the convs never see it.

The layer is the functional ``torch.library`` op ``spvit::gated_attn_conv`` (fake shapes, autograd registered,
``opcheck`` in the tests): it returns the layer output plus the tensors its backward needs, and the new BatchNorm
batch statistics, from which :func:`gated_attn_conv` updates the running statistics (so the op mutates nothing). Its
backward's Triton launches are ops as well (``spvit::gated_attn_conv_bn_bwd_stats``, ``..._conv_bwd``, ``..._dot``),
so AOT autograd / ``torch.compile`` can trace the backward. ``attn_bias`` is the op's last argument (optional, after
the static ones), so that calls without it keep the schema of the plain layer. The host read of the gates (in the
Python function, before the op) is a graph break. Under ``torch.autocast`` the activations and projection weights
are cast to the autocast dtype first (as ``F.linear`` would); the op itself runs with autocast off.

Limitations: no double backward.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._compat import autocast_cast, define_op, require_triton_device, wrap_triton
from .reference import CENTER_TAP, BNState, check_attn_bias

_TILE_ELEMS = 4096  # elements of a (BLOCK_P, BLOCK_H, BLOCK_D) register tile; 8192 spilled up to 2.3 KB/thread
# in the 3x3 path at sm_90 (ptxas, bench/results/triton_compile_*): 4096 leaves 10 of 127 configs spilling <= 0.5 KB
_ROW_ELEMS = 4096  # elements of a (BLOCK_P, BLOCK_D) tile in the elementwise kernels


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _gated_attn_conv_fwd_kernel(
    u_ptr,  # (B, N, h*d) value projection without bias x Wv^T; strides (stride_ub, stride_un, 1)
    m_ptr,  # (h, 9) fp32 head mixing M
    c_ptr,  # (2, d) fp32 conv biases: row 0 the 3x3's sum_k c_k, row 1 the 1x1's c_center
    y3_ptr,  # (B, P, d) fp32 out: pre-BN 3x3 response
    y1_ptr,  # (B, P, d) fp32 out: pre-BN 1x1 response
    st3_ptr,  # (B * n_pblocks, 2, d) fp32 out: per program [sum, centred sum of squares] of y3
    st1_ptr,  # (B * n_pblocks, 2, d) fp32 out: same for y1
    stride_ub, stride_un, P, GH, GW, H, D, PREFIX, CENTER,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    DO3: tl.constexpr, DO1: tl.constexpr, STATS: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid = pid_b * tl.num_programs(0) + pid_p
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_p < P
    pi = offs_p // GW
    pj = offs_p % GW
    mask_h = offs_h < H
    mask_d = offs_d < D
    hd = offs_h[:, None] * D + offs_d[None, :]
    mask_hd = mask_h[:, None] & mask_d[None, :]
    u_base = u_ptr + pid_b.to(tl.int64) * stride_ub
    rows_c = PREFIX + offs_p
    tile_c = tl.load(u_base + rows_c[:, None, None] * stride_un + hd[None, :, :],
                     mask=valid[:, None, None] & mask_hd[None, :, :], other=0.0).to(tl.float32)
    y_off = (pid_b.to(tl.int64) * P + offs_p)[:, None] * D + offs_d[None, :]
    mask_pd = valid[:, None] & mask_d[None, :]
    cnt = tl.sum(valid.to(tl.float32), axis=0)
    if DO3:
        bias3 = tl.load(c_ptr + offs_d, mask=mask_d, other=0.0)
        acc3 = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32) + bias3[None, :]
        for k in tl.static_range(9):
            m_k = tl.load(m_ptr + offs_h * 9 + k, mask=mask_h, other=0.0)
            if k == 4:
                acc3 += tl.sum(tile_c * m_k[None, :, None], axis=1)
            else:
                ni = pi + (k % 3 - 1)
                nj = pj + (k // 3 - 1)
                inside = valid & (ni >= 0) & (ni < GH) & (nj >= 0) & (nj < GW)
                rows = PREFIX + ni * GW + nj
                # zero padding: a neighbour off the grid loads 0
                tile = tl.load(u_base + rows[:, None, None] * stride_un + hd[None, :, :],
                               mask=inside[:, None, None] & mask_hd[None, :, :], other=0.0).to(tl.float32)
                acc3 += tl.sum(tile * m_k[None, :, None], axis=1)
        tl.store(y3_ptr + y_off, acc3, mask=mask_pd)
        if STATS:
            s3 = tl.sum(tl.where(mask_pd, acc3, 0.0), axis=0)
            dev3 = tl.where(mask_pd, acc3 - (s3 / cnt)[None, :], 0.0)
            tl.store(st3_ptr + pid * 2 * D + offs_d, s3, mask=mask_d)
            tl.store(st3_ptr + pid * 2 * D + D + offs_d, tl.sum(dev3 * dev3, axis=0), mask=mask_d)
    if DO1:
        m_c = tl.load(m_ptr + offs_h * 9 + CENTER, mask=mask_h, other=0.0)
        bias1 = tl.load(c_ptr + D + offs_d, mask=mask_d, other=0.0)
        acc1 = tl.sum(tile_c * m_c[None, :, None], axis=1) + bias1[None, :]
        tl.store(y1_ptr + y_off, acc1, mask=mask_pd)
        if STATS:
            s1 = tl.sum(tl.where(mask_pd, acc1, 0.0), axis=0)
            dev1 = tl.where(mask_pd, acc1 - (s1 / cnt)[None, :], 0.0)
            tl.store(st1_ptr + pid * 2 * D + offs_d, s1, mask=mask_d)
            tl.store(st1_ptr + pid * 2 * D + D + offs_d, tl.sum(dev1 * dev1, axis=0), mask=mask_d)


@triton.jit
def _gated_attn_conv_bn_relu_kernel(
    y_ptr,  # (B, P, d) fp32 pre-BN response
    chan_ptr,  # (>=4, d) fp32 per-channel rows [mean, rstd, gamma, beta]
    r_ptr,  # (B, N, d) out (input dtype): ReLU(BN(y)) at patch rows PREFIX.., prefix rows untouched
    P, N, D, PREFIX,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_p < P)[:, None] & mask_d[None, :]
    mean = tl.load(chan_ptr + offs_d, mask=mask_d, other=0.0)
    rstd = tl.load(chan_ptr + D + offs_d, mask=mask_d, other=0.0)
    gamma = tl.load(chan_ptr + 2 * D + offs_d, mask=mask_d, other=0.0)
    beta = tl.load(chan_ptr + 3 * D + offs_d, mask=mask_d, other=0.0)
    y = tl.load(y_ptr + (pid_b * P + offs_p)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    z = (y - mean[None, :]) * rstd[None, :] * gamma[None, :] + beta[None, :]
    r = tl.maximum(z, 0.0)
    tl.store(r_ptr + (pid_b * N + PREFIX + offs_p)[:, None] * D + offs_d[None, :],
             r.to(r_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_attn_conv_bn_bwd_stats_kernel(
    dr_ptr,  # (B, N, d) gradient w.r.t. r (= G R); strides (stride_rb, stride_rn, 1)
    y_ptr,  # (B, P, d) fp32 pre-BN response
    chan_ptr,  # (>=4, d) fp32 per-channel rows [mean, rstd, gamma, beta]
    part_ptr,  # (B * n_pblocks, 3, d) fp32 out: per program [sum dz, sum dz*xn, sum dr*r]
    stride_rb, stride_rn, P, D, PREFIX,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid = pid_b * tl.num_programs(0) + pid_p
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_p < P)[:, None] & mask_d[None, :]
    mean = tl.load(chan_ptr + offs_d, mask=mask_d, other=0.0)
    rstd = tl.load(chan_ptr + D + offs_d, mask=mask_d, other=0.0)
    gamma = tl.load(chan_ptr + 2 * D + offs_d, mask=mask_d, other=0.0)
    beta = tl.load(chan_ptr + 3 * D + offs_d, mask=mask_d, other=0.0)
    y = tl.load(y_ptr + (pid_b.to(tl.int64) * P + offs_p)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    dr = tl.load(dr_ptr + pid_b.to(tl.int64) * stride_rb + (PREFIX + offs_p)[:, None] * stride_rn + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    xn = (y - mean[None, :]) * rstd[None, :]
    z = xn * gamma[None, :] + beta[None, :]
    dz = tl.where(mask & (z > 0), dr, 0.0)
    r = tl.where(mask, tl.maximum(z, 0.0), 0.0)
    base = part_ptr + pid * 3 * D
    tl.store(base + offs_d, tl.sum(dz, axis=0), mask=mask_d)
    tl.store(base + D + offs_d, tl.sum(dz * xn, axis=0), mask=mask_d)
    tl.store(base + 2 * D + offs_d, tl.sum(dr * r, axis=0), mask=mask_d)


@triton.jit
def _gated_attn_conv_dy_tile(dr_base, y_base, q, inside, offs_d, mask_d, mean, rstd, gamma, beta, a, b, cst,
                             stride_rn, D, PREFIX):
    """dL/dy at positions q (BLOCK_P,) of one image: ReLU + BN backward, zero where ``inside`` is False."""
    m2 = inside[:, None] & mask_d[None, :]
    y = tl.load(y_base + q[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
    dr = tl.load(dr_base + (PREFIX + q)[:, None] * stride_rn + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    xn = (y - mean[None, :]) * rstd[None, :]
    z = xn * gamma[None, :] + beta[None, :]
    dz = tl.where(z > 0, dr, 0.0)
    dy = a[None, :] * dz + b[None, :] * xn + cst[None, :]
    return tl.where(m2, dy, 0.0)


@triton.jit
def _gated_attn_conv_bwd_kernel(
    dr_ptr,  # (B, N, d) gradient w.r.t. r (= G R); strides (stride_rb, stride_rn, 1)
    y_ptr,  # (B, P, d) fp32 pre-BN response of the live candidate
    chan_ptr,  # (7, d) fp32 rows [mean, rstd, gamma, beta, a, b, cst]: dy = a*dz + b*xn + cst
    u_ptr,  # (B, N, h*d) value projection without bias; strides (stride_ub, stride_un, 1)
    m_ptr,  # (h, 9) fp32 head mixing M
    du_ptr,  # (B, N, h*d) out, contiguous: dL/du at patch rows (prefix rows untouched)
    dm_ptr,  # (B * n_pblocks, BLOCK_H, 9) fp32 out (zero-initialised): partial sum_p <u_g[p], dU_k[p]>
    dc_ptr,  # (B * n_pblocks, d) fp32 out: partial sum_p dy[p] (gradient of the conv bias)
    stride_rb, stride_rn, stride_ub, stride_un, N, P, GH, GW, H, D, PREFIX, CENTER,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KIND3: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid = pid_b * tl.num_programs(0) + pid_p
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_p < P
    pi = offs_p // GW
    pj = offs_p % GW
    mask_h = offs_h < H
    mask_d = offs_d < D
    hd = offs_h[:, None] * D + offs_d[None, :]
    mask_hd = mask_h[:, None] & mask_d[None, :]
    mean = tl.load(chan_ptr + offs_d, mask=mask_d, other=0.0)
    rstd = tl.load(chan_ptr + D + offs_d, mask=mask_d, other=0.0)
    gamma = tl.load(chan_ptr + 2 * D + offs_d, mask=mask_d, other=0.0)
    beta = tl.load(chan_ptr + 3 * D + offs_d, mask=mask_d, other=0.0)
    a = tl.load(chan_ptr + 4 * D + offs_d, mask=mask_d, other=0.0)
    b = tl.load(chan_ptr + 5 * D + offs_d, mask=mask_d, other=0.0)
    cst = tl.load(chan_ptr + 6 * D + offs_d, mask=mask_d, other=0.0)
    dr_base = dr_ptr + pid_b.to(tl.int64) * stride_rb
    y_base = y_ptr + pid_b.to(tl.int64) * P * D
    u_base = u_ptr + pid_b.to(tl.int64) * stride_ub
    mask3 = valid[:, None, None] & mask_hd[None, :, :]
    ut = tl.load(u_base + (PREFIX + offs_p)[:, None, None] * stride_un + hd[None, :, :],
                 mask=mask3, other=0.0).to(tl.float32)
    dy_c = _gated_attn_conv_dy_tile(dr_base, y_base, offs_p, valid, offs_d, mask_d, mean, rstd, gamma, beta,
                                    a, b, cst, stride_rn, D, PREFIX)
    tl.store(dc_ptr + pid * D + offs_d, tl.sum(dy_c, axis=0), mask=mask_d)
    dm_base = dm_ptr + pid * BLOCK_H * 9
    if KIND3:
        acc = tl.zeros((BLOCK_P, BLOCK_H, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(9):
            m_k = tl.load(m_ptr + offs_h * 9 + k, mask=mask_h, other=0.0)
            if k == 4:
                dy_k = dy_c
            else:
                # dU_k[p] = dy[p - offset_k] (adjoint of the shift); zero where that position is off the grid
                qi = pi - (k % 3 - 1)
                qj = pj - (k // 3 - 1)
                inside = valid & (qi >= 0) & (qi < GH) & (qj >= 0) & (qj < GW)
                dy_k = _gated_attn_conv_dy_tile(dr_base, y_base, qi * GW + qj, inside, offs_d, mask_d, mean, rstd,
                                                gamma, beta, a, b, cst, stride_rn, D, PREFIX)
            acc += dy_k[:, None, :] * m_k[None, :, None]
            tl.store(dm_base + offs_h * 9 + k, tl.sum(tl.sum(ut * dy_k[:, None, :], axis=2), axis=0), mask=mask_h)
    else:
        m_c = tl.load(m_ptr + offs_h * 9 + CENTER, mask=mask_h, other=0.0)
        acc = dy_c[:, None, :] * m_c[None, :, None]
        tl.store(dm_base + offs_h * 9 + CENTER, tl.sum(tl.sum(ut * dy_c[:, None, :], axis=2), axis=0),
                 mask=mask_h)
    du_off = (pid_b.to(tl.int64) * N + PREFIX + offs_p)[:, None, None] * (H * D) + hd[None, :, :]
    tl.store(du_ptr + du_off, acc.to(du_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def _gated_attn_conv_dot_kernel(
    a_ptr,  # (n,) contiguous
    b_ptr,  # (n,) contiguous
    part_ptr,  # (n_programs,) fp32 out: partial sums of a*b
    n,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(a * b, axis=0))


# ---------------------------------------------------------------------------------------------------------------
# Launchers (registered as torch.library.triton_op where available)
# ---------------------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _tile_block_p(block_h: int, block_d: int) -> int:
    return max(1, min(64, _TILE_ELEMS // (block_h * block_d)))


def _row_block_p(block_d: int) -> int:
    return max(1, min(128, _ROW_ELEMS // block_d))


def _conv_fwd(u: torch.Tensor, m: torch.Tensor, c_bias: torch.Tensor, gh: int, gw: int, prefix: int, center: int,
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
    block_h, block_d = _pow2(h), _pow2(d)
    block_p = _tile_block_p(block_h, block_d)
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


def _bn_relu(y: torch.Tensor, chan: torch.Tensor, n_tokens: int, prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """r = ReLU(BN(y)) laid out over all tokens. y: (B, P, d) fp32; chan: (>=4, d) fp32.

    Returns:
        (B, N, d) in ``dtype`` with zero prefix rows.
    """
    bsz, p, d = y.shape
    r = torch.empty((bsz, n_tokens, d), device=y.device, dtype=dtype)
    if prefix:
        r[:, :prefix].zero_()
    block_d = _pow2(d)
    block_p = _row_block_p(block_d)
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
    block_d = _pow2(d)
    block_p = _row_block_p(block_d)
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
    block_h, block_d = _pow2(h), _pow2(d)
    block_p = _tile_block_p(block_h, block_d)
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
_bn_bwd_stats = define_op("gated_attn_conv_bn_bwd_stats", _bn_bwd_stats_impl, _bn_bwd_stats_fake)
_conv_bwd = define_op("gated_attn_conv_conv_bwd", _conv_bwd_impl, _conv_bwd_fake)
_dot = define_op("gated_attn_conv_dot", _dot_impl, _dot_fake)


# ---------------------------------------------------------------------------------------------------------------
# Autograd layer
# ---------------------------------------------------------------------------------------------------------------


class _Cfg(NamedTuple):
    """The static arguments of one call (everything but tensors), as the op receives them."""

    num_heads: int
    alpha: float
    grid: Tuple[int, int]
    training: bool
    prefix: int
    center: int
    gates: Tuple[float, float, float]  # (e1, e3, em) as 0/1 floats
    coefs: Tuple[float, float, float]  # (c_msa, c_3x3, c_1x1)
    live: Tuple[bool, bool, bool]  # computed candidates (msa, 3x3, 1x1)
    eps: Tuple[float, float]  # BN eps of (bn1, bn3)
    save: bool  # a backward will follow: return the tensors it needs

    @staticmethod
    def of(num_heads, alpha, grid_h, grid_w, training, prefix, center, gate_values, live, bn_eps, save) -> "_Cfg":
        e1, e3, em = (float(v) for v in gate_values)
        coefs = (em, e3 * (1 - em), e1 * (1 - e3) * (1 - em))
        return _Cfg(int(num_heads), float(alpha), (int(grid_h), int(grid_w)), bool(training), int(prefix), int(center),
                    (e1, e3, em), coefs, tuple(bool(v) for v in live), (float(bn_eps[0]), float(bn_eps[1])),
                    bool(save))


def _bn_channels(y: torch.Tensor, st: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float,
                 training: bool, block_p: int) -> torch.Tensor:
    """Per-channel (5, d) fp32 rows [mean, rstd, gamma, beta, var] of the BN that normalises ``y``.

    In training, mean/var are the batch statistics (combined from the per-program partial sums with Chan's formula;
    var is the biased one used for normalising); in eval they are the running statistics.
    """
    bsz, p, d = y.shape
    dev = y.device
    if training:
        n = bsz * p
        if n < 2:
            raise ValueError(f"gated_attn_conv: BatchNorm in training needs more than 1 value per channel, got {n}")
        starts = torch.arange(0, p, block_p, device=dev)
        cnt = torch.clamp(p - starts, max=block_p).to(torch.float32).repeat(bsz)[:, None]  # (B*n_pb, 1)
        s, m2 = st[:, 0], st[:, 1]
        mean = s.sum(0) / n
        m2_tot = m2.sum(0) + (cnt * (s / cnt - mean) ** 2).sum(0)
        var = m2_tot / n
    else:
        mean = running_mean.float()
        var = running_var.float()
    rstd = torch.rsqrt(var + eps)
    gamma = weight.float() if weight is not None else torch.ones(d, device=dev)
    beta = bias.float() if bias is not None else torch.zeros(d, device=dev)
    return torch.stack([mean, rstd, gamma, beta, var])


def _update_running_stats(bn: BNState, chan: torch.Tensor, n: int) -> None:
    """``F.batch_norm``'s running-statistics update from the batch statistics in ``chan`` (rows 0 and 4)."""
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_((1 - bn.momentum) * bn.running_mean.float() + bn.momentum * chan[0])
        if bn.running_var is not None:
            bn.running_var.copy_((1 - bn.momentum) * bn.running_var.float() + bn.momentum * chan[4] * (n / (n - 1)))


def _out_map(m: torch.Tensor, w_o: torch.Tensor, cols: List[int], num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixed output map R = sum_g w_g Wo_g with w_g = sum_{k in cols} M[g, k]. Returns R (C, d) fp32 and w (h,)."""
    c, hdim = w_o.shape
    wsum = m[:, cols].sum(1)
    r_map = torch.einsum("g,cgd->cd", wsum, w_o.float().view(c, num_heads, hdim // num_heads))
    return r_map, wsum


_MM_OUT_DTYPE_OK = [True]


def _mm_f32(a: torch.Tensor, b_f32: torch.Tensor) -> torch.Tensor:
    """fp32 result of ``a @ b`` for a (M, K) in any float dtype and b (K, N) fp32.

    Low-precision ``a`` on CUDA uses ``torch.mm(..., out_dtype=torch.float32)`` (bf16/fp16 tensor cores, fp32
    output) where this torch has it, else ``a`` is upcast.
    """
    if a.dtype != torch.float32 and a.is_cuda and _MM_OUT_DTYPE_OK[0]:
        try:
            return torch.mm(a, b_f32.to(a.dtype), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[0] = False
    return a.float() @ b_f32


def _maybe_zero(t: Optional[torch.Tensor], used: bool) -> Optional[torch.Tensor]:
    return torch.zeros_like(t) if (t is not None and used) else None



# ---------------------------------------------------------------------------------------------------------------
# The op spvit::gated_attn_conv: forward, shapes, autograd
# ---------------------------------------------------------------------------------------------------------------
# Outputs of the op, in order. Only ``out`` is the layer's result; the others are what the backward needs (empty (0,)
# tensors when not needed, decided by the static arguments so that the shapes are known without running the op):
#   out      (B, N, C)                 the layer output
#   out_msa  (B, N, C)                 the MSA candidate's output when it is computed but not the chosen one (for S_m)
#   proj     (B, N, 3hd) | (B, N, hd)  [q k v] projections (MSA computed) or v alone, without the v bias
#   r_live   (B, N, d)                 ReLU(BN(conv)) of the chosen conv candidate (zero prefix rows)
#   y3, y1   (B, P, d) fp32            pre-BN responses of the computed conv candidates
#   chan3, chan1 (5, d) fp32           [mean, rstd, gamma, beta, var] of their BNs (also returned without a backward:
#                                      the wrapper updates the running statistics from them)
#   m        (h, 9) fp32               the head mixing softmax(A / alpha)
_OUTPUTS = ("out", "out_msa", "proj", "r_live", "y3", "y1", "chan3", "chan1", "m")


def _output_specs(x: torch.Tensor, w_v: torch.Tensor, cfg: _Cfg) -> List[Tuple[Tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every output (see ``_OUTPUTS``), from the inputs' shapes and the static arguments."""
    bsz, n, c = x.shape
    hdim = w_v.shape[0]
    h = cfg.num_heads
    d = hdim // h
    p = cfg.grid[0] * cfg.grid[1]
    live_m, live_3, live_1 = cfg.live
    c_m, c_3, c_1 = cfg.coefs
    f32, dt, none = torch.float32, x.dtype, (0,)
    save = cfg.save
    conv_chosen = (live_3 and c_3 == 1) or (live_1 and c_1 == 1)
    return [
        ((bsz, n, c), dt),
        ((bsz, n, c) if save and live_m and c_m != 1 else none, dt),
        ((bsz, n, 3 * hdim if live_m else hdim) if save else none, dt),
        ((bsz, n, d) if save and conv_chosen else none, dt),
        ((bsz, p, d) if save and live_3 else none, f32),
        ((bsz, p, d) if save and live_1 else none, f32),
        ((5, d) if live_3 else none, f32),
        ((5, d) if live_1 else none, f32),
        ((h, 9) if save and (live_3 or live_1) else none, f32),
    ]


def _gated_attn_conv_fwd(
    x: torch.Tensor, w_qk: torch.Tensor, b_qk: Optional[torch.Tensor], w_v: torch.Tensor, b_v: Optional[torch.Tensor],
    w_o: torch.Tensor, b_o: Optional[torch.Tensor], head_probs: torch.Tensor,
    bn1_weight: Optional[torch.Tensor], bn1_bias: Optional[torch.Tensor], bn1_mean: Optional[torch.Tensor],
    bn1_var: Optional[torch.Tensor], bn3_weight: Optional[torch.Tensor], bn3_bias: Optional[torch.Tensor],
    bn3_mean: Optional[torch.Tensor], bn3_var: Optional[torch.Tensor], gates: torch.Tensor,
    num_heads: int, alpha: float, grid_h: int, grid_w: int, training: bool, prefix: int, center: int,
    gate_values: List[float], live: List[bool], bn_eps: List[float], save: bool,
    attn_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Body of ``spvit::gated_attn_conv`` (see :func:`gated_attn_conv` for the arguments, ``_OUTPUTS`` for the
    outputs). ``gates`` is an input only so that autograd routes its gradient; its values come as ``gate_values``.
    ``attn_bias`` (G, h, N, N), already in x's dtype, is the last argument so that the schema without it is the one
    of the plain (non-windowed) layer."""
    cfg = _Cfg.of(num_heads, alpha, grid_h, grid_w, training, prefix, center, gate_values, live, bn_eps, save)
    with torch.autocast(x.device.type, enabled=False):  # the inputs are already in the compute dtype
        return _forward(cfg, x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs,
                        (bn1_weight, bn1_bias, bn1_mean, bn1_var), (bn3_weight, bn3_bias, bn3_mean, bn3_var),
                        attn_bias)


def _attention_heads(proj: torch.Tensor, num_heads: int, groups: int) -> Tuple[torch.Tensor, ...]:
    """q, k, v of the attention from the [q k v] projections ``proj`` (B, N, 3*h*d).

    Without an attention bias (``groups`` = 0) each is a (B, h, N, d) view. With a bias of G = ``groups`` groups, the
    G consecutive batch rows that share the bias groups are folded into the head axis: (B/G, G*h, N, d) each (a copy
    for G > 1), so that the bias enters as one (1, G*h, N, N) mask broadcast over B/G (a 4-D attention: SDPA's fused
    kernels take only 4-D inputs), and its gradient comes out summed over the rows of each group.
    """
    bsz, n, three_hd = proj.shape
    d = three_hd // (3 * num_heads)
    qkv = proj.view(bsz, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
    if groups > 1:
        qkv = qkv.reshape(3, bsz // groups, groups * num_heads, n, d)
    return qkv.unbind(0)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA on the tensors of :func:`_attention_heads`; ``attn_bias`` (G, h, N, N) or None. Same shape as q."""
    if attn_bias is None:
        return F.scaled_dot_product_attention(q, k, v)
    g, h, n, _ = attn_bias.shape
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.reshape(1, g * h, n, n))


def _forward(cfg: _Cfg, x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1, bn3, attn_bias=None):
    bsz, n, c = x.shape
    h = cfg.num_heads
    hdim = w_v.shape[0]
    d = hdim // h
    gh, gw = cfg.grid
    pre = cfg.prefix
    live_m, live_3, live_1 = cfg.live
    c_m, c_3, c_1 = cfg.coefs
    specs = _output_specs(x, w_v, cfg)
    res = {name: torch.empty(shape, device=x.device, dtype=dt) for name, (shape, dt) in zip(_OUTPUTS, specs)}

    # projections: one [Wqk; Wv] GEMM when MSA is computed. The value projection u carries no bias: attention rows sum
    # to 1, so attn (u + bv) = attn u + bv and bv folds into the output bias bo + Wo bv (exact); the conv path adds
    # its mixed bias itself, as the reference does.
    if live_m:
        b_qkv = None if b_qk is None else torch.cat([b_qk, b_qk.new_zeros(hdim)])
        proj = F.linear(x, torch.cat([w_qk, w_v]), b_qkv)  # (B, N, 3*h*d)
        v = proj[..., 2 * hdim:]
    else:
        proj = F.linear(x, w_v)  # (B, N, h*d)
        v = proj
    if cfg.save:
        res["proj"] = proj

    out = None
    if live_m:
        groups = 0 if attn_bias is None else attn_bias.shape[0]
        o = _attention(*_attention_heads(proj, h, groups), attn_bias).reshape(bsz, h, n, d)
        o2 = o.transpose(1, 2).reshape(bsz, n, hdim)
        b_eff = b_o
        if b_v is not None:
            b_eff = w_o.float() @ b_v.float()
            b_eff = (b_eff if b_o is None else b_eff + b_o.float()).to(x.dtype)
        out_msa = F.linear(o2, w_o, b_eff)
        if c_m == 1:
            out = out_msa
        elif cfg.save:
            res["out_msa"] = out_msa

    if live_3 or live_1:
        m = torch.softmax(head_probs.float() / cfg.alpha, dim=0)  # (h, 9)
        if cfg.save:
            res["m"] = m
        if b_v is not None:
            c_taps = m.t() @ b_v.float().view(h, d)  # (9, d) mixed tap biases c_k
            c_bias = torch.stack([c_taps.sum(0), c_taps[cfg.center]])
        else:
            c_bias = torch.zeros(2, d, device=x.device)
        y3, y1, st3, st1 = _conv_fwd(v, m.contiguous(), c_bias, gh, gw, pre, cfg.center, live_3, live_1, cfg.training)
        block_p = _tile_block_p(_pow2(h), _pow2(d))
        for kind, is_live, coef, y, st, bn in (("3", live_3, c_3, y3, st3, bn3), ("1", live_1, c_1, y1, st1, bn1)):
            if not is_live:
                continue
            if cfg.save:
                res["y" + kind] = y
            eps = cfg.eps[1] if kind == "3" else cfg.eps[0]
            chan = _bn_channels(y, st, *bn, eps, cfg.training, block_p)
            res["chan" + kind] = chan
            if coef == 1:
                cols = list(range(9)) if kind == "3" else [cfg.center]
                r_map, _ = _out_map(m, w_o, cols, h)
                r_live = _bn_relu(y, chan, n, pre, x.dtype)
                out = F.linear(r_live, r_map.to(x.dtype), b_o)
                if pre:
                    out[:, :pre] = x[:, :pre]
                if cfg.save:
                    res["r_live"] = r_live
    res["out"] = out if out is not None else torch.zeros_like(x)  # skip: no candidate has coefficient 1
    return tuple(res[name] for name in _OUTPUTS)


def _gated_attn_conv_fake(x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1_weight, bn1_bias, bn1_mean, bn1_var,
                          bn3_weight, bn3_bias, bn3_mean, bn3_var, gates, num_heads, alpha, grid_h, grid_w, training,
                          prefix, center, gate_values, live, bn_eps, save, attn_bias=None):
    cfg = _Cfg.of(num_heads, alpha, grid_h, grid_w, training, prefix, center, gate_values, live, bn_eps, save)
    return tuple(x.new_empty(shape, dtype=dt) for shape, dt in _output_specs(x, w_v, cfg))


# Opaque to torch.compile (one graph node): the body reads nothing from the device, but it mixes cuBLAS, SDPA and
# several Triton launches with host-side choices that a trace would only have to repeat.
gated_attn_conv_op = define_op("gated_attn_conv", _gated_attn_conv_fwd, _gated_attn_conv_fake, traceable=False)

_N_TENSOR_INPUTS = 17  # x ... gates: the tensor arguments of the op before the static ones (attn_bias comes last)
_N_STATIC = 11  # num_heads ... save


def _setup_context(ctx, inputs, output):
    (x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1_weight, bn1_bias, _, _, bn3_weight, bn3_bias, _, _, gates,
     num_heads, alpha, grid_h, grid_w, training, prefix, center, gate_values, live, bn_eps, save) = inputs[:28]
    attn_bias = inputs[28] if len(inputs) > 28 else None
    cfg = _Cfg.of(num_heads, alpha, grid_h, grid_w, training, prefix, center, gate_values, live, bn_eps, save)
    if not cfg.save:
        raise RuntimeError("spvit::gated_attn_conv ran with save=False but a backward is needed")
    ctx.cfg = cfg
    ctx.save_for_backward(x, w_qk, w_v, w_o, b_o, b_v, attn_bias, *output)
    ctx.meta = {
        "b_qk": None if b_qk is None else (b_qk.shape, b_qk.dtype),
        "gates": gates.dtype, "head": head_probs.dtype,
        "bn": [None if t is None else (t.shape, t.dtype) for t in (bn1_weight, bn1_bias, bn3_weight, bn3_bias)],
    }


def _backward(ctx, grad_out, *_unused_output_grads):
    with torch.autocast(grad_out.device.type, enabled=False):  # fp32 reductions stay fp32 under an outer autocast
        return _backward_impl(ctx, grad_out)


def _zeros(meta, dev) -> Optional[torch.Tensor]:
    return None if meta is None else torch.zeros(meta[0], device=dev, dtype=meta[1])


def _backward_impl(ctx, grad_out):
    cfg = ctx.cfg
    x, w_qk, w_v, w_o, b_o, b_v, attn_bias, out, out_msa, proj, r_live, y3, y1, chan3, chan1, m = ctx.saved_tensors
    bsz, n, c = x.shape
    hdim = w_v.shape[0]
    h = cfg.num_heads
    d = hdim // h
    gh, gw = cfg.grid
    pre = cfg.prefix
    live_m, live_3, live_1 = cfg.live
    c_m, c_3, c_1 = cfg.coefs
    e1, e3, em = cfg.gates
    need_gate = ctx.needs_input_grad[16]
    need_bias = attn_bias is not None and len(ctx.needs_input_grad) > 28 and ctx.needs_input_grad[28]
    dev = x.device
    g = grad_out.contiguous() if grad_out is not None else torch.zeros_like(x)
    g2 = g.view(bsz * n, c)
    x2 = x.view(bsz * n, c)
    v = proj[..., 2 * hdim:] if live_m else proj

    zero = torch.zeros((), device=dev, dtype=torch.float32)
    s_m, s_3, s_1 = zero, zero, zero
    dx = torch.zeros_like(x)
    dw_qk = _maybe_zero(w_qk, live_m)
    db_qk = _zeros(ctx.meta["b_qk"], dev) if live_m else None
    dw_v = _maybe_zero(w_v, True)
    db_v = None if b_v is None else torch.zeros_like(b_v)
    dw_o = _maybe_zero(w_o, True)
    db_o = None if b_o is None else torch.zeros_like(b_o)
    conv_live = live_3 or live_1
    dm = torch.zeros(h, 9, device=dev, dtype=torch.float32) if conv_live else None
    bn_meta = ctx.meta["bn"]
    # attention bias: exact zeros when MSA is computed but not chosen (as the reference's 0 * out_msa gives)
    d_bias = torch.zeros_like(attn_bias) if need_bias and live_m else None
    dbn = {"1x1": [_zeros(bn_meta[0], dev) if live_1 else None, _zeros(bn_meta[1], dev) if live_1 else None],
           "3x3": [_zeros(bn_meta[2], dev) if live_3 else None, _zeros(bn_meta[3], dev) if live_3 else None]}

    if conv_live or (need_gate and b_o is not None):
        gsum_patch = g[:, pre:].sum((0, 1), dtype=torch.float32)  # (C,)
    prefix_dot = zero
    if need_gate and pre:
        prefix_dot = (g[:, :pre].float() * x[:, :pre].float()).sum()

    # ---- MSA ----
    if live_m:
        if need_gate:
            s_m = _dot(g, (out if c_m == 1 else out_msa).contiguous())
        if c_m == 1:
            # attention backward: the attention is recomputed from the saved q, k, v (one extra attention forward,
            # a few % of the layer's FLOPs at ViT token counts) and differentiated by SDPA's own backward
            # (with a bias, over the grouped layout of _attention_heads; SDPA's backward sums the bias gradient over
            # the batch rows of each group)
            groups = 0 if attn_bias is None else attn_bias.shape[0]
            heads = _attention_heads(proj, h, groups)
            do = (g2 @ w_o).view(bsz, n, h, d).transpose(1, 2).reshape(heads[0].shape)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in heads]
                bias = None
                if attn_bias is not None:
                    bias = attn_bias.detach().requires_grad_(need_bias)
                    if need_bias:
                        leaves.append(bias)
                o = _attention(*leaves[:3], bias)
                grads_attn = torch.autograd.grad(o, leaves, do)
            dq, dk, dvh = (t.reshape(bsz, h, n, d) for t in grads_attn[:3])
            if need_bias:
                d_bias = grads_attn[3]
            o2 = o.detach().reshape(bsz, h, n, d).transpose(1, 2).reshape(bsz * n, hdim)
            gsum = g.sum((0, 1), dtype=torch.float32)  # (C,)
            dw_o_f = (g2.t() @ o2).float()
            if b_v is not None:  # the folded bias bo + Wo bv
                dw_o_f += gsum[:, None] * b_v.float()[None, :]
                db_v = (gsum @ w_o.float()).to(b_v.dtype)
            dw_o = dw_o_f.to(w_o.dtype)
            if b_o is not None:
                db_o = gsum.to(b_o.dtype)
            dqkv = torch.stack([dq, dk, dvh], dim=0).permute(1, 3, 0, 2, 4).reshape(bsz * n, 3 * hdim)
            dw_qkv = dqkv.t() @ x2
            dw_qk = dw_qkv[:2 * hdim].to(w_qk.dtype)
            dw_v = dw_qkv[2 * hdim:].to(w_v.dtype)
            if db_qk is not None:
                db_qk = dqkv[:, :2 * hdim].sum(0, dtype=torch.float32).to(db_qk.dtype)
            dx = (dqkv @ torch.cat([w_qk, w_v])).view(bsz, n, c)

    # ---- conv candidates ----
    if conv_live:
        kinds = [kd for kd, lv in (("3x3", live_3), ("1x1", live_1)) if lv]
        ys = {"3x3": y3, "1x1": y1}
        chans = {"3x3": chan3, "1x1": chan1}
        coef = {"3x3": c_3, "1x1": c_1}
        maps = {}
        for kind in kinds:
            cols = list(range(9)) if kind == "3x3" else [cfg.center]
            maps[kind] = (cols,) + _out_map(m, w_o, cols, h)
        # dr for every computed conv candidate with one GEMM: G (B, N, C) @ [R_a | R_b] (C, k*d)
        r_cat = torch.cat([maps[kind][1] for kind in kinds], dim=1)
        dr_all = _mm_f32(g2, r_cat).view(bsz, n, len(kinds) * d)  # fp32: it feeds the gate inner products
        for i, kind in enumerate(kinds):
            cols, r_map, wsum = maps[kind]
            dr = dr_all[..., i * d:(i + 1) * d]
            chan = chans[kind][:4].contiguous()
            y = ys[kind]
            sums = _bn_bwd_stats(dr, y, chan, pre)  # (3, d): sum dz, sum dz*xn, sum dr*r
            s_conv = sums[2].sum() + prefix_dot
            if b_o is not None:
                s_conv = s_conv + gsum_patch @ b_o.float()
            if kind == "3x3":
                s_3 = s_conv
            else:
                s_1 = s_conv
            if coef[kind] != 1:
                continue
            # output map and bias
            d_rmap = _mm_f32(g2.t(), r_live.view(bsz * n, d).float())  # (C, d) fp32: feeds dM and dWo
            dw_o = (wsum[None, :, None] * d_rmap[:, None, :]).reshape(c, hdim).to(w_o.dtype)
            dm[:, cols] += torch.einsum("cgd,cd->g", w_o.float().view(c, h, d), d_rmap)[:, None]
            if b_o is not None:
                db_o = gsum_patch.to(b_o.dtype)
            # BN affine and the coefficients of dy = a*dz + b*xn + cst
            sum_dz, sum_dzxn = sums[0], sums[1]
            mean, rstd, gamma = chan[0], chan[1], chan[2]
            w_meta, b_meta = (bn_meta[2], bn_meta[3]) if kind == "3x3" else (bn_meta[0], bn_meta[1])
            if w_meta is not None:
                dbn[kind][0] = sum_dzxn.to(w_meta[1])
            if b_meta is not None:
                dbn[kind][1] = sum_dz.to(b_meta[1])
            a = gamma * rstd
            if cfg.training:
                npos = bsz * gh * gw
                b_coef = -a * sum_dzxn / npos
                cst = -a * sum_dz / npos
            else:
                b_coef = torch.zeros_like(a)
                cst = torch.zeros_like(a)
            chan7 = torch.cat([chan, torch.stack([a, b_coef, cst])]).contiguous()
            dv, dm_v, dc = _conv_bwd(dr, y, chan7, v, m.contiguous(), gh, gw, pre, cfg.center, kind == "3x3")
            dm += dm_v
            dv2 = dv.view(bsz * n, hdim)
            dw_v = (dv2.t() @ x2).to(w_v.dtype)
            dx = (dv2 @ w_v).view(bsz, n, c)
            if pre:
                dx[:, :pre] += g[:, :pre]
            if b_v is not None:  # conv bias sum_g w_g bv_g
                db_v = (wsum[:, None] * dc[None, :]).reshape(hdim).to(b_v.dtype)
                dm[:, cols] += (b_v.float().view(h, d) @ dc)[:, None]

    d_head = None
    if dm is not None:
        d_head = (m * (dm - (m * dm).sum(0, keepdim=True)) / cfg.alpha).to(ctx.meta["head"])

    d_gates = None
    if need_gate:
        de_m = s_m - e3 * s_3 - e1 * (1 - e3) * s_1
        de_3 = (1 - em) * (s_3 - e1 * s_1)
        de_1 = (1 - e3) * (1 - em) * s_1
        d_gates = torch.stack([de_1, de_3, de_m]).to(ctx.meta["gates"])

    grads = (dx, dw_qk, db_qk, dw_v, db_v, dw_o, db_o, d_head, dbn["1x1"][0], dbn["1x1"][1], None, None,
             dbn["3x3"][0], dbn["3x3"][1], None, None, d_gates)
    grads = grads + (None,) * _N_STATIC + (d_bias,)  # the static arguments, then attn_bias
    return grads[:len(ctx.needs_input_grad)]


gated_attn_conv_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------


def _check(name: str, t: Optional[torch.Tensor], shape: Tuple[int, ...], dtype: Optional[torch.dtype] = None,
           device: Optional[torch.device] = None):
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"gated_attn_conv: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"gated_attn_conv: {name} has dtype {t.dtype}, expected {dtype} (the dtype of x_hat)")
    if device is not None and t.device != device:
        raise ValueError(f"gated_attn_conv: {name} is on {t.device}, expected {device} (the device of x_hat)")


def gated_attn_conv(
    x_hat: torch.Tensor,
    w_qk: torch.Tensor, b_qk: Optional[torch.Tensor],
    w_v: torch.Tensor, b_v: Optional[torch.Tensor],
    w_o: torch.Tensor, b_o: Optional[torch.Tensor],
    head_probs: torch.Tensor, bn1: BNState, bn3: BNState, gates: torch.Tensor, *,
    num_heads: int, alpha: float, grid: Tuple[int, int], training: bool,
    num_prefix_tokens: int = 1, center: int = CENTER_TAP, compute_all: Optional[bool] = None,
    attn_bias: Optional[torch.Tensor] = None, gate_values: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """Search-mode single-path attention layer, fused (see the module docstring).

    Args:
        x_hat: (B, N, C) normalised block input, N = num_prefix_tokens + H*W.
        w_qk: (2*h*d, C), b_qk: (2*h*d,) | None: query and key projections (queries first).
        w_v: (h*d, C), b_v: (h*d,) | None: value projection, shared by all candidates.
        w_o: (C, h*d), b_o: (C,) | None: output projection, shared by all candidates.
        head_probs: (h, 9) head-mixing logits A.
        bn1, bn3: BatchNorms (d channels) of the 1x1 and the 3x3 candidate (running statistics updated in place in
            training, like ``F.batch_norm``).
        gates: (3,) cumulative gates (e1, e3, em), exactly 0/1 values (may carry straight-through gradients).
        num_heads: h; alpha: head-mixing temperature; grid: (H, W); training: BN batch statistics when True.
        num_prefix_tokens: tokens before the patch grid (passed through by the conv candidates); 0 for Swin.
        center: column of M used by the 1x1 candidate (4 in DeiT tap order; a Swin layer permutes its Swin-order
            head_probs columns to DeiT order and passes 4).
        compute_all: evaluate every candidate even when its coefficient is 0. Default: in training or when
            ``gates`` needs a gradient.
        attn_bias: optional (G, h, N, N) floating-point additive logits of the MSA candidate, G dividing B, row b
            using ``attn_bias[b % G]`` (windowed attention: relative position bias, plus the shift mask of window
            b % G). Cast to the attention's dtype; it may require grad (its gradient is summed over the rows of each
            group; exact zeros when MSA is computed with coefficient 0, None when MSA is not computed).
        gate_values: the values of ``gates`` already on the host (3 floats), when the caller has them (e.g. read for
            all layers at once): then ``gates`` is not read back here (no host synchronisation). They must equal
            ``gates``.
    Returns:
        (B, N, C): em*out_msa + e3(1-em)*out_3x3 + e1(1-e3)(1-em)*out_1x1. Under ``torch.autocast`` the activations and
        projection weights are first cast to the autocast dtype (as ``F.linear`` would) and the output has that
        dtype; head mixing, BatchNorm and the gate gradients stay in fp32.
    Raises:
        ValueError: on wrong shapes/dtypes/devices (attn_bias: shape, groups not dividing B, device) or gates that are
            not exactly 0/1.
        TypeError: on activations other than fp32/bf16/fp16, or an attn_bias that is not floating point.
    """
    if x_hat.dim() != 3:
        raise ValueError(f"gated_attn_conv: x_hat must be (B, N, C), got shape {tuple(x_hat.shape)}")
    require_triton_device("gated_attn_conv", x_hat.device)
    x_in = x_hat
    x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o = autocast_cast(x_hat.device.type, (x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o))
    bsz, n, c = x_hat.shape
    h = int(num_heads)
    gh, gw = int(grid[0]), int(grid[1])
    pre = int(num_prefix_tokens)
    if n != pre + gh * gw:
        raise ValueError(f"gated_attn_conv: {n} tokens but num_prefix_tokens + H*W = {pre} + {gh}*{gw}")
    if w_v.dim() != 2 or w_v.shape[0] % h:
        raise ValueError(f"gated_attn_conv: w_v must be (h*d, C) with h = {h}, got {tuple(w_v.shape)}")
    if x_hat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"gated_attn_conv supports fp32/bf16/fp16 activations, got {x_hat.dtype}")
    hdim = w_v.shape[0]
    d = hdim // h
    dt, dev = x_hat.dtype, x_hat.device
    _check("w_qk", w_qk, (2 * hdim, c), dt, dev)
    _check("b_qk", b_qk, (2 * hdim,), dt, dev)
    _check("w_v", w_v, (hdim, c), dt, dev)
    _check("b_v", b_v, (hdim,), dt, dev)
    _check("w_o", w_o, (c, hdim), dt, dev)
    _check("b_o", b_o, (c,), dt, dev)
    _check("head_probs", head_probs, (h, 9), device=dev)
    _check("gates", gates, (3,), device=dev)
    for name, bn in (("bn1", bn1), ("bn3", bn3)):
        for f in ("weight", "bias", "running_mean", "running_var"):
            _check(f"{name}.{f}", getattr(bn, f), (d,), device=dev)
    if not 0 <= center < 9:
        raise ValueError(f"gated_attn_conv: center must be a tap index in [0, 9), got {center}")
    if not training and any(bn.running_mean is None or bn.running_var is None for bn in (bn1, bn3)):
        raise ValueError("gated_attn_conv: eval mode needs BN running statistics")
    if attn_bias is not None:
        try:
            check_attn_bias(attn_bias, bsz, h, n)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"gated_attn_conv: {exc}") from None
        _check("attn_bias", attn_bias, attn_bias.shape, device=dev)
        # cast like the attention logits it is added to (the reference adds attn_bias.to(q.dtype)); differentiable,
        # so an fp32 bias (e.g. from an fp32 relative-position table under autocast) gets an fp32 gradient
        attn_bias = attn_bias.to(dt)

    if gate_values is None:
        vals = gates.detach().to(torch.float32).tolist()  # one host sync (the original code branches on gates)
    else:
        vals = [float(v) for v in gate_values]
        if len(vals) != 3:
            raise ValueError(f"gated_attn_conv: gate_values must be 3 values (e1, e3, em), got {len(vals)}")
    if any(val not in (0.0, 1.0) for val in vals):
        raise ValueError(f"gated_attn_conv: gates must be exactly 0/1 values, got {vals}")
    e1, e3, em = vals
    coefs = (em, e3 * (1 - em), e1 * (1 - e3) * (1 - em))
    if compute_all is None:
        compute_all = training or (gates.requires_grad and torch.is_grad_enabled())
    live = [True, True, True] if compute_all else [cf != 0 for cf in coefs]
    if not any(live):  # skip, nothing computed: zeros like the input (as the reference)
        return torch.zeros_like(x_in)

    x_hat = x_hat.contiguous()
    w_qk, w_v, w_o = w_qk.contiguous(), w_v.contiguous(), w_o.contiguous()
    tensors = (x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1.weight, bn1.bias, bn1.running_mean,
               bn1.running_var, bn3.weight, bn3.bias, bn3.running_mean, bn3.running_var, gates)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors + (attn_bias,))
    statics = (h, float(alpha), gh, gw, bool(training), pre, int(center), [e1, e3, em], live,
               [float(bn1.eps), float(bn3.eps)], save)
    if attn_bias is None:
        outs = gated_attn_conv_op(*tensors, *statics)
    else:
        outs = gated_attn_conv_op(*tensors, *statics, attn_bias.contiguous())
    if training:  # running statistics, as F.batch_norm updates them (functional op: the update happens here)
        for bn, chan, is_live in ((bn1, outs[7], live[2]), (bn3, outs[6], live[1])):
            if is_live:
                _update_running_stats(bn, chan, bsz * gh * gw)
    return outs[0]


__all__ = ["gated_attn_conv", "gated_attn_conv_op"]
