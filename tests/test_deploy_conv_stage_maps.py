"""The deployed conv layer on Swin stage maps: no prefix token, square, odd and non-square grids (docs/method.md §7.4:
a deployed Swin 3x3 or 1x1 layer runs on the full (H, W) map of its stage, zero-padded at the image border).

Both providers (the fused Triton kernel and the extension path) against reference.deploy_conv. Channel widths are
small because on CPU the Triton kernel runs under the interpreter; the real Swin-T widths are in tests/test_gpu_ops.py.
"""
import pytest
import torch

from spvit_kernels import _ext, reference
from spvit_kernels.deploy_conv import deploy_conv, deploy_conv_ext

# Swin-T stage maps at 224 px (56, 28, 14, 7), plus non-square and odd ones
GRIDS = [(56, 56), (28, 28), (14, 14), (7, 7), (7, 14), (9, 5)]
PROVIDERS = {"triton": deploy_conv, "ext": deploy_conv_ext}


def _layer(batch, grid, c, d, taps, device, dtype=torch.float32):
    n = grid[0] * grid[1]
    x = torch.randn(batch, n, c, device=device)
    w_planes = torch.randn(taps * d, c, device=device) / c ** 0.5
    b_fold = torch.randn(d, device=device) * 0.5
    w_out = torch.randn(c, d, device=device) / d ** 0.5
    b_out = torch.randn(c, device=device) * 0.1
    return [t.to(dtype) for t in (x, w_planes, b_fold, w_out, b_out)]


def _need(provider):
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.skip(f"extension not loaded: {_ext.error()}")


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("grid", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
def test_stage_map_fp32(device, grid, taps, provider):
    _need(provider)
    args = _layer(1 if grid[0] * grid[1] > 1000 else 2, grid, 16, 8, taps, device)
    with torch.no_grad():
        out = PROVIDERS[provider](*args, grid, num_prefix_tokens=0)
    ref = reference.deploy_conv(*args, grid, num_prefix_tokens=0)
    assert out.shape == ref.shape == args[0].shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_border_is_zero_padded(device):
    """A 3x3 whose only nonzero tap reads the left neighbour: the first column sees zeros (no wrap-around from the
    previous row, as a flat token index would give)."""
    grid, c, d = (7, 14), 4, 4
    x, _, _, _, _ = _layer(1, grid, c, d, 9, device)
    w_planes = torch.zeros(9 * d, c, device=device)
    k_left = 1  # tap k reads offset (k % 3 - 1, k // 3 - 1): k = 1 is (0, -1), the left neighbour
    w_planes[k_left * d:(k_left + 1) * d] = torch.eye(d, c, device=device)
    b_fold = torch.zeros(d, device=device)
    w_out = torch.eye(c, d, device=device)
    with torch.no_grad():
        out = deploy_conv(x, w_planes, b_fold, w_out, None, grid, num_prefix_tokens=0)
    img_in = x.view(grid[0], grid[1], c)
    img_out = out.view(grid[0], grid[1], c)
    assert torch.equal(img_out[:, 0], torch.zeros_like(img_out[:, 0]))
    torch.testing.assert_close(img_out[:, 1:], torch.relu(img_in[:, :-1]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stage_map_low_precision(device, provider, dtype):
    """bf16/fp16 on a 28x28 map: error vs the fp64 reference at most 2x eager's at the same dtype."""
    _need(provider)
    grid = (28, 28)
    args = _layer(2, grid, 16, 8, 9, device, dtype)
    exact = reference.deploy_conv(*[a.double() for a in args], grid, 0)
    eager = reference.deploy_conv(*args, grid, 0)
    with torch.no_grad():
        out = PROVIDERS[provider](*args, grid, num_prefix_tokens=0)
    assert out.dtype == dtype

    def rms(a):
        return ((a.double() - exact) ** 2).mean().sqrt().item()
    assert rms(out) <= 2 * rms(eager) + 1e-3 * torch.finfo(dtype).eps * exact.abs().max().item(), \
        (rms(out), rms(eager))


def test_ext_backward_stage_map(device):
    """The extension path is differentiable: every gradient at (7, 7) without a prefix token equals the reference's."""
    _need("ext")
    grid = (7, 7)
    args = [a.double().requires_grad_() for a in _layer(2, grid, 12, 4, 9, device)]
    out = deploy_conv_ext(*args, grid, 0)
    ref = reference.deploy_conv(*args, grid, 0)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(ref, args, g)):
        torch.testing.assert_close(got, want)
