"""Fused search-mode attention/conv layer (spvit_kernels.gated_attn_conv) against the eager reference.

Every output and gradient (x_hat, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, both BN affines, gates) and the
updated BN running statistics are compared for the four gate choices, in training and eval mode. Shapes are tiny
because on CPU the Triton kernels run under the interpreter.
"""
import pytest
import torch

import spvit_kernels
from spvit_kernels import reference
from spvit_kernels.backend import triton_available, triton_interpret

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

GATES = {"msa": (1.0, 1.0, 1.0), "3x3": (1.0, 1.0, 0.0), "1x1": (1.0, 0.0, 0.0), "skip": (0.0, 0.0, 0.0)}
NAMES = ("x_hat", "w_qk", "b_qk", "w_v", "b_v", "w_o", "b_o", "head_probs", "bn1.weight", "bn1.bias", "bn3.weight",
         "bn3.bias", "gates")
# (B, (H, W), prefix, heads, head_dim)
SHAPES = [(2, (4, 4), 1, 2, 16), (2, (3, 5), 0, 4, 8)]
TOL = {torch.float32: (2e-5, 2e-5)}  # (atol, rtol) relative to the tensor's scale, see _close


def _skip_without_triton_device(device):
    if device.type == "cpu" and not triton_interpret():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")


def _fused():
    from spvit_kernels.gated_attn_conv import gated_attn_conv
    return gated_attn_conv


def _make(bsz, grid, prefix, h, d, device, dtype=torch.float32, bias=True, affine=True):
    """Fresh random layer inputs (fp32 masters; cast by _clone)."""
    c = h * d
    n = prefix + grid[0] * grid[1]
    s = c ** -0.5

    def r(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device)

    t = {
        "x_hat": r(bsz, n, c),
        "w_qk": r(2 * c, c, scale=s), "b_qk": r(2 * c, scale=0.1) if bias else None,
        "w_v": r(c, c, scale=s), "b_v": r(c, scale=0.5) if bias else None,
        "w_o": r(c, c, scale=s), "b_o": r(c, scale=0.1) if bias else None,
        "head_probs": 1 + r(h, 9, scale=0.02),
    }
    bns = []
    for _ in range(2):
        bns.append({
            "weight": (0.5 + torch.rand(d)).to(device) if affine else None,
            "bias": r(d, scale=0.3) if affine else None,
            "running_mean": r(d, scale=0.2), "running_var": (0.5 + torch.rand(d)).to(device),
        })
    return t, bns, dtype


def _clone(t, bns, dtype, gates, gate_grad, bn_dtype=None, param_dtype=None):
    """Leaf copies in the requested dtypes (BN tensors in bn_dtype, gates fp32)."""
    param_dtype = param_dtype or dtype
    bn_dtype = bn_dtype or dtype
    args = {}
    for k, v in t.items():
        if v is None:
            args[k] = None
            continue
        dt = dtype if k == "x_hat" else param_dtype
        args[k] = v.detach().to(dt).clone().requires_grad_()
    states = []
    for bn in bns:
        f = {k: (None if v is None else v.detach().to(bn_dtype).clone()) for k, v in bn.items()}
        for k in ("weight", "bias"):
            if f[k] is not None:
                f[k].requires_grad_()
        states.append(reference.BNState(f["weight"], f["bias"], f["running_mean"], f["running_var"]))
    g = torch.tensor(gates, device=t["x_hat"].device, dtype=torch.float32, requires_grad=gate_grad)
    return args, states, g


def _run(fn, t, bns, dtype, gates, *, grid, prefix, h, training, gate_grad=True, compute_all=None, bn_dtype=None,
         param_dtype=None, grad_seed=1):
    """Forward + backward with a fixed upstream gradient. Returns (out, grads by name, running stats)."""
    args, (bn1, bn3), g = _clone(t, bns, dtype, gates, gate_grad, bn_dtype, param_dtype)
    out = fn(args["x_hat"], args["w_qk"], args["b_qk"], args["w_v"], args["b_v"], args["w_o"], args["b_o"],
             args["head_probs"], bn1, bn3, g, num_heads=h, alpha=0.01, grid=grid, training=training,
             num_prefix_tokens=prefix, compute_all=compute_all)
    grads = {}
    if out.requires_grad:
        gen = torch.Generator().manual_seed(grad_seed)
        go = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        out.backward(go)
    leaves = [args[k] for k in NAMES[:8]] + [bn1.weight, bn1.bias, bn3.weight, bn3.bias, g]
    for name, leaf in zip(NAMES, leaves):
        grads[name] = None if leaf is None else leaf.grad
    stats = [bn1.running_mean, bn1.running_var, bn3.running_mean, bn3.running_var]
    return out.detach(), grads, stats


