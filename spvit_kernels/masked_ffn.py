"""Search-mode masked FFN (docs/method.md §2.3, §2.5, §10.3): ``y = (GELU(x W1^T + b1) * mask) W2^T + b2`` with
fused kernels.

Forward
    fc1 runs the GEMM-with-epilogue kernel of :mod:`spvit_kernels._gemm` (:func:`~spvit_kernels._gemm.linear_act`)
    tile by tile, with bias, GELU and the gate mask applied in its epilogue, writing the masked hidden ``h`` (input
    dtype) and, when a backward will follow, the pre-activation ``z``.
    fc2 (``h W2^T + b2``) is a plain GEMM with a bias epilogue and goes to cuBLAS (``torch.addmm``) by default;
    :func:`masked_ffn_with_fc2` can run it on the same Triton kernel instead (no activation, no mask). Which is faster
    is an open question of docs/kernel-design.md (``bench/test_kernels.py``, provider ``triton_fc2_triton``).

Backward
    Saved: ``x`` and the pre-activation ``z`` (plus the weights and the mask). ``_masked_ffn_bwd_kernel`` computes
    ``dh = dY W2`` and, in its epilogue, ``dz = dh * mask * GELU'(z)``, the recomputed ``h = GELU(z) * mask`` and the
    per-token-tile sums of the gate gradient ``sum_t GELU(z) * dh`` and of ``db1 = sum_t dz``; ``dx``, ``dW1`` and
    ``dW2`` go to cuBLAS. Why it is laid out this way: docs/kernel-design.md.

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

from ._compat import autotune, define_op, dot_precision, tl_dot, upcast_dot, wrap_triton
from ._gemm import ACT_NONE, APPROX_TO_ACT, AUTOTUNED_KERNELS as _GEMM_AUTOTUNED, autocast_inputs, blocks
from ._gemm import cast_for, check_ffn_inputs, config, gelu_and_grad, linear_act, tile_ids, tuned

DEFAULT_FC2 = "cublas"


# ----------------------------------------------------------------------------------------------------------------------
# Backward kernel (the forward GEMMs run spvit_kernels._gemm.linear_act)
# ----------------------------------------------------------------------------------------------------------------------
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
    pid_m, pid_f = tile_ids(M, F, BLOCK_M, BLOCK_F, GROUP_M)
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
    a, da_dz = gelu_and_grad(z, ACT)
    dz = dh * m[None, :] * da_dz
    tl.store(dz_ptr + offs, cast_for(dz, dz_ptr, INTERPRET_BF16), mask=tile_mask)
    tl.store(h_ptr + offs, cast_for(a * m[None, :], h_ptr, INTERPRET_BF16), mask=tile_mask)
    num_m = tl.cdiv(M, BLOCK_M)
    part_offs = pid_m.to(tl.int64) * F + cols
    tl.store(part_ptr + part_offs, tl.sum(a * dh, axis=0), mask=col_ok)
    tl.store(part_ptr + num_m.to(tl.int64) * F + part_offs, tl.sum(dz, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------
# The backward keeps BLOCK_M = 128 in every config: its partial-sum buffer has one row per token tile. Each compiles
# for sm_90 in bf16 without register spills (bench/check_triton_compile.py).
BWD_CONFIGS = [config(128, 64, 64, 8, 3, "BLOCK_F"), config(128, 64, 32, 8, 4, "BLOCK_F"),
               config(128, 64, 64, 8, 4, "BLOCK_F")]
_BWD_BLOCK_M = 128

# kernel name -> (number of autotune configs, the tile constexprs the autotuner chooses) of every kernel this op
# launches; read by the tests' launch recorder (tests/triton_launches.py)
AUTOTUNED_KERNELS = dict(_GEMM_AUTOTUNED,
                         _masked_ffn_bwd_kernel=(len(BWD_CONFIGS), ("BLOCK_M", "BLOCK_F", "BLOCK_K", "GROUP_M")))
_masked_ffn_bwd_tuned = autotune(configs=BWD_CONFIGS, key=["F", "C"])(_masked_ffn_bwd_kernel)


def _fwd_impl(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor], mask: torch.Tensor, approximate: str, save_preact: bool, fc2: str
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: (M, C); returns y: (M, C) and z: (M, F) (empty (0,) when not ``save_preact``)."""
    h, z = linear_act(x, w1, b1, APPROX_TO_ACT[approximate], mask=mask, store_preact=save_preact)
    if fc2 == "triton":
        y, _ = linear_act(h, w2, b2, ACT_NONE)
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
    autotuned = tuned(dy.device)
    cfg = blocks(dy.device, dy.dtype, backward=True)
    num_m = triton.cdiv(m_rows, _BWD_BLOCK_M if autotuned else cfg["BLOCK_M"])
    part = torch.empty((2, num_m, f), device=dy.device, dtype=torch.float32)  # every entry written by one program
    if m_rows > 0 and f > 0:
        args = (dy, w2, z, mask, dz, h, part, m_rows, f, c)
        meta = dict(ACT=APPROX_TO_ACT[approximate], PRECISION=dot_precision(dy.dtype),
                    INTERPRET_BF16=upcast_dot(dy.device, dy.dtype))
        if autotuned:
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
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    check_ffn_inputs("masked_ffn", x, w1, b1, w2, b2, approximate)
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
