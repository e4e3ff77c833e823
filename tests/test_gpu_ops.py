"""Every op at real sizes on a CUDA GPU (skipped without one): DeiT-S and DeiT-B layer shapes, batch 64, fp32 and bf16.

Each kernel is compared with the fp64 eager reference, forward and every gradient; its error (RMS) must be at most
twice that of the eager reference at the same dtype (plus a small floor). The extension's CUDA ops also pass
``torch.library.opcheck``. The smaller, awkward-shape tests of each op run on CUDA too (``tests/test_<op>.py``).
"""
import pytest
import torch

from spvit_kernels import _ext, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# name: (embed dim C, heads h, FFN width F, pruned FFN width)
MODELS = {"deit_s": (384, 6, 1536, 1118), "deit_b": (768, 12, 3072, 1871)}
BATCH, GRID, PREFIX = 64, (14, 14), 1
DTYPES = [torch.float32, torch.bfloat16]
FLOOR = 1e-3


def _rms(a, r):
    return ((a.double() - r.double()) ** 2).mean().sqrt().item()


def _grads(fn, inputs, dy):
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    y = fn(*leaves)
    live = [t for t in leaves if t is not None and t.requires_grad]
    return [y] + list(torch.autograd.grad(y, live, dy.to(y.dtype)) if live else [])


def _compare(ours_fn, ref_fn, inputs32, dtype, backward=True):
    """inputs32: fp32 CUDA tensors (requires_grad set where a gradient is wanted)."""
    cast = [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs32]
    exact_in = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in cast]
    if not backward:
        with torch.no_grad():
            ours, eager, exact = ours_fn(*cast), ref_fn(*cast), ref_fn(*exact_in)
        pairs = [("out", ours, eager, exact)]
    else:
        dy = torch.randn_like(ref_fn(*cast).float())
        ours, eager, exact = _grads(ours_fn, cast, dy), _grads(ref_fn, cast, dy), _grads(ref_fn, exact_in, dy.double())
        pairs = [(f"tensor {i}", a, b, c) for i, (a, b, c) in enumerate(zip(ours, eager, exact))]
    for name, a, e, r in pairs:
        assert a.dtype == e.dtype and a.shape == e.shape, name
        scale = (r.double() ** 2).mean().sqrt().item()
        err, err_eager = _rms(a, r), _rms(e, r)
        assert err <= 2 * err_eager + FLOOR * scale * (1 if dtype == torch.bfloat16 else 1e-3), \
            f"{name} ({dtype}): {err:.3g} vs eager {err_eager:.3g} (scale {scale:.3g})"


