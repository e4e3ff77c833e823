"""Search-mode masked FFN (spvit_kernels.masked_ffn) against the eager reference ``reference.masked_ffn``.

On CPU the Triton kernels run under the interpreter (tests/conftest.py), so shapes stay small; they still cover
several token tiles, hidden-unit tiles and K steps with ragged tails (token counts 197/65/50, widths 37/100).
"""
import functools
import inspect

import pytest
import torch

import spvit_kernels
from spvit_kernels import reference
from spvit_kernels.masked_ffn import masked_ffn, masked_ffn_with_fc2

# (B, N, C, F): awkward token counts and hidden widths (37, 100 not multiples of 16; 96 = 4C like DeiT's 1536).
SHAPES = [(2, 65, 64, 100), (1, 197, 48, 37), (3, 50, 24, 96)]
# fp32: (atol, rtol) against the fp32 reference. bf16/fp16: the kernel's error against an fp64 reference may be at
# most RATIO x eager PyTorch's error at the same dtype, plus FLOOR x max|reference|.
FP32_TOL = (1e-4, 1e-4)
RATIO, FLOOR = 2.0, 1e-3
NAMES = ("y", "dx", "dw1", "db1", "dw2", "db2", "dmask")


def make_inputs(shape, dtype, device, mask_kind="mixed", bias=True):
    b, n, c, f = shape
    x = torch.randn(b, n, c, device=device)
    w1 = torch.randn(f, c, device=device) / c ** 0.5
    w2 = torch.randn(c, f, device=device) / f ** 0.5
    b1 = 0.5 * torch.randn(f, device=device) if bias else None
    b2 = 0.5 * torch.randn(c, device=device) if bias else None
    if mask_kind == "mixed":
        mask = (torch.arange(f, device=device) % 3 != 1).float()  # deterministic mix: 1, 0, 1, 1, 0, 1, ...
        mask = mask[torch.randperm(f, device=device)]
    elif mask_kind == "zeros":
        mask = torch.zeros(f, device=device)
    else:
        mask = torch.ones(f, device=device)
    tensors = [x, w1, b1, w2, b2]
    tensors = [t.to(dtype).requires_grad_() if t is not None else None for t in tensors]
    return tensors + [mask.requires_grad_()]


def run(fn, inputs, dy, approximate="none"):
    """Output and the gradient of every input that requires grad (None for absent biases)."""
    y = fn(*inputs, approximate=approximate)
    live = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, live, dy))
    return [y] + [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def cast(inputs, dtype):
    """Fresh leaf copies at ``dtype``; the mask keeps its own dtype except for the fp64 reference."""
    out = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None else None for t in inputs[:-1]]
    mask = inputs[-1].detach()
    return out + [mask.to(torch.float64 if dtype == torch.float64 else mask.dtype).requires_grad_(inputs[-1].requires_grad)]


def check(inputs, approximate="none", fc2=None):
    """Compare masked_ffn (or masked_ffn_with_fc2 for a given fc2) with the reference: output and every gradient."""
    dtype = inputs[0].dtype
    dy = torch.randn_like(inputs[0])
    fn = masked_ffn if fc2 is None else functools.partial(masked_ffn_with_fc2, fc2=fc2)
    ours = run(fn, inputs, dy, approximate)
    if dtype == torch.float32:
        ref = run(reference.masked_ffn, cast(inputs, dtype), dy, approximate)
        for name, a, r in zip(NAMES, ours, ref):
            if r is None:
                assert a is None, name
                continue
            assert a.dtype == r.dtype and a.shape == r.shape, name
            torch.testing.assert_close(a, r, atol=FP32_TOL[0], rtol=FP32_TOL[1], msg=lambda m: f"{name}: {m}")
        return ours
    ref64 = run(reference.masked_ffn, cast(inputs, torch.float64), dy.double(), approximate)
    eager = run(reference.masked_ffn, cast(inputs, dtype), dy, approximate)
    for name, a, e, r in zip(NAMES, ours, eager, ref64):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        err = (a.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        bound = RATIO * err_eager + FLOOR * r.abs().max().item()
        assert err <= bound, f"{name} ({dtype}): error {err:.3g} > bound {bound:.3g} (eager error {err_eager:.3g})"
    return ours


def test_signature_matches_reference():
    ours, ref = inspect.signature(masked_ffn), inspect.signature(reference.masked_ffn)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in ref.parameters.values()]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(shape, dtype, approximate, device):
    inputs = make_inputs(shape, dtype, device)
    ours = check(inputs, approximate)
    dmask, mask = ours[-1], inputs[-1].detach()
    # The gate gradient of masked-out units is real (sum of a * dh), not zero.
    assert dmask[mask == 0].abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["zeros", "ones"])
def test_mask_all_zero_or_one(mask_kind, dtype, device):
    ours = check(make_inputs((2, 65, 48, 37), dtype, device, mask_kind))
    if mask_kind == "zeros":
        assert ours[2].abs().max() == 0 and ours[4].abs().max() == 0  # dx, dw2 exactly zero: h = 0, da = 0
        assert ours[-1].abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fc2_triton(dtype, device):
    check(make_inputs((2, 65, 64, 100), dtype, device), fc2="triton")


def test_no_bias(device):
    check(make_inputs((1, 197, 48, 37), torch.float32, device, bias=False))


def test_mask_without_grad(device):
    inputs = make_inputs((2, 50, 48, 37), torch.float32, device)
    inputs[-1] = inputs[-1].detach()
    check(inputs)


