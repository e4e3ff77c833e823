"""Swin Transformer: signature, search-mode layer against independent eager formulations, supernet vs timm."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import spvit
from spvit import gates as G
from spvit.arch import Architecture, BlockArch, SwinSignature
from spvit.models import UnsupportedModelError
from spvit.models.swin import SwinSearchAttention, swin_signature_of
from tests.helpers import randomise_bn, tiny_vit
from tests.helpers import tiny_swin as helpers_tiny_swin

# Swin column j -> offset (dy, dx) (docs/method.md §1.3): centre first, then DeiT's taps 0-3 and 5-8
SWIN_OFFSETS = [(0, 0), (-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)]


# The Swin of these tests: 56 px, patch 4, window 7 (stages on 14x14 and 7x7 maps), dim 64, timm's FFN ratio.
SWIN56 = dict(img_size=56, patch_size=4, window_size=7, embed_dim=64, depths=(2, 2), num_heads=(2, 4), mlp_ratio=4.0,
              drop_path_rate=0.0)


def tiny_swin(**kw):
    return helpers_tiny_swin(rel_pos_std=0.1, **{**SWIN56, **kw})


def _randomise(sn, seed=0):
    g = torch.Generator().manual_seed(seed)
    randomise_bn(sn, seed)
    with torch.no_grad():
        for a in sn.attns:
            a.head_probs.copy_(torch.randn(a.head_probs.shape, generator=g) * 30)  # alpha 100: visible mixing


def _force(attn, choice):
    with torch.no_grad():
        attn.kernel_thresholds_full.copy_(G.logits_for_choice(choice, 2.0))


# ----------------------------------------------------------------------------------------------------------------------
# signature, architecture
# ----------------------------------------------------------------------------------------------------------------------
def test_signature_of_tiny_and_swin_t():
    sig = swin_signature_of(tiny_swin())
    assert sig == SwinSignature(64, (2, 2), (2, 4), 7, (14, 14), 4, 3, (256, 512), 10)
    assert sig.family == "swin" and sig.depth == 4 and sig.head_dim == 32 and sig.img_size == (56, 56)
    assert sig.stage_dims == (64, 128) and sig.stage_grid(1) == (7, 7)
    assert (sig.stage_window(0), sig.stage_shift(0), sig.stage_window(1), sig.stage_shift(1)) == (7, 3, 7, 0)
    import timm
    with torch.device("meta"):
        t = swin_signature_of(timm.create_model("swin_tiny_patch4_window7_224"))
    assert t.depths == (2, 2, 6, 2) and t.num_heads == (3, 6, 12, 24) and t.grid == (56, 56)
    assert t.mlp_hidden == (384, 768, 1536, 3072) and t.head_dim == 32 and spvit.ModelSignature.family == "vit"


def test_unsupported_swins_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="not divisible by the window"):
        swin_signature_of(tiny_swin(img_size=64))  # 16x16 stage grid, window 7: timm would pad
    with pytest.raises(UnsupportedModelError, match="head dims"):
        swin_signature_of(tiny_swin(num_heads=(2, 2)))
    m = tiny_swin()
    m.layers[0].blocks[1].mlp.act = nn.ReLU()
    with pytest.raises(UnsupportedModelError, match="GELU"):
        spvit.supernet(m)
    m = tiny_swin()
    m.absolute_pos_embed = nn.Parameter(torch.zeros(1, 196, 64))
    with pytest.raises(UnsupportedModelError, match="absolute position"):
        spvit.supernet(m)
    with pytest.raises(UnsupportedModelError, match="dynamic image size"):
        swin_signature_of(tiny_swin(strict_img_size=False))
    with pytest.raises(UnsupportedModelError, match="SwinTransformer"):
        swin_signature_of(tiny_vit())


def test_architecture_json_nested_and_family_errors(tmp_path):
    sn = spvit.supernet(tiny_swin())
    choices = ["1x1", "skip", "msa", "3x3"]
    arch = Architecture(sn.model_name, sn.signature,
                        [BlockArch(a, tuple(range(0, h, 3))) for a, h in zip(choices, sn.signature.block_mlp_hidden)])
    d = arch.to_dict()
    assert d["signature"]["family"] == "swin" and "blocks" not in d
    assert [[b["attn"] for b in st] for st in d["stages"]] == [["1x1", "skip"], ["msa", "3x3"]]
    assert [[b.attn for b in st] for st in arch.stages] == [["1x1", "skip"], ["msa", "3x3"]]
    arch.save(str(tmp_path / "a.json"))
    assert Architecture.load(str(tmp_path / "a.json")) == arch
    with pytest.raises(ValueError, match="out of range"):
        Architecture(sn.model_name, sn.signature, [BlockArch("msa", (300,))] * 4)  # stage 1 has 256 units
    vit_arch = spvit.supernet(tiny_vit(depth=4)).architecture()
    assert "family" not in vit_arch.to_dict()["signature"]  # ViT JSON unchanged
    with pytest.raises(ValueError, match="ViT/DeiT model .* a Swin model"):
        spvit.prune(tiny_swin(), vit_arch)
    with pytest.raises(ValueError, match="Swin model .* a ViT/DeiT model"):
        spvit.prune(tiny_vit(depth=4), arch)
    with pytest.raises(ValueError, match="Swin model"):
        spvit.supernet(tiny_vit(depth=4)).fix_architecture(arch)


# ----------------------------------------------------------------------------------------------------------------------
# search mode
# ----------------------------------------------------------------------------------------------------------------------
def test_search_attention_shares_the_timm_weights():
    """At 56 px with 7x7 windows (the all-MSA supernet equals the timm model: tests/test_families.py)."""
    m = tiny_swin()
    sn = spvit.supernet(m).eval()
    assert sn.alpha == 100 and spvit.supernet(tiny_vit()).alpha == 0.01
    assert type(sn.attns[1]) is SwinSearchAttention and sn.swin.layers[0].blocks[1].shift_size == (3, 3)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(sn(x), m(x), rtol=1e-5, atol=1e-5)
    a, t = sn.attns[2], m.layers[1].blocks[0].attn
    torch.testing.assert_close(a.qk.weight, t.qkv.weight[:256])
    torch.testing.assert_close(a.v.bias, t.qkv.bias[256:])
    torch.testing.assert_close(a.relative_position_bias_table, t.relative_position_bias_table)
    assert torch.equal(a.relative_position_index, t.relative_position_index)
    names = dict(sn.named_parameters())
    assert "swin.layers.0.blocks.1.attn.kernel_thresholds_full" in names and "swin.head.fc.weight" in names
    assert len(sn.arch_parameters()) == 8  # 4 attention + 4 FFN gate vectors
    with pytest.raises(ValueError, match="expected images"):
        sn(torch.randn(1, 3, 64, 64))


def _mixed(attn):
    """Reference mixed weights in the Swin order: taps (9, d, C), tap biases (9, d), output maps (9, C, d)."""
    h, d, c = attn.num_heads, attn.head_dim, attn.dim
    m = torch.softmax(attn.head_probs / attn.alpha, dim=0)  # (h, 9)
    wv = attn.v.weight.reshape(h, d, c)
    taps = torch.stack([sum(m[g, j] * wv[g] for g in range(h)) for j in range(9)])
    bias = torch.stack([sum(m[g, j] * attn.v.bias.reshape(h, d)[g] for g in range(h)) for j in range(9)])
    wo = attn.proj.weight.reshape(c, h, d)
    outs = torch.stack([sum(m[g, j] * wo[:, g] for g in range(h)) for j in range(9)])
    return taps, bias, outs


def _ref_conv3x3_windows(attn, x):
    """3x3 candidate by F.conv2d on every window (zero padding at the window border), BN (eval), ReLU, out map."""
    w = attn.window
    taps, bias, outs = _mixed(attn)
    weight = torch.zeros(attn.head_dim, attn.dim, 3, 3)
    for j, (dy, dx) in enumerate(SWIN_OFFSETS):
        weight[:, :, dy + 1, dx + 1] = taps[j]
    img = x.reshape(-1, w, w, attn.dim).permute(0, 3, 1, 2)
    y = F.conv2d(img, weight, bias.sum(0), padding=1)
    bn = attn.bn_3x3
    r = torch.relu((y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
                   * bn.weight[:, None, None] + bn.bias[:, None, None])
    return r.permute(0, 2, 3, 1).reshape(x.shape[0], w * w, -1) @ outs.sum(0).t() + attn.proj.bias, y


def _ref_conv1x1(attn, x):
    taps, bias, outs = _mixed(attn)
    y = x @ taps[0].t() + bias[0]  # per-token linear with the centre (column 0) tap
    bn = attn.bn_1x1
    r = torch.relu((y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
    return r @ outs[0].t() + attn.proj.bias, y


def _ref_window_msa(attn, x, mask):
    """Window MSA written out: scores + relative position bias (table indexed by hand) + mask, softmax, values."""
    bw, n, c = x.shape
    h, d, w = attn.num_heads, attn.head_dim, attn.window
    q, k = (x @ attn.qk.weight.t() + attn.qk.bias).reshape(bw, n, 2, h, d).permute(2, 0, 3, 1, 4)
    v = (x @ attn.v.weight.t() + attn.v.bias).reshape(bw, n, h, d).transpose(1, 2)
    rel = torch.empty(h, n, n)
    for i in range(n):
        for j in range(n):
            dr, dc = i // w - j // w, i % w - j % w
            rel[:, i, j] = attn.relative_position_bias_table[(dr + w - 1) * (2 * w - 1) + dc + w - 1]
    s = q @ k.transpose(-1, -2) / d ** 0.5 + rel
    if mask is not None:
        s = (s.reshape(-1, mask.shape[0], h, n, n) + mask[None, :, None]).reshape(bw, h, n, n)
    o = torch.softmax(s, -1) @ v
    return o.transpose(1, 2).reshape(bw, n, c) @ attn.proj.weight.t() + attn.proj.bias


@pytest.mark.parametrize("choice", ["msa", "3x3", "1x1", "skip"])
def test_search_candidates_match_independent_references(choice):
    sn = spvit.supernet(tiny_swin())
    _randomise(sn)
    blk = sn.swin.layers[0].blocks[1]  # shifted block: 4 windows of 7x7, with the mask
    attn = blk.attn.eval()
    _force(attn, choice)
    x = torch.randn(2 * 4, 49, 64)
    mask = blk.attn_mask
    with torch.no_grad():
        out = attn(x, mask=mask)
        ref = {"msa": lambda: _ref_window_msa(attn, x, mask), "3x3": lambda: _ref_conv3x3_windows(attn, x)[0],
               "1x1": lambda: _ref_conv1x1(attn, x)[0], "skip": lambda: torch.zeros_like(x)}[choice]()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if choice == "msa":  # and timm's window attention agrees with the reference
        from timm.models.swin_transformer import WindowAttention
        wa = WindowAttention(64, num_heads=2, window_size=7).eval()
        with torch.no_grad():
            wa.qkv.weight.copy_(torch.cat([attn.qk.weight, attn.v.weight]))
            wa.qkv.bias.copy_(torch.cat([attn.qk.bias, attn.v.bias]))
            wa.proj.load_state_dict(attn.proj.state_dict())
            wa.relative_position_bias_table.copy_(attn.relative_position_bias_table)
            torch.testing.assert_close(wa(x, mask=mask), ref, rtol=1e-5, atol=1e-5)


def test_shifted_block_3x3_is_window_local_on_the_rolled_map():
    """A whole shifted block with the 3x3 picked: roll by -3, conv inside each 7x7 tile, roll back (§7.2)."""
    sn = spvit.supernet(tiny_swin())
    _randomise(sn, seed=3)
    blk = sn.swin.layers[0].blocks[1].eval()
    _force(blk.attn, "3x3")
    x = torch.randn(2, 14, 14, 64)
    with torch.no_grad():
        out = blk(x)
        xh = torch.roll(blk.norm1(x), (-3, -3), dims=(1, 2))
        y = torch.empty_like(xh)
        for b in range(2):
            for ti in range(2):
                for tj in range(2):
                    rows, cols = slice(7 * ti, 7 * ti + 7), slice(7 * tj, 7 * tj + 7)
                    tile = xh[b, rows, cols].reshape(1, 49, 64)
                    y[b, rows, cols] = _ref_conv3x3_windows(blk.attn, tile)[0].reshape(7, 7, 64)
        h = x + torch.roll(y, (3, 3), dims=(1, 2))
        mlp = blk.mlp
        f = F.gelu(blk.norm2(h) @ mlp.fc1.weight.t() + mlp.fc1.bias) @ mlp.fc2.weight.t() + mlp.fc2.bias
    torch.testing.assert_close(out, h + f, rtol=1e-5, atol=1e-5)


def test_train_mode_bn_statistics_over_all_windows():
    sn = spvit.supernet(tiny_swin())
    _randomise(sn, seed=1)
    attn = sn.swin.layers[0].blocks[1].attn
    x = torch.randn(3 * 4, 49, 64)
    with torch.no_grad():
        _, y3 = _ref_conv3x3_windows(attn, x)  # pre-BN conv outputs (12, d, 7, 7) with the current weights
        _, y1 = _ref_conv1x1(attn, x)
        rm3, rv3 = attn.bn_3x3.running_mean.clone(), attn.bn_3x3.running_var.clone()
        rm1 = attn.bn_1x1.running_mean.clone()
        attn.train()
        attn(x, mask=sn.swin.layers[0].blocks[1].attn_mask)  # both BNs update every training step (§4.6)
    torch.testing.assert_close(attn.bn_3x3.running_mean, 0.9 * rm3 + 0.1 * y3.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.bn_3x3.running_var, 0.9 * rv3 + 0.1 * y3.var((0, 2, 3), unbiased=True),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.bn_1x1.running_mean, 0.9 * rm1 + 0.1 * y1.reshape(-1, 32).mean(0),
                               rtol=1e-5, atol=1e-6)
    assert int(attn.bn_3x3.num_batches_tracked) == int(attn.bn_1x1.num_batches_tracked) == 1


def test_train_step_backprops_to_gates_and_weights():
    torch.manual_seed(0)
    sn = spvit.supernet(tiny_swin()).train()
    loss = sn(torch.randn(2, 3, 56, 56)).square().mean() + sn.flops_loss(0.8 * sn.dense_gflops(), 1.0)
    loss.backward()
    for a in sn.attns:
        assert a.kernel_thresholds_full.grad is not None and a.kernel_thresholds_full.grad.abs().sum() > 0
        assert a.head_probs.grad is not None and a.v.weight.grad is not None
    for m in sn.mlps:
        assert m.ffn_thresholds.grad.abs().sum() > 0


def test_gate_gradients_follow_the_closed_form_with_the_detach_rule():
    """With MSA picked, dL/de_m = S_m - S_3 and the 1x1/3x3 gates get none (the detach rule, §2.2, §2.5)."""
    sn = spvit.supernet(tiny_swin())
    _randomise(sn, seed=2)
    blk = sn.swin.layers[0].blocks[1]
    attn = blk.attn.eval()
    x = torch.randn(8, 49, 64)
    gmat = torch.randn(8, 49, 64)
    for pattern in ((1.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0)):
        s = torch.tensor(pattern, requires_grad=True)
        attn.gates = lambda s=s: G.cumulative(s)
        (attn(x, mask=blk.attn_mask) * gmat).sum().backward()
        with torch.no_grad():
            sm = (_ref_window_msa(attn, x, blk.attn_mask) * gmat).sum()
            s3 = (_ref_conv3x3_windows(attn, x)[0] * gmat).sum()
            s1 = (_ref_conv1x1(attn, x)[0] * gmat).sum()
        e1, e3, em = G.cumulative(s.detach())
        d_em = sm - e3 * s3 - e1 * (1 - e3) * s1
        d_e3 = (1 - em) * (s3 - e1 * s1)
        d_e1 = (1 - e3) * (1 - em) * s1
        s1_, s3_, sm_ = s.detach()
        want = torch.stack([d_e1 + s3_ * d_e3 + s3_ * sm_ * d_em, s1_ * d_e3 + s1_ * sm_ * d_em, s1_ * s3_ * d_em])
        torch.testing.assert_close(s.grad, want, rtol=1e-4, atol=1e-3)
    del attn.gates


def test_flops_loss_and_readout_fix_roundtrip():
    sn = spvit.supernet(tiny_swin())
    sig = sn.signature
    arch = Architecture(sn.model_name, sig, [BlockArch(a, tuple(range(w))) for a, w in
                                             zip(["1x1", "skip", "3x3", "msa"], [100, 0, 7, 512])])
    sn.fix_architecture(arch)
    assert sn.architecture() == arch
    assert sn.gflops() == pytest.approx(spvit.gflops(arch))
    assert sn.min_gflops() < sn.gflops() < sn.dense_gflops()
    with pytest.raises(ValueError, match="cannot be met"):
        sn.flops_loss(2 * sn.dense_gflops(), 1.0)
    rows = sn.gate_summary()
    assert [r["stage"] for r in rows] == [0, 0, 1, 1] and rows[0]["attn"] == "1x1"


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs model (docs/method.md §7.5), published architectures (§8.3, §8.4)
# ----------------------------------------------------------------------------------------------------------------------
GOLDEN_DENSE = {"swin_tiny_patch4_window7_224": 4_494_405_120, "swin_small_patch4_window7_224": 8_746_520_064,
                "swin_base_patch4_window7_224": 15_438_473_216}


def test_dense_swin_golden():
    import timm
    from spvit.flops import dense_macs
    for name, macs in GOLDEN_DENSE.items():
        with torch.device("meta"):  # shapes only: fast
            m = timm.create_model(name)
        assert dense_macs(swin_signature_of(m)) == macs
        assert spvit.gflops(m) == pytest.approx(macs / 1e9)


def test_swin_t_stage_costs_by_hand():
    import timm
    from spvit.flops import swin_stage_costs
    with torch.device("meta"):
        sig = swin_signature_of(timm.create_model("swin_tiny_patch4_window7_224"))
    # stage 3: dim 384 on 14x14 = 4 windows of 49 tokens, d = 32
    c1, c3, cm, per_unit, norms = swin_stage_costs(sig, 2)
    assert (c1, c3, per_unit, norms) == (2 * 384 * 32 * 196, 10 * 384 * 32 * 196, 2 * 196 * 384, 2 * 384 * 196)
    assert cm == 4 * (49 * 384 * 3 * 384 + 2 * 12 * 49 * 32 * 49 + 49 * 384 * 384)


@pytest.mark.parametrize("name,macs,mparams", [("spvit_swin_tiny_patch4_window7_224", 3_334_210_560, 26.31),
                                               ("spvit_swin_small_patch4_window7_224", 6_143_213_568, 39.21),
                                               ("spvit_swin_base_patch4_window7_224", 11_392_180_224, 68.03)])
def test_registered_shipped_swin_models(name, macs, mparams):
    import timm
    from spvit.flops import arch_macs
    with torch.device("meta"):
        m = timm.create_model(name)
    assert isinstance(m, spvit.SwinPrunedModel)
    assert arch_macs(m.architecture) == macs
    # docs/method.md §8.4 recount: fine-tune-format parameters (incl. head_probs and BN affine, excl. BN buffers)
    assert spvit.count_params(m) / 1e6 == pytest.approx(mparams, abs=5e-3)
    assert not any(b.attn == "3x3" for b in m.architecture.blocks)
    cfg = m.pretrained_cfg
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic" and cfg["classifier"] == "swin.head.fc"
    release = {"tiny": "spvit_swin_t_l28_t32.pth", "small": "spvit_swin_sm_l04_t55.pth"}.get(name.split("_")[2])
    assert (release in cfg["notes"][0]) if release else cfg["notes"] == ("no released weights",)


def test_registered_swin_pretrained_needs_a_file_and_other_class_counts_work(tmp_path):
    import timm
    with pytest.raises(ValueError, match="spvit_swin_t_l28_t32.pth"):
        timm.create_model("spvit_swin_tiny_patch4_window7_224", pretrained=True)
    with pytest.raises(ValueError, match="no weights were released"):
        timm.create_model("spvit_swin_base_patch4_window7_224", pretrained=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        timm.create_model("spvit_swin_small_patch4_window7_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.pth")))
    with torch.device("meta"):
        m = timm.create_model("spvit_swin_small_patch4_window7_224", num_classes=10)
    assert m.num_classes == 10 and m.pretrained_cfg["num_classes"] == 10
    assert m.architecture.stages[2][12].attn == "skip" and m.architecture.stages[2][13].attn == "1x1"


# ----------------------------------------------------------------------------------------------------------------------
# fine-tune (pruned) mode, docs/method.md §7.4
# ----------------------------------------------------------------------------------------------------------------------
def _arch(sn, choices, seed=7):
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for a, hidden in zip(choices, sn.signature.block_mlp_hidden):
        w = int(torch.randint(0, hidden + 1, (1,), generator=g))
        blocks.append(BlockArch(a, tuple(sorted(torch.randperm(hidden, generator=g)[:w].tolist()))))
    return Architecture(sn.model_name, sn.signature, blocks)


@pytest.mark.parametrize("choices", [["1x1", "skip", "msa", "1x1"], ["msa", "1x1", "skip", "msa"]])
def test_pruned_from_supernet_keeps_shifted_windows(choices):
    sn = spvit.supernet(tiny_swin())
    _randomise(sn)
    arch = _arch(sn, choices)
    sn.fix_architecture(arch)
    sn.eval()
    pruned = spvit.prune(sn, arch).eval()
    assert isinstance(pruned, spvit.SwinPrunedModel) and pruned.architecture == arch
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), sn(x), rtol=1e-5, atol=1e-5)
    assert spvit.gflops(pruned) == pytest.approx(sn.gflops())
    assert swin_signature_of(pruned) == sn.signature
    blk = pruned.swin.layers[0].blocks[1]
    assert type(blk).__name__ == "SwinPrunedBlock" and blk.shift_size == (3, 3) and blk.attn_mask is not None
    names = {n for n, _ in pruned.named_parameters()}
    msa = [i for i, c in enumerate(choices) if c == "msa"][0]
    s, j = divmod(msa, 2)
    assert f"swin.layers.{s}.blocks.{j}.attn.relative_position_bias_table" in names
    assert f"swin.layers.{s}.blocks.{j}.attn.qkv.weight" in names


def test_pruned_from_dense_equals_supernet_with_fresh_conv_state():
    m = tiny_swin()
    sn = spvit.supernet(m)
    arch = _arch(sn, ["1x1", "skip", "1x1", "msa"])
    pruned = spvit.prune(m, arch).eval()
    conv = pruned.swin.layers[0].blocks[0].attn
    assert conv.tap_order == "swin" and conv.num_prefix_tokens == 0 and conv.alpha == 100
    assert torch.all(conv.head_probs == 1) and torch.all(conv.bn.running_var == 1)
    torch.testing.assert_close(conv.v.weight, m.layers[0].blocks[0].attn.qkv.weight[128:])
    sn.fix_architecture(arch)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), sn.eval()(x), rtol=1e-5, atol=1e-5)


def _ref_conv3x3_full_map(conv, x):
    """Fine-tune 3x3: F.conv2d on the whole (B, C, H, W) map, zero padding at the image border (§7.4)."""
    b, h, w, c = x.shape
    m = torch.softmax(conv.head_probs / conv.alpha, dim=0)
    hh, d = conv.num_heads, conv.head_dim
    wv, bv, wo = conv.v.weight.reshape(hh, d, c), conv.v.bias.reshape(hh, d), conv.proj.weight.reshape(c, hh, d)
    weight = torch.zeros(d, c, 3, 3)
    for j, (dy, dx) in enumerate(SWIN_OFFSETS):
        weight[:, :, dy + 1, dx + 1] = sum(m[g, j] * wv[g] for g in range(hh))
    bias = sum(m[g, j] * bv[g] for g in range(hh) for j in range(9))
    out_map = sum(m[g, j] * wo[:, g] for g in range(hh) for j in range(9))
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1)
    bn = conv.bn
    r = torch.relu((y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
                   * bn.weight[:, None, None] + bn.bias[:, None, None])
    return r.permute(0, 2, 3, 1) @ out_map.t() + conv.proj.bias


def test_finetune_3x3_full_map_vs_search_3x3_windows():
    """Fine-tune 3x3 runs on the whole unshifted map; search 3x3 per window (docs/method.md §11.2, Q20): each
    matches its own reference; they agree away from window borders of an unshifted block and differ on them."""
    sn = spvit.supernet(tiny_swin())
    _randomise(sn, seed=4)
    arch = _arch(sn, ["3x3", "3x3", "msa", "msa"])
    sn.fix_architecture(arch)
    sn.eval()
    pruned = spvit.prune(sn, arch).eval()
    x = torch.randn(2, 14, 14, 64)
    for j in (0, 1):  # unshifted and shifted block
        pblk, sblk = pruned.swin.layers[0].blocks[j], sn.swin.layers[0].blocks[j]
        with torch.no_grad():
            xh = pblk.norm1(x)
            ref = x + _ref_conv3x3_full_map(pblk.attn, xh)
            h = ref.reshape(2, 196, 64)
            ref = (h + pblk.mlp(pblk.norm2(h))).reshape(2, 14, 14, 64)
            torch.testing.assert_close(pblk(x), ref, rtol=1e-5, atol=1e-5)
            if j == 0:
                diff = (pblk(x) - sblk(x)).abs().amax(dim=(0, 3))  # (14, 14)
                border = torch.zeros(14, 14, dtype=torch.bool)
                for k in (0, 6, 7, 13):
                    border[k, :] = border[:, k] = True
                assert diff[~border].max() < 1e-5 and diff[6:8].min() > 1e-4
    with torch.no_grad():  # the whole model too
        out = pruned(torch.randn(1, 3, 56, 56))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_official_skip_adds_ln1_and_default_skip_is_identity():
    m = tiny_swin()
    sn = spvit.supernet(m)
    arch = _arch(sn, ["skip", "msa", "msa", "msa"])
    x = torch.randn(2, 14, 14, 64)
    for official in (False, True):
        with pytest.warns(UserWarning, match="LN1") if official else _no_warning():
            pruned = spvit.prune(m, arch, official_skip=official).eval()
        blk = pruned.swin.layers[0].blocks[0]
        with torch.no_grad():
            h = x + blk.norm1(x) if official else x
            h = h.reshape(2, 196, 64)
            torch.testing.assert_close(blk(x), (h + blk.mlp(blk.norm2(h))).reshape(2, 14, 14, 64))


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_pruned_swin_trains_and_has_timm_api():
    sn = spvit.supernet(tiny_swin())
    arch = _arch(sn, ["3x3", "1x1", "skip", "msa"])
    pruned = spvit.prune(sn, arch).train()
    pruned(torch.randn(2, 3, 56, 56)).sum().backward()
    assert pruned.swin.layers[0].blocks[0].attn.head_probs.grad.abs().sum() > 0
    assert pruned.swin.layers[1].blocks[1].attn.qkv.weight.grad is not None
    assert all(n.endswith("relative_position_bias_table") for n in pruned.no_weight_decay())
    assert len(pruned.no_weight_decay()) == 1
    assert pruned.forward_features(torch.randn(1, 3, 56, 56)).shape == (1, 7, 7, 128)
    pruned.reset_classifier(3)
    assert pruned.eval()(torch.randn(1, 3, 56, 56)).shape == (1, 3) and pruned.architecture.signature.num_classes == 3
    feats = pruned.forward_intermediates(torch.randn(1, 3, 56, 56), intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 14, 14), (1, 128, 7, 7)]
    all_skip = _arch(sn, ["skip", "skip", "msa", "msa"])
    assert swin_signature_of(spvit.prune(sn, all_skip)) == sn.signature  # heads of an all-skip stage remembered
