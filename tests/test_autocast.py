"""Every op, the supernet step and the deployed forward under ``torch.autocast`` (bf16 and fp16).

Inputs and parameters are fp32 (as in mixed-precision training); our kernels and the eager reference both run under the
same autocast, and both are compared with an fp64 reference run without autocast. The kernels' error (RMS over the
tensor) must be at most twice eager's, plus a small floor; outputs must have eager's dtype and gradients the dtype of
their (fp32) leaves. The fused attention layer's autocast tests live in ``test_gated_attn_conv.py``.
"""
import copy

import pytest
import torch

import spvit
import spvit_kernels as K
from spvit_kernels import _ext, reference
from spvit_kernels.deploy_conv import deploy_conv, deploy_conv_ext
from spvit_kernels.masked_ffn import masked_ffn
from spvit_kernels.pruned_ffn import pruned_ffn
from spvit_kernels.shift_sum import shift_sum_ext, shift_sum_triton
from tests.helpers import randomise_bn, randomise_head_probs, tiny_vit

DTYPES = [torch.bfloat16, torch.float16]
FLOOR = 1e-3  # relative to the reference's RMS: rounding of the final cast alone


def _rms(a, ref):
    return ((a.double() - ref.double()) ** 2).mean().sqrt().item()


def _leaves(inputs, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in inputs]


def _run(fn, inputs, dy, autocast_dtype=None):
    """fn(*inputs) (under autocast if given) and the gradients of the inputs that require grad."""
    leaves = _leaves(inputs)
    if autocast_dtype is None:
        y = fn(*leaves)
    else:
        with torch.autocast(leaves[0].device.type, dtype=autocast_dtype):
            y = fn(*leaves)
    live = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, live, dy.to(y.dtype)) if live else ()
    return y, list(grads)


