"""Tests of the deployed conv layer: fused Triton kernel and extension path vs reference.deploy_conv."""
import pytest
import torch

from spvit_kernels import _ext, reference
from spvit_kernels.deploy_conv import deploy_conv, deploy_conv_ext

needs_ext = pytest.mark.skipif(not _ext.has_op("shift_sum"), reason=f"extension not loaded: {_ext.error()}")


def _layer(batch, grid, c, d, taps, prefix, dtype, device, bias_out=True):
    hh, ww = grid
    n = prefix + hh * ww
    x = torch.randn(batch, n, c, device=device)
    w_planes = torch.randn(taps * d, c, device=device) / c ** 0.5
    b_fold = torch.randn(d, device=device) * 0.5
    w_out = torch.randn(c, d, device=device) / d ** 0.5
    b_out = torch.randn(c, device=device) if bias_out else None
    return [t.to(dtype) if t is not None else None for t in (x, w_planes, b_fold, w_out, b_out)]


# (grid, C, d): awkward grids and widths (C, d not multiples of 16)
SHAPES = [((3, 5), 24, 8), ((4, 4), 32, 16), ((1, 1), 16, 4), ((5, 2), 20, 12), ((2, 3), 80, 8)]  # C = 80: K, N loops


@pytest.mark.parametrize("provider", ["triton", "ext"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("prefix", [1, 0])
def test_fp32(device, provider, shape, taps, prefix):
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.skip(f"extension not loaded: {_ext.error()}")
    grid, c, d = shape
    fn = deploy_conv if provider == "triton" else deploy_conv_ext
    args = _layer(2, grid, c, d, taps, prefix, torch.float32, device, bias_out=shape != SHAPES[1])
    out = fn(*args, grid, num_prefix_tokens=prefix)
    ref = reference.deploy_conv(*args, grid, num_prefix_tokens=prefix)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if prefix:
        assert torch.equal(out[:, :prefix], args[0][:, :prefix])


@pytest.mark.parametrize("provider", ["triton", "ext"])
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, provider, taps, dtype):
    """Error vs the fp32 reference at most ~2x the error of eager PyTorch at the same dtype."""
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.skip(f"extension not loaded: {_ext.error()}")
    fn = deploy_conv if provider == "triton" else deploy_conv_ext
    grid, c, d = (4, 5), 32, 16
    args = _layer(2, grid, c, d, taps, 1, dtype, device)
    ref = reference.deploy_conv(*[a.float() for a in args], grid)
    eager = reference.deploy_conv(*args, grid)
    out = fn(*args, grid)
    assert out.dtype == dtype
    err = (out.float() - ref).abs().max().item()
    err_eager = (eager.float() - ref).abs().max().item()
    assert err <= 2 * err_eager + 1e-2, (err, err_eager)


def test_triton_autograd_falls_back_to_reference(device):
    grid = (3, 3)
    x, wp, bf, wo, bo = _layer(2, grid, 16, 8, 9, 1, torch.float32, device)
    wp.requires_grad_()
    out = deploy_conv(x, wp, bf, wo, bo, grid)
    assert out.requires_grad
    (g,) = torch.autograd.grad(out.sum(), wp)
    wp_ref = wp.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(reference.deploy_conv(x, wp_ref, bf, wo, bo, grid).sum(), wp_ref)
    torch.testing.assert_close(g, g_ref)


def test_triton_rejects_bad_shapes(device):
    x, wp, bf, wo, bo = _layer(1, (3, 3), 16, 8, 9, 1, torch.float32, device)
    with torch.no_grad():
        with pytest.raises(ValueError, match="tokens"):
            deploy_conv(x, wp, bf, wo, bo, (2, 3))
        with pytest.raises(ValueError, match="w_out"):
            deploy_conv(x, wp, bf, wo[:, :4], bo, (3, 3))


@needs_ext
def test_ext_backward(device):
    grid = (3, 4)
    args = _layer(2, grid, 16, 8, 9, 1, torch.float64, device)
    for a in args:
        a.requires_grad_()
    out = deploy_conv_ext(*args, grid)
    ref = reference.deploy_conv(*args, grid)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(ref, args, g)):
        torch.testing.assert_close(got, want)


