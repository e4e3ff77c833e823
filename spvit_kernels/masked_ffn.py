"""Search-mode masked FFN (docs/method.md §2.3, §2.5, §10.3): ``y = (GELU(x W1^T + b1) * mask) W2^T + b2`` with
fused kernels.

Forward
    ``_masked_ffn_fwd_kernel`` computes the fc1 GEMM tile by tile and applies bias, GELU and the gate mask in its
    epilogue, writing the masked hidden ``h`` (input dtype) and, when a backward will follow, the pre-activation ``z``.
    fc2 (``h W2^T + b2``) is a plain GEMM with a bias epilogue and goes to cuBLAS (``torch.addmm``) by default: in
    search mode the hidden width is the full 4C (1536/3072, aligned), where cuBLAS is expected to match or beat a
    Triton GEMM. :func:`masked_ffn_with_fc2` can run fc2 on the same Triton kernel instead (no activation, no mask) so
    the benchmark measures both; no GPU measurement has settled this default yet (``bench/test_kernels.py``, provider
    ``triton_fc2_triton``).

Saved for backward
    Activations: only ``x`` and the pre-activation ``z`` (one (M, F) tensor, input dtype), plus the weights and the
    mask. Eager autograd keeps three (M, F) tensors (``z``, ``a = GELU(z)``, ``h``); here ``a``, ``GELU'(z)`` and
    ``h`` are recomputed from ``z`` in the backward kernel's epilogue, elementwise work that is free next to its GEMM.
    ``z`` is saved rather than recomputed because recomputing it costs a full extra fc1 GEMM (a third of the
    backward's FLOPs).

Backward
    ``_masked_ffn_bwd_kernel`` computes ``dh = dY W2`` tile by tile (tokens x hidden units) and, in the epilogue,
    reloads ``z`` to form ``a`` and ``GELU'(z)``; it writes ``dz = dh * mask * GELU'(z)`` and the recomputed ``h``
    (for ``dW2``), and reduces over its token tile both the gate gradient ``sum_t a * dh`` and the fc1 bias gradient
    ``sum_t dz``. Those per-tile partial sums go to a small fp32 buffer (token tiles x F) that is summed afterwards:
    deterministic (no atomics) and no extra pass over any (M, F) tensor. Units with mask 0 get their gate gradient
    like the others (``a`` and ``dh`` do not depend on the mask). The remaining GEMMs (``dx = dz W1``,
    ``dW1 = dz^T x``, ``dW2 = dY^T h``) have no epilogue work and go to cuBLAS.

All GEMMs accumulate in fp32; fp32 inputs use exact fp32 dot products unless
``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, as cuBLAS would). Double backward is not supported.

The op is ``torch.ops.spvit.masked_ffn`` with its backward ``torch.ops.spvit.masked_ffn_backward`` (``triton_op``s, so
``torch.compile`` traces into the kernels) and autograd registered. Under the Triton interpreter they are opaque
``custom_op``s with the same autograd (see :func:`spvit_kernels._compat.define_op`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._compat import autocast_cast, autotune, autotune_enabled, define_op, dot_precision, tl_dot, upcast_dot
from ._compat import wrap_triton

_ACT_NONE, _ACT_GELU_ERF, _ACT_GELU_TANH = 0, 1, 2
_APPROX_TO_ACT = {"none": _ACT_GELU_ERF, "tanh": _ACT_GELU_TANH}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_FC2 = "cublas"


# ----------------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _gelu(z, ACT: tl.constexpr):
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
def _gelu_and_grad(z, ACT: tl.constexpr):
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
def _cast_for(v, ptr, INTERPRET_BF16: tl.constexpr):
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
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
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


@triton.jit
def _masked_ffn_fwd_kernel(
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
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
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
        tl.store(z_ptr + rows[:, None] * N + cols[None, :], _cast_for(acc, z_ptr, INTERPRET_BF16), mask=out_mask)
    out = _gelu(acc, ACT)
    if HAS_MASK:
        out = out * tl.load(mask_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_offs, _cast_for(out, out_ptr, INTERPRET_BF16), mask=out_mask)


@triton.jit
def _masked_ffn_bwd_kernel(
    dy_ptr,  # (M, C) upstream gradient dL/dy
    w2_ptr,  # (C, F) fc2 weight
    z_ptr,  # (M, F) saved pre-activation x W1^T + b1
    mask_ptr,  # (F,) gate mask (0/1)
    dz_ptr,  # (M, F) out: dL/dz = (dy W2) * mask * GELU'(z), input dtype
    h_ptr,  # (M, F) out: recomputed h = GELU(z) * mask, input dtype (operand of dW2 = dy^T h)
    part_ptr,  # (2, num_m_tiles, F) fp32 out: per token tile, [0] sum_t GELU(z) * dh (gate grad), [1] sum_t dz (db1)
    M, F, C,
    ACT: tl.constexpr,  # 1 GELU (erf), 2 GELU (tanh)
    PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_f = _tile_ids(M, F, BLOCK_M, BLOCK_F, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_f < F
    rows = offs_m.to(tl.int64)
    cols = offs_f.to(tl.int64)

    # dh = dy W2 over the C (= K) dimension.
    dy_ptrs = dy_ptr + rows[:, None] * C + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w2_ptrs = w2_ptr + offs_k[:, None].to(tl.int64) * F + cols[None, :]  # (BLOCK_K, BLOCK_F)
    dh = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k_ok = (k0 + offs_k) < C
        g = tl.load(dy_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w2_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        dh = tl_dot(g, w, dh, PRECISION, INTERPRET_BF16)
        dy_ptrs += BLOCK_K
        w2_ptrs += BLOCK_K * F

    # Epilogue: GELU recompute, gate gradient and fc1-bias gradient reduced over this token tile.
    # Rows past M have dh = 0 (masked loads) and z = 0, so they add nothing to the sums.
    tile_mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * F + cols[None, :]
    z = tl.load(z_ptr + offs, mask=tile_mask, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + offs_f, mask=col_ok, other=0.0).to(tl.float32)
    a, da_dz = _gelu_and_grad(z, ACT)
    dz = dh * m[None, :] * da_dz
    tl.store(dz_ptr + offs, _cast_for(dz, dz_ptr, INTERPRET_BF16), mask=tile_mask)
    tl.store(h_ptr + offs, _cast_for(a * m[None, :], h_ptr, INTERPRET_BF16), mask=tile_mask)
    num_m = tl.cdiv(M, BLOCK_M)
    part_offs = pid_m.to(tl.int64) * F + cols
    tl.store(part_ptr + part_offs, tl.sum(a * dh, axis=0), mask=col_ok)
    tl.store(part_ptr + num_m.to(tl.int64) * F + part_offs, tl.sum(dz, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------
def _blocks(device: torch.device, dtype: torch.dtype, backward: bool = False) -> dict:
    """Tile sizes and launch options when autotuning is off (``SPVIT_AUTOTUNE=0``) or under the interpreter.

    The backward's column tile is 64 wide on CUDA: at 128 x 128 with 8 warps its epilogue (GELU and its derivative,
    the dz / h stores and two column reductions) needs more than 255 registers and spills on sm_90 in bf16
    (``bench/check_triton_compile.py``); 128 x 64 compiles to 231 registers without spills.
    """
    if device.type != "cuda":  # Triton interpreter: few, mid-size programs run fastest
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    block_k = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_M=128, BLOCK_N=64 if backward else 128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def _cfg(bm, bn, bk, warps, stages, n_name="BLOCK_N"):
    return triton.Config({"BLOCK_M": bm, n_name: bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Autotune configs for Hopper-class GPUs (sm_90: 228 KB shared memory per block, 64K registers per SM). Each compiles
# for sm_90 in bf16 without register spills (bench/check_triton_compile.py; 128 x 256 tiles spill, so none is listed);
# configs that exceed a smaller GPU's shared memory (fp32 with 64-wide K) are dropped there by the autotuner.
_FWD_CONFIGS = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
                _cfg(128, 128, 32, 8, 3)]
# The backward keeps BLOCK_M = 128 in every config: its partial-sum buffer has one row per token tile.
_BWD_CONFIGS = [_cfg(128, 64, 64, 8, 3, "BLOCK_F"), _cfg(128, 64, 32, 8, 4, "BLOCK_F"),
                _cfg(128, 64, 64, 8, 4, "BLOCK_F")]
_BWD_BLOCK_M = 128

# kernel name -> (number of autotune configs, the tile constexprs the autotuner chooses); read by the tests' launch
# recorder (tests/triton_launches.py)
_AUTOTUNED_KERNELS = {"_masked_ffn_fwd_kernel": (len(_FWD_CONFIGS), ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")),
                      "_masked_ffn_bwd_kernel": (len(_BWD_CONFIGS), ("BLOCK_M", "BLOCK_F", "BLOCK_K", "GROUP_M"))}
_masked_ffn_fwd_tuned = autotune(configs=_FWD_CONFIGS, key=["N", "K"])(_masked_ffn_fwd_kernel)
_masked_ffn_bwd_tuned = autotune(configs=_BWD_CONFIGS, key=["F", "C"])(_masked_ffn_bwd_kernel)


def _tuned(device: torch.device) -> bool:
    return device.type == "cuda" and autotune_enabled()


def linear_act(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: int,
               mask: Optional[torch.Tensor] = None, store_preact: bool = False, row_align: int = 1
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fused ``act(x W^T + b) * mask`` (one Triton GEMM with the bias, activation and mask in the epilogue).

    Args:
        x: (M, K) with unit column stride; w: (N, K) contiguous; b: (N,) | None; act: 0 none, 1 GELU erf,
        2 GELU tanh; mask: (N,) | None; store_preact: also return the pre-activation;
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
    if _tuned(x.device):
        kernel, cfg = _masked_ffn_fwd_tuned, {}

        def grid(m):
            return (triton.cdiv(m_rows, m["BLOCK_M"]) * triton.cdiv(n, m["BLOCK_N"]),)
    else:
        kernel, cfg = _masked_ffn_fwd_kernel, _blocks(x.device, x.dtype)
        grid = (triton.cdiv(m_rows, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wrap_triton(kernel)[grid](
        x, w, b if b is not None else w, mask if mask is not None else w, out,
        z if z is not None else x.new_empty(0),  # never an alias of ``out``: both are written by the kernel
        m_rows, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        ACT=act, HAS_BIAS=b is not None, HAS_MASK=mask is not None, STORE_Z=store_preact,
        PRECISION=dot_precision(x.dtype), INTERPRET_BF16=upcast_dot(x.device, x.dtype), **cfg,
    )
    return out, z


def _fwd_impl(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor], mask: torch.Tensor, approximate: str, save_preact: bool, fc2: str
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: (M, C); returns y: (M, C) and z: (M, F) (empty (0,) when not ``save_preact``)."""
    h, z = linear_act(x, w1, b1, _APPROX_TO_ACT[approximate], mask=mask, store_preact=save_preact)
    if fc2 == "triton":
        y, _ = linear_act(h, w2, b2, _ACT_NONE)
    elif b2 is not None:
        y = torch.addmm(b2, h, w2.t())
    else:
        y = torch.mm(h, w2.t())
    return y, (z if z is not None else x.new_empty(0))


