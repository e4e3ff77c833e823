"""Shared Triton GEMM helpers of the FFN ops (:mod:`spvit_kernels.masked_ffn`, :mod:`spvit_kernels.pruned_ffn`).

One GEMM with an epilogue serves both FFN ops::

    out = act(x W^T + b) * mask        (act: none, GELU erf or GELU tanh; b and mask optional)

optionally also writing the pre-activation ``z = x W^T + b``. The masked FFN runs its fc1 (and fc2 with
``fc2="triton"``) on it; the pruned FFN runs both of its GEMMs on it with the mask off. Also here: the GELU and
GELU-derivative device functions, the grouped tile order, the rounding cast the interpreter needs for bf16, the tile
configurations (pinned and autotuned) and the argument checks both FFN ops share.

All GEMMs accumulate in fp32; fp32 inputs use exact fp32 dot products unless TF32 is allowed for fp32 matmuls
(:func:`spvit_kernels._compat.allow_tf32`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._compat import autocast_cast, autotune, autotune_enabled, dot_precision, tl_dot, upcast_dot, wrap_triton

ACT_NONE, ACT_GELU_ERF, ACT_GELU_TANH = 0, 1, 2
APPROX_TO_ACT = {"none": ACT_GELU_ERF, "tanh": ACT_GELU_TANH}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def gelu(z, ACT: tl.constexpr):
    """GELU(z) in fp32 (erf form for ACT=1, tanh form for ACT=2); identity for ACT=0."""
    if ACT == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u), from long-stable primitives
        return 0.5 * z * (1.0 + t)
    else:
        return z


@triton.jit
def gelu_and_grad(z, ACT: tl.constexpr):
    """(GELU(z), GELU'(z)) in fp32, for ACT=1 (erf) or ACT=2 (tanh)."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return z * cdf, cdf + z * pdf
    else:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du


@triton.jit
def cast_for(v, ptr, INTERPRET_BF16: tl.constexpr):
    """Cast fp32 ``v`` to the element type of ``ptr`` with round-to-nearest-even.

    On the GPU ``.to`` already rounds to nearest even. The Triton interpreter truncates fp32 -> bf16 casts (triton
    3.8), which biases every bf16 output towards zero; with INTERPRET_BF16 the rounding is done here on the bits.
    """
    if INTERPRET_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        v = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), grouped along rows so that consecutive programs share L2 tiles."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------------------------------