def _check(ours_fn, ref_fn, inputs, dtype, ratio=2.0):
    """ours and eager under autocast(dtype) vs fp64 eager: dtypes equal, error <= ratio x eager's + floor."""
    dy = torch.randn_like(ref_fn(*_leaves(inputs)).float())
    exact, exact_g = _run(ref_fn, [None if t is None else t.double() for t in inputs], dy.double())
    eager, eager_g = _run(ref_fn, inputs, dy, dtype)
    ours, ours_g = _run(ours_fn, inputs, dy, dtype)
    assert ours.dtype == eager.dtype, (ours.dtype, eager.dtype)
    pairs = [("out", ours, eager, exact)] + [(f"grad {i}", a, b, c) for i, (a, b, c) in
                                             enumerate(zip(ours_g, eager_g, exact_g))]
    for name, a, e, r in pairs:
        assert a.dtype == e.dtype, name
        scale = (r.double() ** 2).mean().sqrt().item()
        err, err_eager = _rms(a, r), _rms(e, r)
        assert err <= ratio * err_eager + FLOOR * scale, f"{name} ({dtype}): {err:.3g} vs eager {err_eager:.3g}"
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_ffn(device, dtype):
    x, w1, b1, w2, b2 = (torch.randn(*s, device=device) * sc for s, sc in
                         (((2, 50, 48), 1.0), ((37, 48), 0.15), ((37,), 0.5), ((48, 37), 0.15), ((48,), 0.5)))
    mask = (torch.rand(37, device=device) > 0.3).float()
    inputs = [t.requires_grad_() for t in (x, w1, b1, w2, b2, mask)]
    _check(masked_ffn, reference.masked_ffn, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_ffn_inference(device, dtype):
    x, w1, b1, w2, b2 = (torch.randn(*s, device=device) * sc for s, sc in
                         (((2, 50, 48), 1.0), ((37, 48), 0.15), ((37,), 0.5), ((48, 37), 0.15), ((48,), 0.5)))
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        ours = pruned_ffn(x, w1, b1, w2, b2)
        eager = reference.pruned_ffn(x, w1, b1, w2, b2)
    exact = reference.pruned_ffn(*(t.double() for t in (x, w1, b1, w2, b2)))
    assert ours.dtype == eager.dtype == dtype
    assert _rms(ours, exact) <= 2 * _rms(eager, exact) + FLOOR * exact.abs().mean().item()


def _conv_layer(device, taps=9, prefix=1, grid=(4, 5), c=32, d=16, b=2):
    n = prefix + grid[0] * grid[1]
    return [torch.randn(b, n, c, device=device), torch.randn(taps * d, c, device=device) / c ** 0.5,
            0.5 * torch.randn(d, device=device), torch.randn(c, d, device=device) / d ** 0.5,
            torch.randn(c, device=device)]


@pytest.mark.parametrize("provider", ["triton", "ext"])
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_deploy_conv(device, provider, taps, dtype):
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.skip(f"extension not built: {_ext.error()}")
    grid = (4, 5)
    inputs = _conv_layer(device, taps, grid=grid)
    ref = lambda *a: reference.deploy_conv(*a, grid, 1)  # noqa: E731
    if provider == "triton":  # inference kernel
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            ours, eager = deploy_conv(*inputs, grid, 1), ref(*inputs)
        exact = ref(*(t.double() for t in inputs))
        assert ours.dtype == eager.dtype == dtype
        assert _rms(ours, exact) <= 2 * _rms(eager, exact) + FLOOR * exact.abs().mean().item()
    else:  # the extension path is differentiable
        _check(lambda *a: deploy_conv_ext(*a, grid, 1), ref, [t.requires_grad_() for t in inputs], dtype)


@pytest.mark.parametrize("provider", ["triton", "ext"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shift_sum_after_autocast_matmul(device, provider, dtype):
    """The shift-sum fed by a matmul under autocast (its planes arrive in the autocast dtype, its bias in fp32)."""
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.skip(f"extension not built: {_ext.error()}")
    fn = {"triton": shift_sum_triton, "ext": shift_sum_ext}[provider]
    grid = (3, 4)
    x = torch.randn(2, 12, 24, device=device, requires_grad=True)
    w = (torch.randn(9 * 8, 24, device=device) / 5).requires_grad_()
    bias = torch.randn(8, device=device, requires_grad=True)

    def layer(op):
        return lambda x, w, bias: op((x @ w.t()).reshape(2, 12, 9, 8), bias, grid, True)

    _check(layer(fn), layer(reference.shift_sum), [x, w, bias], dtype)


def _supernet(device):
    torch.manual_seed(0)
    sn = spvit.supernet(tiny_vit(img=32, patch=8, dim=32, depth=2, heads=2, mlp_ratio=1.5)).to(device).train()
    randomise_head_probs(sn, 0)
    return sn


@pytest.mark.parametrize("dtype", DTYPES)
def test_supernet_step(device, dtype):
    """One search step (task loss + FLOPs loss) under autocast: the fused backend's loss and every parameter gradient
    are within 2x the eager backend's error, both against an fp64 eager step with the same gate samples."""
    sn = _supernet(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (4,), device=device)

    def step(backend, autocast, double=False):
        net = copy.deepcopy(sn)
        if double:
            net = net.double()
        torch.manual_seed(7)  # same gate samples everywhere
        with K.use_backend(backend), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            logits = net(x.double() if double else x)
            loss = torch.nn.functional.cross_entropy(logits.float() if not double else logits, y)
            loss = loss + net.flops_loss(0.8 * net.dense_gflops(), 2.0)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}

    exact, g_exact = step("eager", False, double=True)
    eager, g_eager = step("eager", True)
    ours, g_ours = step("triton", True)
    assert g_ours.keys() == g_eager.keys() == g_exact.keys()
    assert _rms(ours, exact) <= 2 * _rms(eager, exact) + FLOOR * exact.abs().item()
    for n in g_exact:
        assert g_ours[n].dtype == torch.float32, n
        scale = (g_exact[n] ** 2).mean().sqrt().item()
        err, err_eager = _rms(g_ours[n], g_exact[n]), _rms(g_eager[n], g_exact[n])
        assert err <= 2 * err_eager + 1e-2 * scale, f"{n}: {err:.3g} vs eager {err_eager:.3g}"


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_deployed_forward(device, backend, dtype):
    """A deployed model (fp32 weights) under autocast: as accurate as its pruned model under the same autocast."""
    sn = _supernet(device).eval()
    randomise_bn(sn)
    arch = sn.architecture()
    pruned = spvit.prune(tiny_vit(img=32, patch=8, dim=32, depth=2, heads=2, mlp_ratio=1.5), arch).to(device)
    randomise_bn(pruned)
    pruned.eval()
    deployed = spvit.deploy(pruned)
    x = torch.randn(3, 3, 32, 32, device=device)
    with torch.no_grad():
        exact = copy.deepcopy(pruned).double()(x.double())
        with torch.autocast(device.type, dtype=dtype):
            eager = pruned(x)
            with K.use_backend(backend):
                ours = deployed(x)
    assert ours.dtype == eager.dtype
    assert _rms(ours, exact) <= 2 * _rms(eager, exact) + FLOOR * exact.abs().mean().item()