def _bwd_impl(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, mask: torch.Tensor,
              z: torch.Tensor, approximate: str) -> Tuple[torch.Tensor, ...]:
    """dy, x: (M, C); z: (M, F). Returns dx (M, C), dw1 (F, C), db1 (F,), dw2 (C, F), db2 (C,), dmask (F,)."""
    m_rows, c = dy.shape
    f = w1.shape[0]
    dz = torch.empty((m_rows, f), device=dy.device, dtype=dy.dtype)
    h = torch.empty_like(dz)
    tuned = _tuned(dy.device)
    cfg = _blocks(dy.device, dy.dtype, backward=True)
    num_m = triton.cdiv(m_rows, _BWD_BLOCK_M if tuned else cfg["BLOCK_M"])
    part = torch.empty((2, num_m, f), device=dy.device, dtype=torch.float32)  # every entry written by one program
    if m_rows > 0 and f > 0:
        args = (dy, w2, z, mask, dz, h, part, m_rows, f, c)
        meta = dict(ACT=_APPROX_TO_ACT[approximate], PRECISION=dot_precision(dy.dtype),
                    INTERPRET_BF16=upcast_dot(dy.device, dy.dtype))
        if tuned:
            def grid(m):
                return (num_m * triton.cdiv(f, m["BLOCK_F"]),)

            wrap_triton(_masked_ffn_bwd_tuned)[grid](*args, **meta)
        else:
            wrap_triton(_masked_ffn_bwd_kernel)[(num_m * triton.cdiv(f, cfg["BLOCK_N"]),)](
                *args, **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_F=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
    dmask = part[0].sum(dim=0).to(mask.dtype)  # (F,); separate reductions so no output aliases another
    db1 = part[1].sum(dim=0).to(dy.dtype)
    dx = torch.mm(dz, w1)
    dw1 = torch.mm(dz.t(), x)
    dw2 = torch.mm(dy.t(), h)
    db2 = dy.sum(dim=0, dtype=torch.float32).to(dy.dtype)
    return dx, dw1, db1, dw2, db2, dmask


# ----------------------------------------------------------------------------------------------------------------------
# torch.library ops + autograd
# ----------------------------------------------------------------------------------------------------------------------
def _fwd_fake(x, w1, b1, w2, b2, mask, approximate, save_preact, fc2):
    z = x.new_empty((x.shape[0], w1.shape[0])) if save_preact else x.new_empty(0)
    return x.new_empty((x.shape[0], w2.shape[0])), z


def _bwd_fake(dy, x, w1, w2, mask, z, approximate):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            dy.new_empty(dy.shape[1]), torch.empty_like(mask))