# A bias gradient is a sum over tokens of the matching weight's row gradients; behind a training-mode BN it is zero
# up to rounding, so its absolute tolerance is scaled by the weight gradient's magnitude.
SCALE_FROM = {"grad b_v": "w_v", "grad b_qk": "w_qk", "grad b_o": "w_o", "grad head_probs": "w_v"}


def _close(actual, expected, name, atol, rtol, scale=1.0):
    """|a - e| <= atol * max(scale, max|e|) + rtol * |e| elementwise (atol scaled to the tensor's magnitude)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{name}: got {actual is None}, expected None={expected is None}"
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    a, e = actual.double(), expected.double()
    scale = max(1.0, scale, e.abs().max().item())
    err = (a - e).abs()
    bad = err > atol * scale + rtol * e.abs()
    assert not bad.any(), f"{name}: max abs err {err.max().item():.3e} (scale {scale:.3e})"


def _compare(res, ref, atol, rtol):
    out, grads, stats = res
    out_r, grads_r, stats_r = ref
    _close(out, out_r, "out", atol, rtol)
    for name in grads_r:  # NAMES here; the window tests add attn_bias
        partner = grads_r.get(SCALE_FROM.get(f"grad {name}", ""))
        scale = 1.0 if partner is None else partner.abs().max().item()
        _close(grads[name], grads_r[name], f"grad {name}", atol, rtol, scale)
    for i, (a, e) in enumerate(zip(stats, stats_r)):
        _close(a, e, f"running stat {i}", atol, rtol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("choice", list(GATES))
@pytest.mark.parametrize("shape", SHAPES, ids=["4x4-cls-h2d16", "3x5-noprefix-h4d8"])
def test_matches_reference_with_gate_grads(device, shape, choice, training):
    """Gates requiring grad: every candidate is computed; all outputs, gradients and running stats match."""
    _skip_without_triton_device(device)
    bsz, grid, prefix, h, d = shape
    t, bns, dtype = _make(bsz, grid, prefix, h, d, device)
    kw = dict(grid=grid, prefix=prefix, h=h, training=training)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], **kw)
    res = _run(_fused(), t, bns, dtype, GATES[choice], **kw)
    _compare(res, ref, *TOL[torch.float32])
    # sanity: the gate gradient is not trivially zero
    assert res[1]["gates"].abs().sum() > 0


@pytest.mark.parametrize("choice", list(GATES))
def test_eval_live_candidates_only(device, choice):
    """Eval without gate gradients: only the live candidate runs; unused parameters get no gradient (None)."""
    _skip_without_triton_device(device)
    bsz, grid, prefix, h, d = SHAPES[0]
    t, bns, dtype = _make(bsz, grid, prefix, h, d, device)
    kw = dict(grid=grid, prefix=prefix, h=h, training=False, gate_grad=False)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], **kw)
    res = _run(_fused(), t, bns, dtype, GATES[choice], **kw)
    _compare(res, ref, *TOL[torch.float32])


@pytest.mark.parametrize("choice", ["3x3", "1x1"])
def test_training_compute_all_false(device, choice):
    """compute_all=False in training: only the live conv's BN statistics update; no gate gradient needed."""
    _skip_without_triton_device(device)
    bsz, grid, prefix, h, d = SHAPES[1]
    t, bns, dtype = _make(bsz, grid, prefix, h, d, device)
    kw = dict(grid=grid, prefix=prefix, h=h, training=True, gate_grad=False, compute_all=False)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], **kw)
    res = _run(_fused(), t, bns, dtype, GATES[choice], **kw)
    _compare(res, ref, *TOL[torch.float32])


