"""The fused search-mode layer in Swin's windowed form (docs/method.md §7.2) against the eager reference.

A batch row is one window: B = images * windows, N = the window's tokens, no prefix token (every token goes through
the convs, zero padding at the window border), and the MSA candidate adds ``attn_bias`` (G, h, N, N) to its logits,
row b using ``attn_bias[b % G]``: G = 1 for a relative position bias alone, G = windows per image when a shift mask is
added. Every output and gradient (including the bias's, and the relative position table's through it) and the BN
running statistics are compared for the four gate choices, in training and eval. Shapes are tiny because on CPU the
Triton kernels run under the interpreter.
"""
import statistics

import pytest
import torch

import spvit_kernels
from spvit_kernels import reference
from spvit_kernels.backend import triton_available
from tests.test_gated_attn_conv import GATES, NAMES, TOL, _clone, _close, _fused, _make, _sq_err
from tests.test_gated_attn_conv import _compare, _skip_without_triton_device

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

ALPHA = 100.0  # Swin's head-mixing temperature (§7.3)
# (images, windows per image, window (H, W), heads, head dim)
WINDOWS = [(2, 4, (3, 3), 2, 8), (1, 3, (4, 4), 3, 4)]
WINDOW_IDS = ["2x4win-3x3-h2d8", "1x3win-4x4-h3d4"]


def _layer(shape, device):
    """Fresh random layer inputs for a windowed batch (head_probs spread so that M is far from uniform at alpha 100)."""
    images, n_win, win, h, d = shape
    t, bns, dtype = _make(images * n_win, win, 0, h, d, device)
    t["head_probs"] = (torch.randn(h, 9) * 0.5 * ALPHA).to(device)
    return t, bns, dtype


def _rel_index(win):
    """(N, N) index into a ((2H-1)*(2W-1), h) relative position table: token pair -> its (drow, dcol) entry."""
    hh, ww = win
    ii, jj = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    coords = torch.stack([ii.flatten(), jj.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + hh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def _region_mask(n_win, n, seed=0):
    """(n_win, N, N) shift mask: -100 between tokens of different regions, 0 within one (window 0: one region)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n_win, n), generator=gen)
    labels[0] = 0
    return (labels[:, :, None] != labels[:, None, :]).float() * -100.0


def _bias_from_table(table, index, mask=None):
    """The windowed attention bias: table (T, h) gathered to (1, h, N, N), plus a mask (n_win, N, N) if given."""
    n = index.shape[0]
    bias = table[index.flatten()].view(n, n, -1).permute(2, 0, 1)[None]
    return bias if mask is None else bias + mask[:, None].to(bias.dtype)


def _make_bias(shape, groups, device):
    """A (G, h, N, N) bias: relative position bias (G = 1), plus a shift mask when G = windows per image."""
    _, n_win, win, h, _ = shape
    n = win[0] * win[1]
    table = torch.randn((2 * win[0] - 1) * (2 * win[1] - 1), h)
    mask = _region_mask(n_win, n) if groups == n_win else None
    bias = _bias_from_table(table, _rel_index(win), mask)
    assert bias.shape[0] == groups
    return bias.to(device)


def _run(fn, t, bns, dtype, gates, bias, *, shape, training, center=4, gate_grad=True, bias_grad=True,
         compute_all=None, bn_dtype=None, bias_dtype=None, grad_seed=1):
    """Forward + backward with a fixed upstream gradient. Returns (out, grads by name incl. attn_bias, stats)."""
    _, _, win, h, _ = shape
    args, (bn1, bn3), g = _clone(t, bns, dtype, gates, gate_grad, bn_dtype)
    b = bias.detach().to(bias_dtype or dtype).clone().requires_grad_(bias_grad)
    out = fn(args["x_hat"], args["w_qk"], args["b_qk"], args["w_v"], args["b_v"], args["w_o"], args["b_o"],
             args["head_probs"], bn1, bn3, g, num_heads=h, alpha=ALPHA, grid=win, training=training,
             num_prefix_tokens=0, center=center, compute_all=compute_all, attn_bias=b)
    if out.requires_grad:
        gen = torch.Generator().manual_seed(grad_seed)
        out.backward(torch.randn(out.shape, generator=gen).to(out.device, out.dtype))
    leaves = [args[k] for k in NAMES[:8]] + [bn1.weight, bn1.bias, bn3.weight, bn3.bias, g, b]
    grads = {name: (None if leaf is None else leaf.grad) for name, leaf in zip(NAMES + ("attn_bias",), leaves)}
    stats = [bn1.running_mean, bn1.running_var, bn3.running_mean, bn3.running_var]
    return out.detach(), grads, stats


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("choice", list(GATES))
@pytest.mark.parametrize("grouped", [False, True], ids=["G1", "Gwindows"])
@pytest.mark.parametrize("shape", WINDOWS, ids=WINDOW_IDS)
def test_window_matches_reference(device, shape, grouped, choice, training):
    """Gates requiring grad (every candidate computed): outputs, every gradient incl. attn_bias's, running stats."""
    _skip_without_triton_device(device)
    t, bns, dtype = _layer(shape, device)
    bias = _make_bias(shape, shape[1] if grouped else 1, device)
    kw = dict(shape=shape, training=training)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], bias, **kw)
    res = _run(_fused(), t, bns, dtype, GATES[choice], bias, **kw)
    _compare(res, ref, *TOL[torch.float32])
    assert res[1]["gates"].abs().sum() > 0
    if choice == "msa":  # the bias gradient is a real one (summed over the rows of each group), not zeros
        assert res[1]["attn_bias"].abs().sum() > 0
    else:  # MSA computed for the gate gradient only: exact zeros, as the reference's 0 * out_msa gives
        assert torch.equal(res[1]["attn_bias"], torch.zeros_like(bias))


