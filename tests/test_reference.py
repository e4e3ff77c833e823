"""The eager reference ops against independent formulations (PyTorch conv2d / BatchNorm2d / the tables of docs/method.md)."""
import pytest
import torch
import torch.nn.functional as F

from spvit_kernels import reference as R


def test_tap_order_matches_spec_table():
    # §1.3: k -> (dy, dx) for DeiT, written out literally.
    table = [(-1, -1), (0, -1), (1, -1), (-1, 0), (0, 0), (1, 0), (-1, 1), (0, 1), (1, 1)]
    assert list(R.TAP_OFFSETS) == table
    assert R.TAP_OFFSETS[R.CENTER_TAP] == (0, 0)


def _conv_weight_spec(taps):
    """(T, d, C) -> (d, C, 3, 3) with element [kh, kw] = K_{kh + 3*kw} (docs/method.md §1.3), written independently."""
    t, d, c = taps.shape
    w = torch.empty(d, c, 3, 3, dtype=taps.dtype)
    for kh in range(3):
        for kw in range(3):
            w[:, :, kh, kw] = taps[kh + 3 * kw]
    return w


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 1), (2, 7)])
@pytest.mark.parametrize("prefix", [0, 1])
def test_conv_attention_equals_conv2d_bn_relu(grid, prefix):
    torch.manual_seed(1)
    b, c, d = 2, 12, 4
    hh, ww = grid
    x = torch.randn(b, prefix + hh * ww, c, dtype=torch.float64)
    taps = torch.randn(9, d, c, dtype=torch.float64)
    tb = torch.randn(d, dtype=torch.float64)
    out_map = torch.randn(c, d, dtype=torch.float64)
    bo = torch.randn(c, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(d).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bns = R.BNState(bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, bn.eps)
    got = R.conv_attention(x, taps, tb, out_map, bo, bns, grid, training=False, num_prefix_tokens=prefix)
    img = x[:, prefix:].transpose(1, 2).reshape(b, c, hh, ww)
    y = F.conv2d(img, _conv_weight_spec(taps), tb, padding=1)
    y = F.conv2d(torch.relu(bn(y)), out_map[:, :, None, None], bo)
    ref = y.reshape(b, c, hh * ww).transpose(1, 2)
    torch.testing.assert_close(got[:, prefix:], ref)
    if prefix:
        torch.testing.assert_close(got[:, :prefix], x[:, :prefix])
    # 1x1: the centre tap only
    got1 = R.conv_attention(x, taps[4:5], tb, out_map, bo, bns, grid, training=False, num_prefix_tokens=prefix)
    y1 = F.conv2d(torch.relu(bn(F.conv2d(img, taps[4][:, :, None, None], tb))), out_map[:, :, None, None], bo)
    torch.testing.assert_close(got1[:, prefix:], y1.reshape(b, c, -1).transpose(1, 2))


def test_conv_attention_train_bn_matches_batchnorm2d():
    torch.manual_seed(2)
    b, c, d, grid = 3, 8, 4, (3, 3)
    x = torch.randn(b, 1 + 9, c, dtype=torch.float64)
    taps = torch.randn(9, d, c, dtype=torch.float64)
    tb, out_map, bo = torch.randn(d, dtype=torch.float64), torch.randn(c, d, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(d).double().train()
    bn2 = torch.nn.BatchNorm2d(d).double().train()
    bns = R.BNState(bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, 0.1, bn2.eps)
    got = R.conv_attention(x, taps, tb, out_map, bo, bns, grid, training=True)
    img = x[:, 1:].transpose(1, 2).reshape(b, c, 3, 3)
    y = F.conv2d(torch.relu(bn(F.conv2d(img, _conv_weight_spec(taps), tb, padding=1))), out_map[:, :, None, None], bo)
    torch.testing.assert_close(got[:, 1:], y.reshape(b, c, 9).transpose(1, 2))
    torch.testing.assert_close(bn2.running_mean, bn.running_mean)
    torch.testing.assert_close(bn2.running_var, bn.running_var)


def test_activation_side_mixing_equals_weight_side():
    torch.manual_seed(3)
    h, d, c = 3, 4, 12
    w_v = torch.randn(h * d, c, dtype=torch.float64)
    b_v = torch.randn(h * d, dtype=torch.float64)
    w_o = torch.randn(c, h * d, dtype=torch.float64)
    a = torch.randn(h, 9, dtype=torch.float64)
    m = R.head_mix(a, 0.5)
    torch.testing.assert_close(m.sum(0), torch.ones(9, dtype=torch.float64))
    taps, tb, om = R.mixed_conv_params(w_v, b_v, w_o, m, h, "3x3")
    # docs/method.md §1.2 written per head
    for k in range(9):
        kk = sum(m[g, k] * w_v[g * d:(g + 1) * d] for g in range(h))
        torch.testing.assert_close(taps[k], kk)
    torch.testing.assert_close(tb, sum(m[g, k] * b_v[g * d:(g + 1) * d] for g in range(h) for k in range(9)))
    torch.testing.assert_close(om, sum(m[g, k] * w_o[:, g * d:(g + 1) * d] for g in range(h) for k in range(9)))
    x = torch.randn(2, 5, c, dtype=torch.float64)
    planes = R.mix_planes(x @ w_v.t(), m)
    torch.testing.assert_close(planes, torch.einsum("bpc,tdc->bptd", x, taps))


def test_initial_mixing_is_head_average():
    # §1.7: with A = ones, all taps equal the head-average of Wv and the 3x3 output map is (9/h) sum_g Wo^(g)
    h, d, c = 4, 2, 8
    w_v, w_o = torch.randn(h * d, c), torch.randn(c, h * d)
    m = R.head_mix(torch.ones(h, 9), 0.01)
    taps, _, om = R.mixed_conv_params(w_v, None, w_o, m, h, "3x3")
    avg = w_v.reshape(h, d, c).mean(0)
    for k in range(9):
        torch.testing.assert_close(taps[k], avg)
    torch.testing.assert_close(om, 9 / h * w_o.reshape(c, h, d).sum(1))


def test_gated_attn_conv_selects_candidates():
    torch.manual_seed(4)
    b, h, d, grid = 2, 2, 4, (3, 3)
    c = h * d
    x = torch.randn(b, 10, c, dtype=torch.float64)
    ws = [torch.randn(2 * c, c), torch.randn(2 * c), torch.randn(c, c), torch.randn(c), torch.randn(c, c), torch.randn(c)]
    ws = [w.double() for w in ws]
    a = torch.randn(h, 9, dtype=torch.float64)

    def bn():
        return R.BNState(torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                         torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64))

    outs = {}
    for name, g in {"msa": (1, 1, 1), "3x3": (1, 1, 0), "1x1": (1, 0, 0), "skip": (0, 0, 0)}.items():
        outs[name] = R.gated_attn_conv(x, *ws, a, bn(), bn(), torch.tensor(g, dtype=torch.float64), num_heads=h,
                                       alpha=0.3, grid=grid, training=False)
    torch.testing.assert_close(outs["msa"], R.msa(x, *ws, h))
    assert torch.count_nonzero(outs["skip"]) == 0
    m = R.head_mix(a, 0.3)
    for kind in ("3x3", "1x1"):
        taps, tb, om = R.mixed_conv_params(ws[2], ws[3], ws[4], m, h, kind)
        ref = R.conv_attention(x, taps, tb, om, ws[5], bn(), grid, training=False)
        torch.testing.assert_close(outs[kind], ref)


def test_detach_rule_changes_no_gradient():
    torch.manual_seed(5)
    for pattern in [(1, 1, 1), (1, 1, 0), (1, 0, 0), (0, 0, 0)]:
        g = torch.tensor(pattern, dtype=torch.float64, requires_grad=True)
        outs = torch.randn(3, dtype=torch.float64)
        f = lambda e: sum(c * o for c, o in zip(R.gate_coefficients(e), outs))  # noqa: E731
        ga, = torch.autograd.grad(f(R.detach_rule(g)), g)
        gb, = torch.autograd.grad(f(g), g)
        torch.testing.assert_close(ga, gb)
        torch.testing.assert_close(R.detach_rule(g).detach(), g.detach())


def test_fold_bn_and_deploy_conv_equal_conv_attention():
    torch.manual_seed(6)
    c, d, grid = 8, 4, (3, 4)
    x = torch.randn(2, 13, c, dtype=torch.float64)
    for t in (9, 1):
        taps = torch.randn(t, d, c, dtype=torch.float64)
        tb, om, bo = torch.randn(d, dtype=torch.float64), torch.randn(c, d, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
        bn = R.BNState(torch.rand(d, dtype=torch.float64) + 0.5, torch.randn(d, dtype=torch.float64),
                       torch.randn(d, dtype=torch.float64), torch.rand(d, dtype=torch.float64) + 0.5)
        ref = R.conv_attention(x, taps, tb, om, bo, bn, grid, training=False)
        wp, bf = R.fold_bn(taps, tb, bn)
        torch.testing.assert_close(R.deploy_conv(x, wp, bf, om, bo, grid), ref)


def test_conv_weight_taps_roundtrip():
    w = torch.randn(4, 6, 3, 3)
    torch.testing.assert_close(R.taps_to_conv_weight(R.conv_weight_to_taps(w)), w)
    torch.testing.assert_close(R.conv_weight_to_taps(w), torch.stack([w[:, :, k % 3, k // 3] for k in range(9)]))


@pytest.mark.parametrize("groups", [1, 3])
def test_msa_attn_bias_equals_explicit_softmax(groups):
    # Windowed attention (Swin, docs/method.md §7.2): row b of the batch adds attn_bias[b % G] to its logits.
    torch.manual_seed(3)
    b, n, h, d = 6, 9, 2, 4
    c = h * d
    x = torch.randn(b, n, c, dtype=torch.float64)
    w_qk, b_qk = torch.randn(2 * c, c, dtype=torch.float64), torch.randn(2 * c, dtype=torch.float64)
    w_v, b_v = torch.randn(c, c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    w_o, b_o = torch.randn(c, c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    bias = torch.randn(groups, h, n, n, dtype=torch.float64)
    bias[..., 0, 1] = -100.0  # a masked pair, as the shift mask writes it
    got = R.msa(x, w_qk, b_qk, w_v, b_v, w_o, b_o, h, attn_bias=bias)
    want = torch.empty_like(x)
    for i in range(b):
        qk = x[i] @ w_qk.t() + b_qk
        v = x[i] @ w_v.t() + b_v
        heads = []
        for j in range(h):
            q, k = qk[:, j * d:(j + 1) * d], qk[:, c + j * d:c + (j + 1) * d]
            a = torch.softmax(q @ k.t() / d ** 0.5 + bias[i % groups, j], dim=-1)
            heads.append(a @ v[:, j * d:(j + 1) * d])
        want[i] = torch.cat(heads, -1) @ w_o.t() + b_o
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="does not divide"):
        R.msa(x, w_qk, b_qk, w_v, b_v, w_o, b_o, h, attn_bias=torch.zeros(4, h, n, n, dtype=torch.float64))
    with pytest.raises(ValueError, match="attn_bias must be"):
        R.msa(x, w_qk, b_qk, w_v, b_v, w_o, b_o, h, attn_bias=torch.zeros(1, h, n, n - 1, dtype=torch.float64))