@pytest.mark.parametrize("choice", ["msa", "3x3", "1x1"])
def test_no_biases_no_affine(device, choice):
    """b_qk = b_v = b_o = None and BN without affine parameters."""
    _skip_without_triton_device(device)
    bsz, grid, prefix, h, d = SHAPES[0]
    t, bns, dtype = _make(bsz, grid, prefix, h, d, device, bias=False, affine=False)
    kw = dict(grid=grid, prefix=prefix, h=h, training=True)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], **kw)
    res = _run(_fused(), t, bns, dtype, GATES[choice], **kw)
    _compare(res, ref, *TOL[torch.float32])


@pytest.mark.parametrize("shape", [(2, (3, 4), 1, 3, 32), (2, (3, 3), 1, 1, 96)], ids=["h3d32", "h1d96"])
def test_awkward_heads_and_head_dims(device, shape):
    """Head counts and head dims that are not powers of two (padded tiles with masks)."""
    _skip_without_triton_device(device)
    bsz, grid, prefix, h, d = shape
    t, bns, dtype = _make(bsz, grid, prefix, h, d, device)
    for choice in ("3x3", "1x1"):
        kw = dict(grid=grid, prefix=prefix, h=h, training=True)
        ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], **kw)
        res = _run(_fused(), t, bns, dtype, GATES[choice], **kw)
        _compare(res, ref, *TOL[torch.float32])


def _sq_err(a, e):
    """Sum of squared errors and element count (0 for a missing tensor)."""
    if a is None:
        return 0.0, 1
    return ((a.double() - e.double()) ** 2).sum().item(), e.numel()


LOW_PRECISION = [(torch.bfloat16, c) for c in GATES] + [(torch.float16, "3x3"), (torch.float16, "1x1")]


@pytest.mark.parametrize("dtype,choice", LOW_PRECISION, ids=[f"{str(t)[6:]}-{c}" for t, c in LOW_PRECISION])
def test_low_precision_error_within_2x_of_eager(device, dtype, choice):
    """bf16/fp16: the kernel's error vs an fp64 reference is at most 2x eager bf16's error (plus a tiny floor).

    The error is the RMS over four random draws: several gradients here (gates, head_probs, the biases behind a
    training BatchNorm) are a handful of long reductions, for which a single draw's error is mostly chance.
    """
    _low_precision_vs_eager(device, dtype, choice, autocast=False)


AUTOCAST = [(torch.bfloat16, c) for c in GATES] + [(torch.float16, "3x3")]


@pytest.mark.parametrize("dtype,choice", AUTOCAST, ids=[f"{str(t)[6:]}-{c}" for t, c in AUTOCAST])
def test_autocast_error_within_2x_of_eager(device, dtype, choice):
    """fp32 parameters and inputs under ``torch.autocast``: forward and every gradient (fp32 leaves) run, and their
    error vs the fp64 reference is at most 2x that of the eager reference under the same autocast."""
    _low_precision_vs_eager(device, dtype, choice, autocast=True)


def _low_precision_vs_eager(device, dtype, choice, autocast):
    _skip_without_triton_device(device)
    bsz, grid, prefix, h, d = 2, (4, 4), 1, 4, 8
    kw = dict(grid=grid, prefix=prefix, h=h, training=True)
    acc = {}
    for seed in range(4):
        torch.manual_seed(seed)
        t, bns, _ = _make(bsz, grid, prefix, h, d, device)
        # round the masters to the test dtype once so all three runs see the same values
        t = {k: (None if v is None else v.to(dtype).float()) for k, v in t.items()}
        exact = _run(reference.gated_attn_conv, t, bns, torch.float64, GATES[choice], **kw)
        if autocast:
            with torch.autocast(device.type, dtype=dtype):
                eager = _run(reference.gated_attn_conv, t, bns, torch.float32, GATES[choice], **kw)
                ours = _run(_fused(), t, bns, torch.float32, GATES[choice], **kw)
            for name, grad in ours[1].items():
                assert grad is None or grad.dtype == torch.float32, name
        else:
            eager = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], bn_dtype=torch.float32, **kw)
            ours = _run(_fused(), t, bns, dtype, GATES[choice], bn_dtype=torch.float32, **kw)
        assert ours[0].dtype == eager[0].dtype == dtype
        triples = [("out", ours[0], eager[0], exact[0])]
        triples += [(f"grad {k}", ours[1][k], eager[1][k], exact[1][k]) for k in NAMES]
        triples += [(f"running stat {i}", a, b, c) for i, (a, b, c) in enumerate(zip(ours[2], eager[2], exact[2]))]
        for name, a, b, e in triples:
            if e is None:
                assert a is None and b is None, name
                continue
            (so, n), (se, _) = _sq_err(a, e), _sq_err(b, e)
            prev = acc.get(name, (0.0, 0.0, 0, 0.0))
            acc[name] = (prev[0] + so, prev[1] + se, prev[2] + n, max(prev[3], e.abs().max().item()))
    for name, (so, se, n, scale) in acc.items():
        rms_ours, rms_eager = (so / n) ** 0.5, (se / n) ** 0.5
        floor = 1e-3 * torch.finfo(dtype).eps * max(1.0, scale)
        assert rms_ours <= 2 * rms_eager + floor, f"{name}: ours {rms_ours:.3e} vs eager {dtype} {rms_eager:.3e}"