@pytest.mark.parametrize("bias_grad", [True, False], ids=["bias-grad", "bias-const"])
@pytest.mark.parametrize("choice", list(GATES))
def test_window_eval_live_candidate_only(device, choice, bias_grad):
    """Eval without gate gradients: only the live candidate runs; attn_bias gets a gradient only when MSA is chosen
    (None otherwise, as in the reference); a bias without requires_grad is accepted."""
    _skip_without_triton_device(device)
    shape = WINDOWS[0]
    t, bns, dtype = _layer(shape, device)
    bias = _make_bias(shape, shape[1], device)
    kw = dict(shape=shape, training=False, gate_grad=False, bias_grad=bias_grad)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], bias, **kw)
    res = _run(_fused(), t, bns, dtype, GATES[choice], bias, **kw)
    _compare(res, ref, *TOL[torch.float32])
    assert (res[1]["attn_bias"] is not None) == (choice == "msa" and bias_grad)


def test_window_no_grad_inference(device):
    """Under torch.no_grad (nothing saved for a backward) the windowed MSA output equals the reference's."""
    _skip_without_triton_device(device)
    shape = WINDOWS[1]
    t, bns, dtype = _layer(shape, device)
    bias = _make_bias(shape, shape[1], device)
    with torch.no_grad():
        ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES["msa"], bias, shape=shape, training=False,
                   gate_grad=False)
        res = _run(_fused(), t, bns, dtype, GATES["msa"], bias, shape=shape, training=False, gate_grad=False)
    _close(res[0], ref[0], "out", *TOL[torch.float32])


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_relative_position_table_gradient(device, shifted):
    """The bias built from a trainable relative position table (+ the shift mask): the table's gradient through the
    fused op equals the reference's, as do the other leaves'."""
    _skip_without_triton_device(device)
    shape = WINDOWS[0]
    _, n_win, win, h, _ = shape
    t, bns, dtype = _layer(shape, device)
    table0 = torch.randn((2 * win[0] - 1) * (2 * win[1] - 1), h, device=device)
    index = _rel_index(win).to(device)
    mask = _region_mask(n_win, win[0] * win[1]).to(device) if shifted else None
    results = []
    for fn in (reference.gated_attn_conv, _fused()):
        table = table0.clone().requires_grad_()
        args, (bn1, bn3), g = _clone(t, bns, dtype, GATES["msa"], True)
        out = fn(args["x_hat"], args["w_qk"], args["b_qk"], args["w_v"], args["b_v"], args["w_o"], args["b_o"],
                 args["head_probs"], bn1, bn3, g, num_heads=h, alpha=ALPHA, grid=win, training=True,
                 num_prefix_tokens=0, center=4, attn_bias=_bias_from_table(table, index, mask))
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device))
        results.append((out.detach(), table.grad, args["w_qk"].grad, args["x_hat"].grad, g.grad))
    for name, a, e in zip(("out", "table", "w_qk", "x_hat", "gates"), *results):
        _close(a, e, name, *TOL[torch.float32])
    assert results[1][1].abs().sum() > 0


