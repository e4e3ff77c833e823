"""Triton kernels of the fused search-mode attention layer (:mod:`spvit_kernels.gated_attn_conv`).

Notation: ``u (B, N, h*d)`` the value projection without bias, ``M = softmax(A / alpha) (h, 9)`` the head mixing,
``P = H*W`` patch positions after ``PREFIX`` prefix tokens, tap ``k`` at offset ``(k % 3 - 1, k // 3 - 1)`` (the
centre tap is ``CENTER``). The conv candidates' pre-BN responses are::

    y3[b, p] = sum_k sum_g M[g, k] u_g[b, p + offset_k] + c3        (zero outside the grid)
    y1[b, p] = sum_g M[g, CENTER] u_g[b, p] + c1

* ``_gated_attn_conv_fwd_kernel``: ``y3``, ``y1`` and their per-program BatchNorm partial statistics (sum and centred
  sum of squares, combined on the host with Chan's formula);
* ``_gated_attn_conv_bn_relu_kernel``: ``r = ReLU(BN(y))`` of the live candidate laid out over all N tokens;
* ``_gated_attn_conv_bn_bwd_stats_kernel``: the ReLU/BN backward sums ``sum dz``, ``sum dz*xn`` and ``<dr, r>``;
* ``_gated_attn_conv_bwd_kernel``: ``dy`` recomputed at the shifted neighbours, adjoint shift-sum and head un-mixing
  into ``du``, and the partial sums of ``dM`` and of the conv-bias gradient;
* ``_gated_attn_conv_dot_kernel``: fp32 inner product (the MSA gate gradient ``<G, out_msa>``).

The launchers are in :mod:`spvit_kernels.gated_attn_conv.launch`; the kernel names are used by
``bench/check_triton_compile.py`` and ``tests/triton_launches.py``.
"""
import triton
import triton.language as tl


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