def test_dispatch_triton_backend(device):
    """spvit_kernels.gated_attn_conv under use_backend('triton') runs the fused op and equals the reference."""
    _skip_without_triton_device(device)
    from spvit_kernels.backend import backend_of
    bsz, grid, prefix, h, d = SHAPES[1]
    t, bns, dtype = _make(bsz, grid, prefix, h, d, device)
    kw = dict(grid=grid, prefix=prefix, h=h, training=True)
    with spvit_kernels.use_backend("triton"):
        assert backend_of("gated_attn_conv", device) == "triton"
        res = _run(spvit_kernels.ops.gated_attn_conv, t, bns, dtype, GATES["3x3"], **kw)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES["3x3"], **kw)
    _compare(res, ref, *TOL[torch.float32])


def test_rejects_bad_inputs(device):
    _skip_without_triton_device(device)
    fn = _fused()
    bsz, grid, prefix, h, d = SHAPES[0]
    t, bns, dtype = _make(bsz, grid, prefix, h, d, device)
    args, (bn1, bn3), g = _clone(t, bns, dtype, GATES["msa"], False)
    pos = [args[k] for k in NAMES[:8]]
    kw = dict(num_heads=h, alpha=0.01, grid=grid, training=True, num_prefix_tokens=prefix)
    with pytest.raises(ValueError, match="tokens"):
        fn(*pos, bn1, bn3, g, **{**kw, "grid": (3, 4)})
    with pytest.raises(ValueError, match="0/1"):
        fn(*pos, bn1, bn3, torch.tensor([1.0, 0.5, 0.0], device=device), **kw)
    bad = list(pos)
    bad[3] = bad[3][:, :-1]
    with pytest.raises(ValueError, match="w_v"):
        fn(*bad, bn1, bn3, g, **kw)
    with pytest.raises(ValueError, match="x_hat"):
        fn(pos[0][0], *pos[1:], bn1, bn3, g, **kw)


@pytest.mark.parametrize("choice", list(GATES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(device, choice, training):
    """``spvit::gated_attn_conv`` passes torch.library.opcheck (schema, fake shapes, autograd registration, AOT
    dispatch) with and without a backward."""
    _skip_without_triton_device(device)
    from spvit_kernels.gated_attn_conv import gated_attn_conv_op  # noqa: F401  (registers the op)
    bsz, grid, prefix, h, d = SHAPES[1]
    t, bns, dtype = _make(bsz, grid, prefix, h, d, device)
    for save in (True, False):
        args, (bn1, bn3), g = _clone(t, bns, dtype, GATES[choice], gate_grad=save)
        tensors = [args[k] if save or args[k] is None else args[k].detach() for k in NAMES[:8]]
        bn_t = [bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, bn3.weight, bn3.bias, bn3.running_mean,
                bn3.running_var]
        bn_t = [b if b is None or save else b.detach() for b in bn_t]
        e1, e3, em = GATES[choice]
        live = [True, True, True] if (training or save) else [em == 1, e3 * (1 - em) == 1,
                                                              e1 * (1 - e3) * (1 - em) == 1]
        if not any(live):
            continue
        torch.library.opcheck(torch.ops.spvit.gated_attn_conv.default,
                              (*tensors, *bn_t, g, h, 0.01, grid[0], grid[1], training, prefix, 4, [e1, e3, em], live,
                               [1e-5, 1e-5], save))