def _rand(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape, device="cuda") * scale).requires_grad_(grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_masked_ffn(model, dtype):
    from spvit_kernels.masked_ffn import masked_ffn
    c, _, f, _ = MODELS[model]
    n = PREFIX + GRID[0] * GRID[1]
    mask = (torch.rand(f, device="cuda") > 0.3).float().requires_grad_()
    inputs = [_rand(BATCH, n, c), _rand(f, c, scale=c ** -0.5), _rand(f, scale=0.1), _rand(c, f, scale=f ** -0.5),
              _rand(c, scale=0.1)]
    _compare(lambda *a: masked_ffn(*a[:5], a[5].to(a[0].dtype)), lambda *a: reference.masked_ffn(*a[:5], a[5]),
             inputs + [mask], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_pruned_ffn(model, dtype):
    from spvit_kernels.pruned_ffn import pruned_ffn
    c, _, _, f = MODELS[model]
    n = PREFIX + GRID[0] * GRID[1]
    inputs = [_rand(BATCH, n, c, grad=False), _rand(f, c, scale=c ** -0.5, grad=False), _rand(f, scale=0.1, grad=False),
              _rand(c, f, scale=f ** -0.5, grad=False), _rand(c, scale=0.1, grad=False)]
    _compare(pruned_ffn, reference.pruned_ffn, inputs, dtype, backward=False)


GATES = {"msa": (1.0, 1.0, 1.0), "3x3": (1.0, 1.0, 0.0), "1x1": (1.0, 0.0, 0.0)}


@pytest.mark.parametrize("choice", list(GATES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_gated_attn_conv(model, dtype, choice):
    from spvit_kernels.gated_attn_conv import gated_attn_conv
    c, h, _, _ = MODELS[model]
    d = c // h
    n = PREFIX + GRID[0] * GRID[1]
    s = c ** -0.5
    tensors = [_rand(BATCH, n, c), _rand(2 * c, c, scale=s), _rand(2 * c, scale=0.1), _rand(c, c, scale=s),
               _rand(c, scale=0.5), _rand(c, c, scale=s), _rand(c, scale=0.1), 1 + _rand(h, 9, scale=0.02).detach(),
               (0.5 + torch.rand(d, device="cuda")).requires_grad_(), _rand(d, scale=0.3),
               (0.5 + torch.rand(d, device="cuda")).requires_grad_(), _rand(d, scale=0.3)]
    tensors[7].requires_grad_()
    gates = torch.tensor(GATES[choice], device="cuda", requires_grad=True)

    def call(fn):
        def run(*a):
            bn1 = reference.BNState(a[8].float(), a[9].float(), torch.zeros(d, device="cuda"),
                                    torch.ones(d, device="cuda"))
            bn3 = reference.BNState(a[10].float(), a[11].float(), torch.zeros(d, device="cuda"),
                                    torch.ones(d, device="cuda"))
            return fn(*a[:7], a[7].float(), bn1, bn3, a[12].float(), num_heads=h, alpha=0.01, grid=GRID,
                      training=True, num_prefix_tokens=PREFIX)
        return run

    _compare(call(gated_attn_conv), call(reference.gated_attn_conv), tensors + [gates], dtype)


@pytest.mark.parametrize("provider", ["triton", "ext"])
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_deploy_conv(model, dtype, taps, provider):
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.fail(f"the extension is not built with CUDA: {_ext.error()}")
    from spvit_kernels.deploy_conv import deploy_conv
    from spvit_kernels.shift_sum import deploy_conv_ext
    c, h, _, _ = MODELS[model]
    d = c // h
    n = PREFIX + GRID[0] * GRID[1]
    inputs = [_rand(BATCH, n, c, grad=False), _rand(taps * d, c, scale=c ** -0.5, grad=False),
              _rand(d, scale=0.5, grad=False), _rand(c, d, scale=d ** -0.5, grad=False), _rand(c, grad=False)]
    fn = deploy_conv if provider == "triton" else deploy_conv_ext
    _compare(lambda *a: fn(*a, GRID, PREFIX), lambda *a: reference.deploy_conv(*a, GRID, PREFIX), inputs, dtype,
             backward=False)


@pytest.mark.parametrize("provider", ["triton", "ext"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_shift_sum(model, dtype, provider):
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.fail(f"the extension is not built with CUDA: {_ext.error()}")
    from spvit_kernels.shift_sum import shift_sum_ext, shift_sum_triton
    c, h, _, _ = MODELS[model]
    d = c // h
    fn = shift_sum_triton if provider == "triton" else shift_sum_ext
    planes, bias = _rand(BATCH, GRID[0] * GRID[1], 9, d), _rand(d, scale=0.5)
    _compare(lambda p, b: fn(p, b, GRID, True), lambda p, b: reference.shift_sum(p, b, GRID, True), [planes, bias],
             dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_extension_opcheck_cuda(dtype):
    if not _ext.has_op("shift_sum"):
        pytest.fail(f"the extension is not built with CUDA: {_ext.error()}")
    import spvit_kernels.shift_sum  # noqa: F401  (fake kernels + autograd)
    planes = torch.randn(2, 20, 9, 24, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(24, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.spvit.shift_sum.default, (planes, bias, 4, 5, True))
    out = torch.ops.spvit.shift_sum.default(planes.detach(), bias.detach(), 4, 5, True)
    torch.library.opcheck(torch.ops.spvit.shift_sum_backward.default, (torch.randn_like(out), out, 4, 5, 9, True))
