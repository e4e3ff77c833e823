"""Tests of the shift-sum op: extension (C++ CPU / CUDA) and Triton, forward and backward, vs reference.shift_sum."""
import os

import pytest
import torch

from spvit_kernels import _ext, reference
from spvit_kernels.shift_sum import shift_sum_ext, shift_sum_triton

EXT_DISABLED = os.environ.get("SPVIT_NO_EXT", "0") == "1" or os.environ.get("SPVIT_SKIP_EXT", "0") == "1"
needs_ext = pytest.mark.skipif(not _ext.has_op("shift_sum"), reason=f"extension not loaded: {_ext.error()}")

# (dtype, atol, rtol) of the fp32/fp64 comparisons (same summation order as the reference: near-exact).
TIGHT = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12)}
GRIDS = [(3, 5), (1, 1), (2, 7), (4, 4), (5, 1)]


def _inputs(grid, taps, d, dtype, device, bias=True, batch=2, requires_grad=False):
    hh, ww = grid
    planes = torch.randn(batch, hh * ww, taps, d, dtype=dtype, device=device, requires_grad=requires_grad)
    b = torch.randn(d, dtype=dtype, device=device, requires_grad=requires_grad) if bias else None
    return planes, b


def test_extension_is_built():
    """A normal install must have built spvit_kernels._C; only an explicit opt-out may skip this."""
    if EXT_DISABLED:
        pytest.skip("extension disabled on purpose (SPVIT_NO_EXT=1 or SPVIT_SKIP_EXT=1)")
    assert _ext.available(), f"spvit_kernels._C failed to load: {_ext.error()}"
    assert _ext.has_op("shift_sum"), "spvit_kernels._C is loaded but does not register torch.ops.spvit.shift_sum"
    assert hasattr(torch.ops.spvit, "shift_sum_backward")


