"""Deploy-mode compact FFN (spvit_kernels.pruned_ffn) against the eager reference ``reference.pruned_ffn``.

On CPU the Triton kernels run under the interpreter (tests/conftest.py), so shapes stay small; pruned widths are
deliberately awkward (1, 37, 100: not multiples of 16) and token counts are 197/65/50.
"""
import inspect

import pytest
import torch

import spvit_kernels
from spvit_kernels import reference
from spvit_kernels._gemm import linear_act
from spvit_kernels.pruned_ffn import _HIDDEN_ROW_ALIGN, pruned_ffn, pruned_ffn_with_fc2

# (B, N, C, F) with F the compacted hidden width.
SHAPES = [(2, 65, 64, 100), (1, 197, 48, 37), (3, 50, 24, 1)]
FP32_TOL = (1e-4, 1e-4)
RATIO, FLOOR = 2.0, 1e-3  # low precision: error vs fp64 <= RATIO x eager's error + FLOOR x max|reference|


def make_inputs(shape, dtype, device, bias=True):
    b, n, c, f = shape
    x = torch.randn(b, n, c, device=device)
    w1 = torch.randn(f, c, device=device) / c ** 0.5
    w2 = torch.randn(c, f, device=device) / max(f, 1) ** 0.5
    b1 = 0.5 * torch.randn(f, device=device) if bias else None
    b2 = 0.5 * torch.randn(c, device=device) if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, w1, b1, w2, b2)]


def cast(inputs, dtype):
    return [t.to(dtype) if t is not None else None for t in inputs]


def check(inputs, approximate="none", fc2=None):
    """Compare pruned_ffn (or pruned_ffn_with_fc2 for a given fc2) with the reference under inference_mode."""
    dtype = inputs[0].dtype
    with torch.inference_mode():
        if fc2 is None:
            y = pruned_ffn(*inputs, approximate=approximate)
        else:
            y = pruned_ffn_with_fc2(*inputs, approximate=approximate, fc2=fc2)
        ref = reference.pruned_ffn(*inputs, approximate=approximate)
        ref64 = reference.pruned_ffn(*cast(inputs, torch.float64), approximate=approximate)
    assert y.dtype == dtype and y.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=FP32_TOL[0], rtol=FP32_TOL[1])
        return y
    err, err_eager = (y.double() - ref64).abs().max().item(), (ref.double() - ref64).abs().max().item()
    bound = RATIO * err_eager + FLOOR * ref64.abs().max().item()
    assert err <= bound, f"{dtype}: error {err:.3g} > bound {bound:.3g} (eager error {err_eager:.3g})"
    return y


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floating tensors, as uninitialised memory may: a result must never depend
    on memory the kernels do not write."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def test_signature_matches_reference():
    ours, ref = inspect.signature(pruned_ffn), inspect.signature(reference.pruned_ffn)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in ref.parameters.values()]