def _masked_ffn_fwd(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                    b2: Optional[torch.Tensor], mask: torch.Tensor, approximate: str, save_preact: bool, fc2: str
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: (M, C) -> y: (M, C) and the pre-activation z: (M, F) (or an empty (0,) tensor if not save_preact)."""
    return _fwd_impl(x, w1, b1, w2, b2, mask, approximate, save_preact, fc2)


def _masked_ffn_bwd(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, mask: torch.Tensor,
                    z: torch.Tensor, approximate: str
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2, dmask); see :func:`_bwd_impl`."""
    return _bwd_impl(dy, x, w1, w2, mask, z, approximate)


# spvit::masked_ffn returns (y, z): the pre-activation z is what the backward keeps (see the module docstring).
masked_ffn_op = define_op("masked_ffn", _masked_ffn_fwd, _fwd_fake)
masked_ffn_backward_op = define_op("masked_ffn_backward", _masked_ffn_bwd, _bwd_fake)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, mask, approximate, save_preact, _fc2 = inputs
    if not save_preact:
        raise RuntimeError("spvit::masked_ffn ran with save_preact=False but a backward is needed")
    ctx.save_for_backward(x, w1, w2, mask, output[1])
    ctx.approximate = approximate
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None


def _backward(ctx, dy, _dz):
    x, w1, w2, mask, z = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, dmask = masked_ffn_backward_op(dy.contiguous(), x, w1, w2, mask, z, ctx.approximate)
    return (dx, dw1, db1 if ctx.has_b1 else None, dw2, db2 if ctx.has_b2 else None, dmask, None, None, None)


masked_ffn_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_inputs(x, w1, b1, w2, b2):
    """Under autocast, cast the FFN's inputs to the autocast dtype, as ``F.linear`` would."""
    return autocast_cast(x.device.type, (x, w1, b1, w2, b2))


def _check_ffn_inputs(op: str, x, w1, b1, w2, b2, approximate: str) -> None:
    """Clear errors for what the kernels do not accept (shared with :mod:`spvit_kernels.pruned_ffn`)."""
    if approximate not in _APPROX_TO_ACT:
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op} supports {_DTYPES}, got x of dtype {x.dtype}")
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