# The GEMM-with-epilogue kernel
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _linear_act_kernel(
    x_ptr,  # (M, K) input tokens (fc1: x, K = C; fc2: h, K = F)
    w_ptr,  # (N, K) weight (fc1: W1, N = F; fc2: W2, N = C)
    b_ptr,  # (N,) bias; read only when HAS_BIAS
    mask_ptr,  # (N,) gate mask (any float dtype, 0/1); read only when HAS_MASK
    out_ptr,  # (M, N) out: act(x W^T + b) * mask, in the output dtype
    z_ptr,  # (M, N) contiguous out: pre-activation x W^T + b; written only when STORE_Z
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    ACT: tl.constexpr,  # 0 none, 1 GELU (erf), 2 GELU (tanh)
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr,  # fp32 inputs: 'tf32' or 'ieee' dot products (_compat.dot_precision)
    INTERPRET_BF16: tl.constexpr,  # bf16 under the Triton interpreter: fp32 dots and RNE casts (_compat.upcast_dot)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_N) = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl_dot(xt, wt, acc, PRECISION, INTERPRET_BF16)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    out_offs = rows[:, None] * stride_om + cols[None, :] * stride_on
    if STORE_Z:
        tl.store(z_ptr + rows[:, None] * N + cols[None, :], cast_for(acc, z_ptr, INTERPRET_BF16), mask=out_mask)
    out = gelu(acc, ACT)
    if HAS_MASK:
        out = out * tl.load(mask_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_offs, cast_for(out, out_ptr, INTERPRET_BF16), mask=out_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------------------------------
def blocks(device: torch.device, dtype: torch.dtype, backward: bool = False) -> dict:
    """Tile sizes and launch options when autotuning is off (``SPVIT_AUTOTUNE=0``) or under the interpreter.

    ``backward`` gives the masked FFN's backward kernel (its column tile is ``BLOCK_N``). That column tile is 64 wide
    on CUDA: at 128 x 128 with 8 warps its epilogue (GELU and its derivative, the dz / h stores and two column
    reductions) needs more than 255 registers and spills on sm_90 in bf16 (``bench/check_triton_compile.py``);
    128 x 64 compiles to 231 registers without spills.
    """
    if device.type != "cuda":  # Triton interpreter: few, mid-size programs run fastest
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=128, BLOCK_N=64 if backward else 128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def config(bm: int, bn: int, bk: int, warps: int, stages: int, n_name: str = "BLOCK_N") -> "triton.Config":
    """One autotune config; ``n_name`` is the name of the kernel's column tile."""
    return triton.Config({"BLOCK_M": bm, n_name: bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Autotune configs for Hopper-class GPUs (sm_90: 228 KB shared memory per block, 64K registers per SM). Each compiles
# for sm_90 in bf16 without register spills (bench/check_triton_compile.py; 128 x 256 tiles spill, so none is listed);
# configs that exceed a smaller GPU's shared memory (fp32 with 64-wide K) are dropped there by the autotuner.
FWD_CONFIGS = [config(128, 128, 64, 8, 3), config(128, 128, 64, 8, 4), config(64, 128, 64, 4, 4),
               config(128, 64, 64, 4, 4), config(128, 128, 32, 8, 3)]

# kernel name -> (number of autotune configs, the tile constexprs the autotuner chooses); read by the tests' launch
# recorder (tests/triton_launches.py)
AUTOTUNED_KERNELS = {"_linear_act_kernel": (len(FWD_CONFIGS), ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))}
_linear_act_tuned = autotune(configs=FWD_CONFIGS, key=["N", "K"])(_linear_act_kernel)


def tuned(device: torch.device) -> bool:
    """Whether launches on ``device`` go through the autotuner (CUDA with autotuning on)."""
    return device.type == "cuda" and autotune_enabled()


# ----------------------------------------------------------------------------------------------------------------------
# Launcher and the checks shared by the FFN ops
# ----------------------------------------------------------------------------------------------------------------------
def linear_act(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: int,
               mask: Optional[torch.Tensor] = None, store_preact: bool = False, row_align: int = 1
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fused ``act(x W^T + b) * mask`` (one Triton GEMM with the bias, activation and mask in the epilogue).

    Args:
        x: (M, K) with unit column stride; w: (N, K) contiguous; b: (N,) | None; act: ``ACT_NONE``,
            ``ACT_GELU_ERF`` or ``ACT_GELU_TANH``; mask: (N,) | None; store_preact: also return the pre-activation;
        row_align: the output's row stride is N rounded up to this (a column slice of a wider buffer, whose padding
            columns are zero), so that a following GEMM reads aligned rows when N is an awkward pruned width.
    Returns:
        out: (M, N) in x's dtype; z: (M, N) contiguous pre-activation ``x W^T + b`` (x's dtype) or None.
    """
    m_rows, k = x.shape
    n = w.shape[0]
    n_pad = triton.cdiv(n, row_align) * row_align
    out = torch.empty((m_rows, n_pad), device=x.device, dtype=x.dtype)
    if n_pad != n:
        # The padding columns are zeroed, never left uninitialised: some BLAS GEMMs read a row-strided operand's rows
        # past their K columns up to the row stride and multiply that tail by zero (the CPU bf16 matmul of torch
        # 2.14), so a NaN or Inf bit pattern left in the padding would turn whole output rows into NaN.
        out[:, n:].zero_()
        out = out[:, :n]
    z = torch.empty((m_rows, n), device=x.device, dtype=x.dtype) if store_preact else None
    if m_rows == 0 or n == 0:
        return out, z
    if tuned(x.device):
        kernel, cfg = _linear_act_tuned, {}

        def grid(m):
            return (triton.cdiv(m_rows, m["BLOCK_M"]) * triton.cdiv(n, m["BLOCK_N"]),)
    else:
        kernel, cfg = _linear_act_kernel, blocks(x.device, x.dtype)
        grid = (triton.cdiv(m_rows, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(kernel)[grid](
        x, w, b if b is not None else w, mask if mask is not None else w, out,
        z if z is not None else x.new_empty(0),  # never an alias of ``out``: both are written by the kernel
        m_rows, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        ACT=act, HAS_BIAS=b is not None, HAS_MASK=mask is not None, STORE_Z=store_preact,
        PRECISION=dot_precision(x.dtype), INTERPRET_BF16=upcast_dot(x.device, x.dtype), **cfg,
    )
    return out, z


def autocast_inputs(x, w1, b1, w2, b2):
    """Under autocast, cast the FFN's inputs to the autocast dtype, as ``F.linear`` would."""
    return autocast_cast(x.device.type, (x, w1, b1, w2, b2))


def check_ffn_inputs(op: str, x, w1, b1, w2, b2, approximate: str) -> None:
    """Clear errors for what the FFN kernels do not accept."""
    if approximate not in APPROX_TO_ACT:
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{op} supports {DTYPES}, got x of dtype {x.dtype}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    f, c = w1.shape
    if x.shape[-1] != c or tuple(w2.shape) != (c, f):
        raise ValueError(f"{op}: shape mismatch x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if (b1 is not None and tuple(b1.shape) != (f,)) or (b2 is not None and tuple(b2.shape) != (c,)):
        raise ValueError(f"{op}: b1 must be (F,) and b2 (C,)")