@pytest.mark.parametrize("choice", ["1x1", "3x3"])
def test_center_column(device, choice):
    """``center`` selects the column of M that the 1x1 candidate uses (0 here) and leaves the 3x3 alone."""
    _skip_without_triton_device(device)
    shape = WINDOWS[1]
    t, bns, dtype = _layer(shape, device)
    bias = _make_bias(shape, 1, device)
    kw = dict(shape=shape, training=True, center=0)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], bias, **kw)
    res = _run(_fused(), t, bns, dtype, GATES[choice], bias, **kw)
    _compare(res, ref, *TOL[torch.float32])
    if choice == "1x1":  # and it matters: the default centre gives another output
        other = _run(_fused(), t, bns, dtype, GATES[choice], bias, **{**kw, "center": 4})
        assert not torch.allclose(other[0], res[0])


LOW_PRECISION = [(torch.bfloat16, c) for c in GATES] + [(torch.float16, "msa"), (torch.float16, "1x1")]
AUTOCAST = [(torch.bfloat16, "msa"), (torch.bfloat16, "3x3"), (torch.float16, "msa")]
DRAWS = 8


@pytest.mark.parametrize("dtype,choice", LOW_PRECISION, ids=[f"{str(t)[6:]}-{c}" for t, c in LOW_PRECISION])
def test_window_low_precision_within_2x_of_eager(device, dtype, choice):
    """bf16/fp16 inputs and bias: error vs an fp64 reference at most 2x eager's at that dtype.

    The error of a tensor is its RMS error in one draw; the test compares the medians over eight draws. (A conv
    candidate's BN output that lies within rounding of 0 flips its ReLU in either low-precision path by chance, about
    once per few draws at these sizes; the one-element gradient jump that follows is a large share of a draw's error,
    so a pooled RMS over a few draws measures mostly where those flips fell, a median does not.)
    """
    _low_precision_vs_eager(device, dtype, choice, autocast=False)


@pytest.mark.parametrize("dtype,choice", AUTOCAST, ids=[f"{str(t)[6:]}-{c}" for t, c in AUTOCAST])
def test_window_autocast_within_2x_of_eager(device, dtype, choice):
    """fp32 leaves (bias included) under torch.autocast: the bias is cast like the logits, every gradient is fp32,
    and the error vs the fp64 reference is at most 2x that of the eager reference under the same autocast."""
    _low_precision_vs_eager(device, dtype, choice, autocast=True)