def masked_ffn(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    mask: torch.Tensor, approximate: str = "none",
) -> torch.Tensor:
    """Search-mode FFN with gated hidden units; same signature and semantics as :func:`reference.masked_ffn`.

    Args:
        x: (..., C) tokens, e.g. (B, N, C); w1: (F, C); b1: (F,) | None; w2: (C, F); b2: (C,) | None;
        mask: (F,) gate samples, exactly 0/1 (any float dtype; may require grad for straight-through gates);
        approximate: GELU variant, 'none' (erf) or 'tanh'.
    Returns:
        (..., C) = (GELU(x W1^T + b1) * mask) W2^T + b2, in x's dtype. Under autocast all inputs are first cast
        to the autocast dtype, as ``F.linear`` would. Non-contiguous inputs are copied to contiguous ones.
    """
    return masked_ffn_with_fc2(x, w1, b1, w2, b2, mask, approximate, DEFAULT_FC2)


def masked_ffn_with_fc2(
    x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
    mask: torch.Tensor, approximate: str = "none", fc2: str = DEFAULT_FC2,
) -> torch.Tensor:
    """:func:`masked_ffn` with the GEMM that runs fc2 chosen: 'cublas' (``torch.addmm``) or 'triton'."""
    x, w1, b1, w2, b2 = _autocast_inputs(x, w1, b1, w2, b2)
    _check_ffn_inputs("masked_ffn", x, w1, b1, w2, b2, approximate)
    if tuple(mask.shape) != (w1.shape[0],) or mask.device != x.device:
        raise ValueError(f"masked_ffn: mask must be ({w1.shape[0]},) on {x.device}, got {tuple(mask.shape)} "
                         f"on {mask.device}")
    if fc2 not in ("cublas", "triton"):
        raise ValueError(f"fc2 must be 'cublas' or 'triton', got {fc2!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, w1, b1, w2, b2, mask))
    w1, w2, mask = w1.contiguous(), w2.contiguous(), mask.contiguous()
    b1 = b1.contiguous() if b1 is not None else None
    b2 = b2.contiguous() if b2 is not None else None
    y, _ = masked_ffn_op(x2, w1, b1, w2, b2, mask, approximate, need_grad, fc2)
    return y.reshape(*lead, y.shape[-1])