def test_opcheck_and_autotune_key(device):
    """``spvit::deploy_conv`` passes opcheck; its autotuner keys on the batch bucket (a batch-1 choice is not reused at
    batch 256)."""
    from spvit_kernels.deploy_conv import _deploy_conv_fwd_tuned
    assert "B_BUCKET" in _deploy_conv_fwd_tuned.keys and "C" in _deploy_conv_fwd_tuned.keys
    x, wp, bf, wo, bo = _layer(2, (3, 4), 16, 8, 9, 1, torch.float32, device)
    torch.library.opcheck(torch.ops.spvit.deploy_conv.default, (x, wp, bf, wo, bo, 3, 4, 1))
    torch.library.opcheck(torch.ops.spvit.deploy_conv.default, (x[:, 1:].contiguous(), wp[:8], bf, wo, None, 3, 4, 0))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("grid", [(7, 7), (8, 8), (14, 14)], ids=["50tok", "65tok", "197tok"])
def test_triton_awkward_batch_and_token_counts(device, batch, grid):
    """Tiles over batch x positions cross image boundaries: batch 1 and 3 at 50, 65 and 197 tokens (prefix 1)."""
    for taps in (9, 1):
        args = _layer(batch, grid, 16, 8, taps, 1, torch.float32, device)
        out = deploy_conv(*args, grid, num_prefix_tokens=1)
        torch.testing.assert_close(out, reference.deploy_conv(*args, grid, num_prefix_tokens=1), atol=1e-5, rtol=1e-5)


def test_triton_tiles_run_over_batch_times_positions(device, monkeypatch):
    """One launch axis over the B*P (image, position) rows: ceil(B*P / BLOCK_M) programs, none per image."""
    from spvit_kernels import deploy_conv as dc
    if device.type == "cuda":
        pytest.skip("inspects the interpreter's launch")
    kern = dc._deploy_conv_fwd_kernel
    grids = []
    orig = type(kern).run

    def run(self, *a, grid, warmup, **kw):
        grids.append((grid, kw["BLOCK_M"]))
        return orig(self, *a, grid=grid, warmup=warmup, **kw)

    monkeypatch.setattr(type(kern), "run", run)
    args = _layer(3, (7, 7), 16, 8, 1, 1, torch.float32, device)
    deploy_conv(*args, (7, 7), num_prefix_tokens=1)
    (grid, bm), = grids
    assert tuple(grid) == (-(-3 * 49 // bm),)


def test_autotune_switch(monkeypatch):
    """SPVIT_AUTOTUNE=0 pins one config (read once; set_autotune changes it); the tests run pinned."""
    from spvit_kernels import _compat
    try:
        monkeypatch.setenv("SPVIT_AUTOTUNE", "0")
        _compat.set_autotune(None)
        assert not _compat.autotune_enabled()
        monkeypatch.setenv("SPVIT_AUTOTUNE", "1")
        assert not _compat.autotune_enabled()  # read once
        _compat.set_autotune(None)
        assert _compat.autotune_enabled()
        _compat.set_autotune(False)
        assert not _compat.autotune_enabled()
    finally:
        monkeypatch.undo()
        _compat.set_autotune(None)
    assert not _compat.autotune_enabled()  # tests/conftest.py pins configs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_autotuned_launch_on_gpu():
    """The autotuned path (off in the other tests) on one DeiT-like layer."""
    from spvit_kernels import _compat
    args = _layer(2, (14, 14), 384, 64, 9, 1, torch.bfloat16, torch.device("cuda"))
    _compat.set_autotune(True)
    try:
        out = deploy_conv(*args, (14, 14))
    finally:
        _compat.set_autotune(None)
    pinned = deploy_conv(*args, (14, 14))
    torch.testing.assert_close(out, pinned, atol=2e-2, rtol=2e-2)