def _low_precision_vs_eager(device, dtype, choice, autocast):
    _skip_without_triton_device(device)
    shape = WINDOWS[0]
    kw = dict(shape=shape, training=True)
    errs = {}  # name -> ([our RMS error per draw], [eager's], max |reference|)
    for seed in range(DRAWS):
        torch.manual_seed(seed)
        t, bns, _ = _layer(shape, device)
        bias = _make_bias(shape, shape[1], device)
        # round the masters to the test dtype once so all three runs see the same values
        t = {k: (None if v is None else v.to(dtype).float()) for k, v in t.items()}
        bias = bias.to(dtype).float()
        exact = _run(reference.gated_attn_conv, t, bns, torch.float64, GATES[choice], bias, **kw)
        if autocast:
            with torch.autocast(device.type, dtype=dtype):
                eager = _run(reference.gated_attn_conv, t, bns, torch.float32, GATES[choice], bias, **kw)
                ours = _run(_fused(), t, bns, torch.float32, GATES[choice], bias, **kw)
            for name, grad in ours[1].items():
                assert grad is None or grad.dtype == torch.float32, name
        else:
            eager = _run(reference.gated_attn_conv, t, bns, dtype, GATES[choice], bias, bn_dtype=torch.float32, **kw)
            ours = _run(_fused(), t, bns, dtype, GATES[choice], bias, bn_dtype=torch.float32, **kw)
        assert ours[0].dtype == eager[0].dtype == dtype
        triples = [("out", ours[0], eager[0], exact[0])]
        triples += [(f"grad {k}", ours[1][k], eager[1][k], exact[1][k]) for k in exact[1]]
        triples += [(f"running stat {i}", a, b, c) for i, (a, b, c) in enumerate(zip(ours[2], eager[2], exact[2]))]
        for name, a, b, e in triples:
            if e is None:
                assert a is None and b is None, name
                continue
            (so, n), (se, _) = _sq_err(a, e), _sq_err(b, e)
            ours_e, eager_e, scale = errs.setdefault(name, ([], [], [0.0]))
            ours_e.append((so / n) ** 0.5)
            eager_e.append((se / n) ** 0.5)
            scale[0] = max(scale[0], e.abs().max().item())
    assert "grad attn_bias" in errs
    for name, (ours_e, eager_e, scale) in errs.items():
        med_ours, med_eager = statistics.median(ours_e), statistics.median(eager_e)
        floor = 1e-3 * torch.finfo(dtype).eps * max(1.0, scale[0])
        assert med_ours <= 2 * med_eager + floor, \
            f"{name}: ours {med_ours:.3e} vs eager {dtype} {med_eager:.3e} (median RMS error over {DRAWS} draws)"


def test_dispatch_triton_backend_with_bias(device):
    """spvit_kernels.ops.gated_attn_conv under use_backend('triton') runs the fused op with a bias."""
    _skip_without_triton_device(device)
    from spvit_kernels.backend import backend_of
    shape = WINDOWS[0]
    t, bns, dtype = _layer(shape, device)
    bias = _make_bias(shape, shape[1], device)
    with spvit_kernels.use_backend("triton"):
        assert backend_of("gated_attn_conv", device) == "triton"
        res = _run(spvit_kernels.ops.gated_attn_conv, t, bns, dtype, GATES["msa"], bias, shape=shape, training=True)
    ref = _run(reference.gated_attn_conv, t, bns, dtype, GATES["msa"], bias, shape=shape, training=True)
    _compare(res, ref, *TOL[torch.float32])


def test_rejects_bad_attn_bias(device):
    """One clear error per problem: shape, groups not dividing the batch, dtype, device."""
    _skip_without_triton_device(device)
    shape = WINDOWS[0]
    images, n_win, win, h, d = shape
    n = win[0] * win[1]
    t, bns, dtype = _layer(shape, device)
    args, (bn1, bn3), g = _clone(t, bns, dtype, GATES["msa"], False)
    pos = [args[k] for k in NAMES[:8]]
    kw = dict(num_heads=h, alpha=ALPHA, grid=win, training=True, num_prefix_tokens=0, center=4)
    fn = _fused()
    cases = [
        (torch.zeros(1, h, n, n - 1, device=device), ValueError, r"attn_bias must be \(G, 2, 9, 9\)"),
        (torch.zeros(h, n, n, device=device), ValueError, "attn_bias must be"),
        (torch.zeros(1, h + 1, n, n, device=device), ValueError, "attn_bias must be"),
        (torch.zeros(3, h, n, n, device=device), ValueError, "3 groups, which does not divide the batch of 8"),
        (torch.zeros(0, h, n, n, device=device), ValueError, "0 groups"),
        (torch.zeros(1, h, n, n, device=device, dtype=torch.int64), TypeError, "floating-point"),
        (torch.zeros(1, h, n, n, device=device, dtype=torch.bool), TypeError, "floating-point"),
        (torch.zeros(1, h, n, n, device="meta"), ValueError, "attn_bias is on meta"),
    ]
    for bias, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn(*pos, bn1, bn3, g, **kw, attn_bias=bias)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("choice", ["msa", "3x3", "1x1"])
