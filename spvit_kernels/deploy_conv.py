"""Deployed SPViT conv layer (BN folded, docs/method.md §10.4): a fused Triton kernel and an extension provider.

Computes, with the signature of :func:`spvit_kernels.reference.deploy_conv`::

    out[:, :prefix] = x_hat[:, :prefix]
    out[:, prefix:] = ReLU(shift_sum(x_p W_planes^T) + b_fold) W_out^T + b_out        (x_p = patch tokens)

The Triton kernel is an implicit-GEMM convolution that never forms the plane tensor (B, P, T, d): it reads x_hat
once and writes the output once (design and memory traffic: docs/kernel-design.md).

Providers (both with the signature of the reference):

* :func:`deploy_conv` -- the fused Triton kernel ``_deploy_conv_fwd_kernel`` behind the op ``spvit::deploy_conv``.
  Inference only: when autograd is recording (grad mode on and any input requires grad) it runs the eager
  reference, which is differentiable;
* :func:`deploy_conv_ext` -- projection GEMM (cuBLAS / MKL) -> the extension's shift-sum with folded bias and ReLU
  (:func:`spvit_kernels.shift_sum.shift_sum_ext`) -> output GEMM + bias, prefix tokens passed through;
  differentiable.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import checks, reference
from ._compat import HAS_TRITON, autocast_cast, autotune, autotune_enabled, define_op, dot_precision, interpret
from ._compat import require_triton_device, upcast_dot, wrap_triton
from .shift_sum import shift_sum_ext

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._compat import tl_dot


# ----------------------------------------------------------------------------------------------------------------------
# Extension provider
# ----------------------------------------------------------------------------------------------------------------------
def deploy_conv_ext(
    x_hat: torch.Tensor, w_planes: torch.Tensor, b_fold: torch.Tensor, w_out: torch.Tensor,
    b_out: Optional[torch.Tensor], grid: Tuple[int, int], num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Deployed conv layer (§10.4): GEMM -> extension shift-sum + b_fold + ReLU -> GEMM + b_out (differentiable).

    Args:
        x_hat: (B, N, C), N = num_prefix_tokens + H*W.
        w_planes: (T*d, C) with T = 9 or 1; b_fold: (d,); w_out: (C, d); b_out: (C,) or None.
        grid: (H, W); num_prefix_tokens: leading tokens (class token) that pass through unchanged.
    Returns:
        (B, N, C): ``x_hat[:, :prefix]`` then ``ReLU(shift_sum(x_p W_planes^T) + b_fold) W_out^T + b_out``.
    """
    checks.deploy_conv(x_hat, w_planes, b_fold, w_out, b_out, grid, num_prefix_tokens)
    d = b_fold.shape[0]
    t = w_planes.shape[0] // d
    xp = x_hat[:, num_prefix_tokens:]
    b, p, _ = xp.shape
    planes = torch.matmul(xp, w_planes.t()).reshape(b, p, t, d)
    y = shift_sum_ext(planes, b_fold, grid, relu=True)
    out_p = F.linear(y, w_out, b_out)
    if num_prefix_tokens == 0:
        return out_p
    return torch.cat([x_hat[:, :num_prefix_tokens].to(out_p.dtype), out_p], dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Triton provider
# ----------------------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit(do_not_specialize=["NB", "B_BUCKET"])
    def _deploy_conv_fwd_kernel(
        x_ptr,  # (B, N, C) x_hat; rows of C contiguous (stride_xb, stride_xn, 1)
        wp_ptr,  # (T*D, C) w_planes, contiguous
        bf_ptr,  # (D,) b_fold
        wo_ptr,  # (C, D) w_out, contiguous
        bo_ptr,  # (C,) b_out (unused when HAS_BOUT is False)
        out_ptr,  # (B, N, C) output; rows of C contiguous (stride_ob, stride_on, 1)
        NB, H, W, C, D, PREFIX,
        stride_xb, stride_xn, stride_ob, stride_on,
        B_BUCKET,  # next power of two of the batch: only part of the autotune key (a batch-1 choice is not reused
        # at batch 256)
        T: tl.constexpr, HAS_BOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        P = H * W
        offs_r = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of the (image, position) index
        m_ok = offs_r < NB * P
        b = offs_r // P  # image of each row (int64)
        offs_m = (offs_r % P).to(tl.int32)  # patch position of each row
        i = offs_m // W
        j = offs_m % W
        offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) conv channels (D <= BLOCK_D)
        d_ok = offs_d < D
        x_base = x_ptr + b * stride_xb + PREFIX * stride_xn  # (BLOCK_M,) first patch token of each row's image

        # conv: acc[m, :] = sum_t sum_c x_p[m + offset_t, c] * W_planes[t*D + :, c]
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for t in tl.static_range(T):
            if T == 1:
                dy = 0
                dx = 0
            else:
                dy = t % 3 - 1
                dx = t // 3 - 1
            ii = i + dy
            jj = j + dx
            row_ok = m_ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
            rows = tl.where(row_ok, ii * W + jj, 0)
            for k0 in range(0, C, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < C
                a = tl.load(x_base[:, None] + rows[:, None] * stride_xn + offs_k[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K) neighbour rows
                w = tl.load(wp_ptr + (t * D + offs_d[None, :]) * C + offs_k[:, None],
                            mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_D) = W_t^T chunk
                acc = tl_dot(a, w, acc, DOT_PRECISION, UPCAST)

        # folded bias + ReLU in registers; the activation takes the input dtype like the eager (B, P, d) tensor
        acc += tl.load(bf_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        y = tl.maximum(acc, 0.0).to(x_ptr.dtype.element_ty)  # (BLOCK_M, BLOCK_D)

        # output map: out[m, n] = sum_d y[m, d] * W_out[n, d] + b_out[n]
        out_rows = out_ptr + b[:, None] * stride_ob + (PREFIX + offs_m)[:, None] * stride_on
        for n0 in range(0, C, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < C
            wo = tl.load(wo_ptr + offs_n[None, :] * D + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                         other=0.0)  # (BLOCK_D, BLOCK_N) = W_out^T chunk
            o = tl_dot(y, wo, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_PRECISION, UPCAST)
            if HAS_BOUT:
                o += tl.load(bo_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_rows + offs_n[None, :], o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def _configs():
        cfgs = []
        for bm, bk, bn, warps, stages in [
            (64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 128, 4, 4), (128, 32, 128, 8, 3), (32, 64, 64, 4, 3),
            (128, 64, 128, 8, 2),
            # small-smem fallback (~100 KB at fp32, d = 256): every config above exceeds sm_80's 163 KB per block for
            # fp32 with d in (128, 256] (bench/check_triton_compile.py), so without it the autotuner has nothing to run
            (32, 32, 64, 4, 2),
        ]:
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn}, num_warps=warps,
                                      num_stages=stages))
        return cfgs

    # Autotuned on GPUs (key: layer shape and batch bucket; results kept in Triton's cache across processes where triton
    # can) unless autotuning is off (SPVIT_AUTOTUNE=0: one pinned config, ``_pinned``); the interpreter (CPU tests) uses
    # the plain kernel with fixed blocks.
    _deploy_conv_fwd_tuned = autotune(configs=_configs(), key=["C", "D", "H", "W", "T", "B_BUCKET"])(
        _deploy_conv_fwd_kernel)

    def _pinned(dtype: torch.dtype, block_d: int) -> dict:
        """The one config launched when autotuning is off: the first autotune config, or the small-shared-memory one
        where the first does not fit sm_80 (fp32 with d > 128)."""
        small = dtype == torch.float32 and block_d > 128
        bm, bk, bn, warps, stages = (32, 32, 64, 4, 2) if small else (64, 64, 64, 4, 3)
        return dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    def _deploy_conv_fwd(x_hat: torch.Tensor, w_planes: torch.Tensor, b_fold: torch.Tensor, w_out: torch.Tensor,
                         b_out: Optional[torch.Tensor], H: int, W: int,  # noqa: N803
                         num_prefix_tokens: int) -> torch.Tensor:
        """The op body: x_hat (B, N, C) with unit last stride; weights in x_hat's dtype, contiguous.

        Returns:
            (B, N, C).
        """
        bsz, n, c = x_hat.shape
        d = b_fold.shape[0]
        t = w_planes.shape[0] // d
        out = torch.empty(bsz, n, c, device=x_hat.device, dtype=x_hat.dtype)
        if num_prefix_tokens:
            out[:, :num_prefix_tokens] = x_hat[:, :num_prefix_tokens]
        p = H * W
        if out.numel() == 0 or p == 0:
            return out
        block_d = max(16, triton.next_power_of_2(d))
        args = (x_hat, w_planes, b_fold, w_out, b_out if b_out is not None else b_fold, out, bsz, H, W, c, d,
                num_prefix_tokens, x_hat.stride(0), x_hat.stride(1), out.stride(0), out.stride(1),
                triton.next_power_of_2(bsz))
        meta = dict(T=t, HAS_BOUT=b_out is not None, DOT_PRECISION=dot_precision(x_hat.dtype), BLOCK_D=block_d,
                    UPCAST=upcast_dot(x_hat.device, x_hat.dtype))
        rows = bsz * p  # tiles run over the (image, position) index
        if interpret():
            bm = min(64, max(16, triton.next_power_of_2(rows)))
            bk = min(64, max(16, triton.next_power_of_2(c)))
            _deploy_conv_fwd_kernel[(triton.cdiv(rows, bm),)](*args, **meta, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bk)
        elif not autotune_enabled():
            cfg = _pinned(x_hat.dtype, block_d)
            wrap_triton(_deploy_conv_fwd_kernel)[(triton.cdiv(rows, cfg["BLOCK_M"]),)](*args, **meta, **cfg)
        else:
            def launch_grid(m):
                return (triton.cdiv(rows, m["BLOCK_M"]),)

            wrap_triton(_deploy_conv_fwd_tuned)[launch_grid](*args, **meta)
        return out

    def _deploy_conv_fake(x_hat, w_planes, b_fold, w_out, b_out, H, W, num_prefix_tokens):  # noqa: N803
        return torch.empty_like(x_hat, memory_format=torch.contiguous_format)

    deploy_conv_op = define_op("deploy_conv", _deploy_conv_fwd, _deploy_conv_fake)


def _needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def deploy_conv(
    x_hat: torch.Tensor, w_planes: torch.Tensor, b_fold: torch.Tensor, w_out: torch.Tensor,
    b_out: Optional[torch.Tensor], grid: Tuple[int, int], num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Fused deployed conv layer (3x3 with T = 9 planes or 1x1 with T = 1), BN folded.

    Args:
        x_hat: (B, N, C) normalised block input, N = num_prefix_tokens + H*W; fp32/bf16/fp16.
        w_planes: (T*d, C) projection to the T planes (T = 9 or 1); b_fold: (d,) folded conv+BN bias;
        w_out: (C, d) output map; b_out: (C,) or None. Weights are used in x_hat's dtype (under autocast: all in the
            autocast dtype, as the eager matmuls would be).
        grid: (H, W) patch grid; num_prefix_tokens: leading tokens passed through unchanged.
    Returns:
        (B, N, C) in x_hat.dtype (the autocast dtype under autocast).
    """
    if _needs_autograd(x_hat, w_planes, b_fold, w_out, b_out):  # inference kernel: differentiable fallback
        return reference.deploy_conv(x_hat, w_planes, b_fold, w_out, b_out, grid, num_prefix_tokens)
    require_triton_device("deploy_conv", x_hat.device)
    x_hat, w_planes, w_out, b_out = autocast_cast(x_hat.device.type, (x_hat, w_planes, w_out, b_out))
    if x_hat.dim() != 3:
        raise ValueError(f"deploy_conv: x_hat must be (B, N, C), got {tuple(x_hat.shape)}")
    bsz, n, c = x_hat.shape
    hh, ww = int(grid[0]), int(grid[1])
    d = b_fold.shape[0]
    t = w_planes.shape[0] // d if d else 0
    if t not in (1, 9) or w_planes.shape != (t * d, c):
        raise ValueError(f"deploy_conv: w_planes must be (9*d, C) or (d, C) = (.., {c}), got {tuple(w_planes.shape)}")
    if w_out.shape != (c, d):
        raise ValueError(f"deploy_conv: w_out must be (C, d) = ({c}, {d}), got {tuple(w_out.shape)}")
    if b_out is not None and b_out.shape != (c,):
        raise ValueError(f"deploy_conv: b_out must be (C,) = ({c},), got {tuple(b_out.shape)}")
    if n != num_prefix_tokens + hh * ww:
        raise ValueError(f"deploy_conv: {n} tokens != {num_prefix_tokens} prefix + {hh}x{ww} grid")
    if d > 256:
        raise ValueError(f"deploy_conv: d = {d} > 256 is not supported by the fused kernel")
    for name, ten in (("w_planes", w_planes), ("b_fold", b_fold), ("w_out", w_out), ("b_out", b_out)):
        if ten is not None and ten.device != x_hat.device:
            raise ValueError(f"deploy_conv: {name} is on {ten.device} but x_hat is on {x_hat.device}")
    dtype = x_hat.dtype
    if x_hat.stride(-1) != 1:
        x_hat = x_hat.contiguous()
    bo = b_out.contiguous() if b_out is not None else None
    return deploy_conv_op(x_hat, w_planes.to(dtype).contiguous(), b_fold.contiguous(), w_out.to(dtype).contiguous(), bo,
                          hh, ww, int(num_prefix_tokens))


__all__ = ["deploy_conv", "deploy_conv_ext"]
