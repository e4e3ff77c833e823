"""Every op at real sizes on a CUDA GPU (skipped without one): DeiT-S and DeiT-B layer shapes, batch 64, fp32 and bf16;
the Swin-T windowed search layer (stage 1: 64 windows per image, C 96, h 3; stage 3: 4 windows per image, C 384,
h 12, shifted, with the (4, 49, 49) shift mask) and the deployed conv on the Swin-T stage maps (no prefix token).

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


def _compare(ours_fn, ref_fn, inputs32, dtype, backward=True, keep32=(), dot_grads=()):
    """inputs32: fp32 CUDA tensors (requires_grad set where a gradient is wanted, for all of them when
    ``dot_grads`` is given); those at the indices ``keep32`` stay fp32 in the low-precision runs (fp32 masters, as BN
    affines and gates are in mixed-precision training).

    ``dot_grads``: indices of inputs whose gradient is an inner product of the upstream gradient with a (B, N, C)
    layer output (the gates: S_m, S_3, S_1 of docs/method.md §2.5). A handful of such sums is compared with a floor of
    one rounding of that output at ``dtype`` (eps * ||dy|| * RMS(out)): both paths hold the output in ``dtype``, so
    that much error is in either one, and with three numbers a 2x ratio alone would be a coin toss.
    """
    cast = [None if t is None else t.detach().to(torch.float32 if i in keep32 else dtype)
            .requires_grad_(t.requires_grad) for i, t in enumerate(inputs32)]
    exact_in = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in cast]
    if not backward:
        with torch.no_grad():
            ours, eager, exact = ours_fn(*cast), ref_fn(*cast), ref_fn(*exact_in)
        pairs = [("out", ours, eager, exact)]
    else:
        dy = torch.randn_like(ref_fn(*cast).float())
        ours, eager, exact = _grads(ours_fn, cast, dy), _grads(ref_fn, cast, dy), _grads(ref_fn, exact_in, dy.double())
        pairs = [(f"tensor {i}", a, b, c) for i, (a, b, c) in enumerate(zip(ours, eager, exact))]
        dot_floor = torch.finfo(dtype).eps * dy.double().norm().item() * (exact[0].double() ** 2).mean().sqrt().item()
    for i, (name, a, e, r) in enumerate(pairs):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        scale = (r.double() ** 2).mean().sqrt().item()
        err, err_eager = _rms(a, r), _rms(e, r)
        floor = FLOOR * scale * (1 if dtype == torch.bfloat16 else 1e-3)
        if backward and i - 1 in dot_grads:  # pairs[0] is the output, pairs[i] the gradient of input i - 1
            floor = max(floor, dot_floor)
        assert err <= 2 * err_eager + floor, \
            f"{name} ({dtype}): {err:.3g} vs eager {err_eager:.3g} (scale {scale:.3g}, floor {floor:.3g})"


def _rand(*shape, scale=1.0, grad=True, device="cuda"):
    return (torch.randn(*shape, device=device) * scale).requires_grad_(grad)


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


GATE_BN_FP32 = (8, 9, 10, 11, 12)  # the layer's BN affines and gates: fp32 masters (a bf16 copy would round the gate
# gradient, three sums of ~1e2, to a bf16 step that is larger than either path's error)


def _master_dtype(x):
    """The cast for the BN tensors: fp32 masters beside fp32/bf16 activations, fp64 in the fp64 reference run (the
    reference's batch_norm does not mix fp32 with fp64)."""
    return (lambda t: t.double()) if x.dtype == torch.float64 else (lambda t: t.float())


def run_gated_attn_conv(model, dtype, choice, batch=BATCH, device="cuda"):
    """The DeiT search layer (fused) vs the eager reference, forward and every gradient (``device``/``batch``: the
    same body at a reduced size elsewhere)."""
    from spvit_kernels.gated_attn_conv import gated_attn_conv
    c, h, _, _ = MODELS[model]
    d = c // h
    n = PREFIX + GRID[0] * GRID[1]
    s = c ** -0.5

    def rnd(*shape, scale=1.0):
        return _rand(*shape, scale=scale, device=device)

    tensors = [rnd(batch, n, c), rnd(2 * c, c, scale=s), rnd(2 * c, scale=0.1), rnd(c, c, scale=s),
               rnd(c, scale=0.5), rnd(c, c, scale=s), rnd(c, scale=0.1), 1 + rnd(h, 9, scale=0.02).detach(),
               (0.5 + torch.rand(d, device=device)).requires_grad_(), rnd(d, scale=0.3),
               (0.5 + torch.rand(d, device=device)).requires_grad_(), rnd(d, scale=0.3)]
    tensors[7].requires_grad_()
    gates = torch.tensor(GATES[choice], device=device, requires_grad=True)

    def call(fn):
        def run(*a):
            f = _master_dtype(a[0])
            bn1 = reference.BNState(f(a[8]), f(a[9]), f(torch.zeros(d, device=device)), f(torch.ones(d, device=device)))
            bn3 = reference.BNState(f(a[10]), f(a[11]), f(torch.zeros(d, device=device)),
                                    f(torch.ones(d, device=device)))
            return fn(*a[:7], a[7], bn1, bn3, a[12], num_heads=h, alpha=0.01, grid=GRID, training=True,
                      num_prefix_tokens=PREFIX)
        return run

    _compare(call(gated_attn_conv), call(reference.gated_attn_conv), tensors + [gates], dtype, keep32=GATE_BN_FP32,
             dot_grads=(12,))


@pytest.mark.parametrize("choice", list(GATES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_gated_attn_conv(model, dtype, choice):
    run_gated_attn_conv(model, dtype, choice)


@pytest.mark.parametrize("provider", ["triton", "ext"])
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_deploy_conv(model, dtype, taps, provider):
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.fail(f"the extension is not built with CUDA: {_ext.error()}")
    from spvit_kernels.deploy_conv import deploy_conv
    from spvit_kernels.deploy_conv import deploy_conv_ext
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


# Swin-T (docs/method.md §7): stage -> (windows per image, C, h, shifted); 7x7 windows of 49 tokens, head dim 32
SWIN_T = {"stage1": (64, 96, 3, False), "stage3": (4, 384, 12, True)}
SWIN_WINDOW = 7


def _swin_shift_mask(res, window, shift):
    """(n_win, N, N) mask of a shifted Swin block on a res x res map: -100 between tokens of different regions."""
    labels = torch.zeros(res, res)
    edges = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for k, (rows, cols) in enumerate((r, c) for r in edges for c in edges):
        labels[rows, cols] = k
    n_side = res // window
    win = labels.view(n_side, window, n_side, window).permute(0, 2, 1, 3).reshape(n_side * n_side, window * window)
    return (win[:, :, None] != win[:, None, :]).float() * -100.0


def _swin_rel_bias(h, device):
    """(1, h, 49, 49) relative position bias gathered from a random ((2w-1)^2, h) table (§7.1)."""
    w = SWIN_WINDOW
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]
    index = (rel[0] + w - 1) * (2 * w - 1) + (rel[1] + w - 1)
    table = torch.randn((2 * w - 1) ** 2, h) * 0.5
    return table[index.flatten()].view(w * w, w * w, h).permute(2, 0, 1)[None].to(device)


def run_swin_gated_attn_conv(stage, dtype, choice, images=BATCH, device="cuda"):
    """The Swin-T windowed search layer (fused) vs the eager reference, forward and every gradient incl. the bias's.

    Batch rows are windows (images * windows per image), no prefix token, grid 7x7 per window, alpha 100, center 4
    (the Swin module passes head_probs in DeiT tap order), attn_bias (1, h, 49, 49) or, shifted, (n_win, h, 49, 49).
    """
    from spvit_kernels.gated_attn_conv import gated_attn_conv
    n_win, c, h, shifted = SWIN_T[stage]
    d = c // h
    n = SWIN_WINDOW ** 2
    s = c ** -0.5

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).requires_grad_()

    bias = _swin_rel_bias(h, device)
    if shifted:
        res = int(round((n_win * n) ** 0.5))
        bias = bias + _swin_shift_mask(res, SWIN_WINDOW, SWIN_WINDOW // 2)[:, None].to(device)
    tensors = [rnd(images * n_win, n, c), rnd(2 * c, c, scale=s), rnd(2 * c, scale=0.1), rnd(c, c, scale=s),
               rnd(c, scale=0.5), rnd(c, c, scale=s), rnd(c, scale=0.1), rnd(h, 9, scale=50.0),
               (0.5 + torch.rand(d, device=device)).requires_grad_(), rnd(d, scale=0.3),
               (0.5 + torch.rand(d, device=device)).requires_grad_(), rnd(d, scale=0.3),
               torch.tensor(GATES[choice], device=device, requires_grad=True), bias.requires_grad_()]

    def call(fn):
        def run(*a):
            f = _master_dtype(a[0])
            bn1 = reference.BNState(f(a[8]), f(a[9]), f(torch.zeros(d, device=device)), f(torch.ones(d, device=device)))
            bn3 = reference.BNState(f(a[10]), f(a[11]), f(torch.zeros(d, device=device)),
                                    f(torch.ones(d, device=device)))
            return fn(*a[:7], a[7], bn1, bn3, a[12], num_heads=h, alpha=100.0, grid=(SWIN_WINDOW, SWIN_WINDOW),
                      training=True, num_prefix_tokens=0, center=4, attn_bias=a[13])
        return run

    _compare(call(gated_attn_conv), call(reference.gated_attn_conv), tensors, dtype, keep32=GATE_BN_FP32,
             dot_grads=(12,))


@pytest.mark.parametrize("choice", list(GATES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("stage", list(SWIN_T))
def test_gated_attn_conv_swin(stage, dtype, choice):
    run_swin_gated_attn_conv(stage, dtype, choice)


# Swin-T stage maps for the deployed convs, which run on the full map (§7.4): (grid, C, d)
SWIN_T_MAPS = [((56, 56), 96, 32), ((28, 28), 192, 32), ((14, 14), 384, 32), ((7, 7), 768, 32)]


def run_deploy_conv_swin(shape, dtype, taps, provider, batch=BATCH, device="cuda"):
    """Deployed conv on a Swin stage map (no prefix token) vs the reference, forward only."""
    from spvit_kernels.deploy_conv import deploy_conv
    from spvit_kernels.deploy_conv import deploy_conv_ext
    grid, c, d = shape
    n = grid[0] * grid[1]
    inputs = [torch.randn(batch, n, c, device=device), torch.randn(taps * d, c, device=device) * c ** -0.5,
              torch.randn(d, device=device) * 0.5, torch.randn(c, d, device=device) * d ** -0.5,
              torch.randn(c, device=device)]
    fn = deploy_conv if provider == "triton" else deploy_conv_ext
    _compare(lambda *a: fn(*a, grid, 0), lambda *a: reference.deploy_conv(*a, grid, 0), inputs, dtype, backward=False)


@pytest.mark.parametrize("provider", ["triton", "ext"])
@pytest.mark.parametrize("taps", [9, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SWIN_T_MAPS, ids=[f"{g[0]}x{g[1]}" for g, _, _ in SWIN_T_MAPS])
def test_deploy_conv_swin(shape, dtype, taps, provider):
    if provider == "ext" and not _ext.has_op("shift_sum"):
        pytest.fail(f"the extension is not built with CUDA: {_ext.error()}")
    run_deploy_conv_swin(shape, dtype, taps, provider)