def test_tap_order_matches_reference():
    """The C++/CUDA/Triton kernels hard-code tap k -> (k % 3 - 1, k // 3 - 1); the table of docs/method.md §1.3 must agree."""
    assert reference.TAP_OFFSETS == tuple((k % 3 - 1, k // 3 - 1) for k in range(9))


@needs_ext
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ext_forward_backward(device, grid, taps, bias, relu, dtype):
    d = 5 if grid == (2, 7) else 16  # d = 5: no vectorised path on CUDA
    planes, b = _inputs(grid, taps, d, dtype, device, bias=bias, requires_grad=True)
    out = shift_sum_ext(planes, b, grid, relu)
    ref = reference.shift_sum(planes, b, grid, relu)
    atol, rtol = TIGHT[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [planes] + ([b] if bias else []), g)
    grads_ref = torch.autograd.grad(ref, [planes] + ([b] if bias else []), g)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=10 * atol, rtol=10 * rtol)


def _lowp_errors(fn, dtype, device, grid=(3, 5), taps=9, d=24):
    """Max abs error of ``fn`` and of eager PyTorch at ``dtype``, both against the fp32 reference."""
    planes32, b32 = _inputs(grid, taps, d, torch.float32, device)
    planes, b = planes32.to(dtype), b32.to(dtype)
    ref = reference.shift_sum(planes.float(), b.float(), grid, True)
    eager = reference.shift_sum(planes, b, grid, True)
    out = fn(planes, b, grid, True)
    assert out.dtype == dtype and out.shape == ref.shape
    return (out.float() - ref).abs().max().item(), (eager.float() - ref).abs().max().item()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ext_low_precision(device, dtype):
    err, err_eager = _lowp_errors(shift_sum_ext, dtype, device)
    assert err <= 2 * err_eager + 1e-3, (err, err_eager)


@needs_ext
def test_ext_bf16_backward(device):
    grid = (3, 4)
    planes, b = _inputs(grid, 9, 16, torch.bfloat16, device, requires_grad=True)
    b32 = b.detach().float().requires_grad_()  # a fp32 bias with bf16 planes: gradient comes back in fp32
    out = shift_sum_ext(planes, b32, grid, True)
    g = torch.randn_like(out)
    gp, gb = torch.autograd.grad(out, [planes, b32], g)
    p_ref = planes.detach().float().requires_grad_()
    b_ref = b32.detach().clone().requires_grad_()
    ref = reference.shift_sum(p_ref, b_ref, grid, True)
    # the ReLU mask of the bf16 output equals the fp32 one except at values that round to 0
    mask = (out.float() > 0) == (ref > 0)
    gp_ref, gb_ref = torch.autograd.grad(ref, [p_ref, b_ref], g.float() * mask)
    assert gp.dtype == torch.bfloat16 and gb.dtype == torch.float32
    torch.testing.assert_close(gp.float(), gp_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gb, gb_ref, atol=5e-2, rtol=1e-2)


@needs_ext
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_ext_opcheck(device, taps, bias):
    grid = (3, 5)
    planes, b = _inputs(grid, taps, 8, torch.float32, device, bias=bias, requires_grad=True)
    torch.library.opcheck(torch.ops.spvit.shift_sum.default, (planes, b, grid[0], grid[1], True))
    out = torch.ops.spvit.shift_sum.default(planes.detach(), b, grid[0], grid[1], True)
    torch.library.opcheck(
        torch.ops.spvit.shift_sum_backward.default, (torch.randn_like(out), out, grid[0], grid[1], taps, True),
    )


@needs_ext
def test_ext_noncontiguous_and_errors(device):
    grid = (3, 3)
    base = torch.randn(2, 9, 16, 9, device=device)
    planes = base.transpose(2, 3)  # (2, 9, 9, 16) non-contiguous
    b = torch.randn(16, device=device)
    torch.testing.assert_close(shift_sum_ext(planes, b, grid, True), reference.shift_sum(planes, b, grid, True))
    with pytest.raises(ValueError, match="positions"):
        shift_sum_ext(planes, b, (2, 3), True)
    with pytest.raises(RuntimeError, match="taps"):  # the C++ check, past the Python wrapper
        torch.ops.spvit.shift_sum.default(torch.randn(1, 9, 3, 4, device=device), None, 3, 3, False)


@pytest.mark.parametrize("grid,taps,bias,relu", [
    ((3, 5), 9, True, True), ((4, 4), 9, False, False), ((1, 1), 9, True, False), ((2, 3), 1, True, True),
])
def test_triton_forward_backward(device, grid, taps, bias, relu):
    d = 12
    planes, b = _inputs(grid, taps, d, torch.float32, device, bias=bias, requires_grad=True)
    out = shift_sum_triton(planes, b, grid, relu)
    ref = reference.shift_sum(planes, b, grid, relu)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    inputs = [planes] + ([b] if bias else [])
    for got, want in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_triton_bf16(device):
    err, err_eager = _lowp_errors(shift_sum_triton, torch.bfloat16, device, d=16)
    assert err <= 2 * err_eager + 1e-3, (err, err_eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="opcheck of a triton_op needs real CUDA tensors")
def test_triton_opcheck():
    planes, b = _inputs((3, 5), 9, 16, torch.float32, "cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.spvit.shift_sum_triton.default, (planes, b, 3, 5, True))


@pytest.mark.parametrize("provider", ["ext", "triton"])
def test_gradcheck_double_backward(device, provider):
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.skip(f"extension not loaded: {_ext.error()}")
    fn = shift_sum_ext if provider == "ext" else shift_sum_triton
    grid = (2, 3)
    planes, b = _inputs(grid, 9, 3, torch.float64, device, batch=1, requires_grad=True)
    fast = provider == "triton" and device.type == "cpu"  # the Triton interpreter is slow per launch
    torch.autograd.gradcheck(lambda p_, b_: fn(p_, b_, grid, True), (planes, b), fast_mode=fast)
    torch.autograd.gradgradcheck(lambda p_, b_: fn(p_, b_, grid, True), (planes, b), fast_mode=fast)