def test_opcheck_with_attn_bias(device, choice, training):
    """``spvit::gated_attn_conv`` with its trailing attn_bias argument passes torch.library.opcheck (schema, fake
    shapes, autograd registration, AOT dispatch), with and without a backward."""
    _skip_without_triton_device(device)
    from spvit_kernels.gated_attn_conv import gated_attn_conv_op  # noqa: F401  (registers the op)
    shape = WINDOWS[1]
    _, n_win, win, h, _ = shape
    t, bns, dtype = _layer(shape, device)
    bias0 = _make_bias(shape, n_win, device)
    for save in (True, False):
        args, (bn1, bn3), g = _clone(t, bns, dtype, GATES[choice], gate_grad=save)
        tensors = [args[k] if save or args[k] is None else args[k].detach() for k in NAMES[:8]]
        bn_t = [bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, bn3.weight, bn3.bias, bn3.running_mean,
                bn3.running_var]
        bn_t = [b if b is None or save else b.detach() for b in bn_t]
        e1, e3, em = GATES[choice]
        live = [True, True, True] if (training or save) else [em == 1, e3 * (1 - em) == 1,
                                                              e1 * (1 - e3) * (1 - em) == 1]
        bias = bias0.clone().requires_grad_(save)
        torch.library.opcheck(torch.ops.spvit.gated_attn_conv.default,
                              (*tensors, *bn_t, g, h, ALPHA, win[0], win[1], training, 0, 4, [e1, e3, em], live,
                               [1e-5, 1e-5], save, bias))


def test_op_traces_under_aot_autograd(device):
    """torch.compile (aot_eager, fullgraph) traces ``spvit::gated_attn_conv`` with attn_bias through its fake shapes
    and registered backward; output and gradients (the bias's included) equal the uncompiled op's."""
    _skip_without_triton_device(device)
    from spvit_kernels.gated_attn_conv import gated_attn_conv_op  # noqa: F401  (registers the op)
    shape = WINDOWS[0]
    _, n_win, win, h, _ = shape
    t, bns, dtype = _layer(shape, device)
    bias0 = _make_bias(shape, n_win, device)

    def layer(x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, bn1, bn3, g, bias):
        outs = torch.ops.spvit.gated_attn_conv.default(
            x, w_qk, b_qk, w_v, b_v, w_o, b_o, head_probs, *bn1, *bn3, g, h, ALPHA, win[0], win[1], True, 0, 4,
            [1.0, 1.0, 1.0], [True, True, True], [1e-5, 1e-5], True, bias)
        return outs[0]

    results = []
    for fn in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        args, (bn1, bn3), g = _clone(t, bns, dtype, GATES["msa"], True)
        bias = bias0.clone().requires_grad_()
        leaves = [args[k] for k in NAMES[:8]] + [g, bias]
        out = fn(*leaves[:8], tuple(bn1[:4]), tuple(bn3[:4]), g, bias)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append((out.detach(),) + grads)
    for name, a, e in zip(("out",) + NAMES[:8] + ("gates", "attn_bias"), *results):
        _close(a, e, name, *TOL[torch.float32])