def test_leading_shapes_and_non_contiguous(device):
    x, w1, b1, w2, b2, mask = make_inputs((2, 50, 48, 37), torch.float32, device)
    x4 = x.detach().reshape(2, 5, 10, 48).requires_grad_()
    xt = x.detach().transpose(0, 1).requires_grad_()  # (50, 2, 48), non-contiguous
    w1t = w1.detach().t().contiguous().t().requires_grad_()  # (37, 48) with transposed strides
    for inputs in ([x4, w1, b1, w2, b2, mask], [xt, w1t, b1, w2, b2, mask], [x[0].detach(), w1, b1, w2, b2, mask]):
        check(inputs)


@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_without_autograd(ctx, device):
    inputs = [t.detach() if t is not None else None for t in make_inputs((2, 65, 64, 100), torch.float32, device)]
    with getattr(torch, ctx)():
        y = masked_ffn(*inputs)
    assert not y.requires_grad
    torch.testing.assert_close(y, reference.masked_ffn(*inputs), atol=FP32_TOL[0], rtol=FP32_TOL[1])


def test_straight_through_mask_through_dispatcher(device):
    """spvit_kernels.ops.masked_ffn with the triton backend; the gate gradient reaches the thresholds (STE, §2.3)."""
    x, w1, b1, w2, b2, _ = make_inputs((2, 65, 48, 37), torch.float32, device)
    theta = torch.randn(37, device=device, requires_grad=True)
    dy = torch.randn_like(x)

    def loss_grads(fn):
        p = torch.sigmoid(theta)
        hard = (p > 0.5).float()
        mask = hard + p - p.detach()
        y = fn(x, w1, b1, w2, b2, mask)
        return [y] + list(torch.autograd.grad(y, [x, w1, b1, w2, b2, theta], dy))

    with spvit_kernels.use_backend("triton"):
        assert spvit_kernels.backend_of("masked_ffn", x.device) == "triton"
        ours = loss_grads(spvit_kernels.ops.masked_ffn)
    ref = loss_grads(reference.masked_ffn)
    for name, a, r in zip(NAMES[:-1] + ("dtheta",), ours, ref):
        torch.testing.assert_close(a, r, atol=FP32_TOL[0], rtol=FP32_TOL[1], msg=lambda m: f"{name}: {m}")


def test_autocast(device):
    inputs = make_inputs((2, 50, 48, 37), torch.float32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = masked_ffn(*inputs)
        y_ref = reference.masked_ffn(*inputs)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    ref64 = reference.masked_ffn(*cast(inputs, torch.float64))
    err, err_eager = (y.double() - ref64).abs().max(), (y_ref.double() - ref64).abs().max()
    assert err <= RATIO * err_eager + FLOOR * ref64.abs().max()
    g = torch.autograd.grad(y.float().sum(), inputs[0])[0]
    assert g.dtype == torch.float32 and g.abs().max() > 0


def test_compile(device):
    """torch.compile traces the op (triton_op on GPU; an opaque custom_op under the interpreter) and its backward."""
    inputs = make_inputs((2, 65, 48, 37), torch.float32, device)
    dy = torch.randn_like(inputs[0])
    compiled = torch.compile(masked_ffn, backend="aot_eager", fullgraph=True)
    ours = run(compiled, inputs, dy)
    ref = run(reference.masked_ffn, cast(inputs, torch.float32), dy)
    for name, a, r in zip(NAMES, ours, ref):
        torch.testing.assert_close(a, r, atol=FP32_TOL[0], rtol=FP32_TOL[1], msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor lowering of the Triton kernels needs a CUDA GPU")
def test_compile_inductor_gpu():
    """On GPU the op is a triton_op: inductor traces into the Triton kernels (forward and backward), bf16."""
    inputs = make_inputs((4, 197, 64, 100), torch.bfloat16, torch.device("cuda"))
    dy = torch.randn_like(inputs[0])
    compiled = torch.compile(masked_ffn, fullgraph=True)
    ours = run(compiled, inputs, dy)
    eager = run(masked_ffn, cast(inputs, torch.bfloat16), dy)
    for name, a, e in zip(NAMES, ours, eager):
        torch.testing.assert_close(a, e, atol=1e-2, rtol=1e-2, msg=lambda m: f"{name}: {m}")


def test_opcheck(device):
    x, w1, b1, w2, b2, mask = make_inputs((1, 50, 32, 37), torch.float32, device)
    x2 = x.detach().reshape(-1, 32).requires_grad_()
    torch.library.opcheck(torch.ops.spvit.masked_ffn.default, (x2, w1, b1, w2, b2, mask, "none", True, "cublas"))
    no_grad = [t.detach() for t in (x2, w1, w2, mask)]  # save_preact=False: only valid without a backward
    torch.library.opcheck(torch.ops.spvit.masked_ffn.default,
                          (no_grad[0], no_grad[1], None, no_grad[2], None, no_grad[3], "tanh", False, "triton"))
    z = torch.randn(50, 37, device=device)
    dy = torch.randn(50, 32, device=device)
    torch.library.opcheck(torch.ops.spvit.masked_ffn_backward.default,
                          (dy, no_grad[0], no_grad[1], no_grad[2], no_grad[3], z, "none"))


def test_errors(device):
    x, w1, b1, w2, b2, mask = make_inputs((1, 50, 32, 37), torch.float32, device)
    with pytest.raises(ValueError, match="approximate"):
        masked_ffn(x, w1, b1, w2, b2, mask, approximate="sigmoid")
    with pytest.raises(TypeError, match="dtype"):
        masked_ffn(x, w1.double(), b1, w2, b2, mask)
    with pytest.raises(ValueError, match="mask"):
        masked_ffn(x, w1, b1, w2, b2, mask[:-1])
    with pytest.raises(ValueError, match="shape"):
        masked_ffn(x, w1, b1, w2.t(), b2, mask)
    with pytest.raises(ValueError, match="fc2"):
        masked_ffn_with_fc2(x, w1, b1, w2, b2, mask, fc2="cutlass")