@pytest.mark.parametrize("fc2", ["triton", "cublas"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward(shape, dtype, approximate, fc2, device, nan_empty):
    check(make_inputs(shape, dtype, device), approximate, fc2=fc2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_padding_is_zero(dtype, device, nan_empty):
    """The hidden activation's row padding is zeros: the CPU bf16 GEMM of some torch versions reads a row-strided
    operand up to its row stride (multiplying the tail by zero), so NaN garbage there would poison fc2's output."""
    x, w1, b1, _, _ = make_inputs((1, 70, 32, 37), dtype, device)
    with torch.inference_mode():
        h, _ = linear_act(x[0], w1, b1, 1, row_align=_HIDDEN_ROW_ALIGN)
    assert h.shape == (70, 37) and h.stride(0) == _HIDDEN_ROW_ALIGN
    padded = h.as_strided((70, _HIDDEN_ROW_ALIGN), (h.stride(0), 1))
    assert torch.isfinite(h).all()
    assert (padded[:, 37:] == 0).all()


@pytest.mark.parametrize("fc2", ["triton", "cublas"])
def test_zero_width_and_no_bias(fc2, device):
    """Every unit pruned: the output is b2 everywhere; and the no-bias variant."""
    x, w1, b1, w2, b2 = make_inputs((2, 50, 48, 0), torch.float32, device)
    with torch.no_grad():
        y = pruned_ffn_with_fc2(x, w1, b1, w2, b2, fc2=fc2)
    torch.testing.assert_close(y, b2.expand_as(y), atol=0, rtol=0)
    check(make_inputs((1, 197, 48, 37), torch.float32, device, bias=False), fc2=fc2)


def test_leading_shapes_and_non_contiguous(device):
    x, w1, b1, w2, b2 = make_inputs((2, 50, 48, 37), torch.float32, device)
    w2_strided = w2.t().contiguous().t()
    for inputs in ([x.reshape(2, 5, 10, 48), w1, b1, w2, b2], [x.transpose(0, 1), w1, b1, w2_strided, b2],
                   [x[0], w1, b1, w2, b2]):
        check(inputs)


def test_no_grad_uses_kernels(device, monkeypatch):
    """Under no_grad the reference must not run (the kernels do), and no autograd graph is built."""
    inputs = make_inputs((2, 65, 64, 100), torch.float32, device)
    inputs = [t.requires_grad_() for t in inputs]
    expected = reference.pruned_ffn(*inputs).detach()

    def boom(*args, **kwargs):
        raise AssertionError("reference.pruned_ffn called on the inference path")

    monkeypatch.setattr(reference, "pruned_ffn", boom)
    with torch.no_grad():
        y = pruned_ffn(*inputs)
    assert not y.requires_grad
    torch.testing.assert_close(y, expected, atol=FP32_TOL[0], rtol=FP32_TOL[1])


def test_grad_falls_back_to_reference(device):
    """With grad enabled and inputs requiring grad, the result is differentiable and every gradient is right."""
    inputs = [t.requires_grad_() for t in make_inputs((1, 65, 48, 37), torch.float32, device)]
    y = pruned_ffn(*inputs)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_inputs = [t.detach().requires_grad_() for t in inputs]
    y_ref = reference.pruned_ffn(*ref_inputs)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, dy)
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


def test_dispatcher(device):
    inputs = make_inputs((2, 65, 48, 37), torch.float32, device)
    with spvit_kernels.use_backend("triton"), torch.inference_mode():
        assert spvit_kernels.backend_of("pruned_ffn", inputs[0].device) == "triton"
        y = spvit_kernels.ops.pruned_ffn(*inputs, approximate="tanh")
    torch.testing.assert_close(y, reference.pruned_ffn(*inputs, approximate="tanh"), atol=FP32_TOL[0], rtol=FP32_TOL[1])


def test_compile(device):
    inputs = make_inputs((2, 65, 48, 37), torch.float32, device)
    compiled = torch.compile(pruned_ffn, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        y = compiled(*inputs)
    torch.testing.assert_close(y, reference.pruned_ffn(*inputs), atol=FP32_TOL[0], rtol=FP32_TOL[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor lowering of the Triton kernels needs a CUDA GPU")
def test_compile_inductor_gpu():
    inputs = make_inputs((4, 197, 64, 37), torch.bfloat16, torch.device("cuda"))
    compiled = torch.compile(pruned_ffn, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(*inputs), pruned_ffn(*inputs), atol=1e-2, rtol=1e-2)


def test_opcheck(device):
    x, w1, b1, w2, b2 = make_inputs((1, 50, 32, 37), torch.float32, device)
    x2 = x.reshape(-1, 32)
    for fc2 in ("triton", "cublas"):
        torch.library.opcheck(torch.ops.spvit.pruned_ffn.default, (x2, w1, b1, w2, b2, "none", fc2))
        torch.library.opcheck(torch.ops.spvit.pruned_ffn.default, (x2, w1, None, w2, None, "tanh", fc2))


def test_errors(device):
    x, w1, b1, w2, b2 = make_inputs((1, 50, 32, 37), torch.float32, device)
    with pytest.raises(ValueError, match="approximate"):
        pruned_ffn(x, w1, b1, w2, b2, approximate="relu")
    with pytest.raises(TypeError, match="dtype"):
        pruned_ffn(x, w1, b1, w2.half(), b2)
    with pytest.raises(ValueError, match="shape"):
        pruned_ffn(x, w1, b1, w2[:, :-1], b2)
    with pytest.raises(ValueError, match="fc2"):
        pruned_ffn_with_fc2(x, w1, b1, w2, b2, fc2="cutlass")
