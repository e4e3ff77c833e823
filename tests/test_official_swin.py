"""Original SPViT Swin checkpoints (spvit.load_official on a timm Swin): search, fine-tune and parameter-optimised
layouts, the FFN indicator files, quirk Q9, and checkpoints of another model.

The original key layout is written here from the original module tree (PatchMerging at the end of a stage, ``head``,
``qk`` / ``v``, persistent ``relative_position_index`` / ``attn_mask`` buffers), and :func:`original_forward` is an
independent eager implementation of the original fine-tune Swin computed straight from such a state dict.
"""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import spvit
from spvit.arch import Architecture, BlockArch
from spvit.models.convert import model_name_of, signature_of
from spvit.models.official_swin import read_ffn_indicators
from tests.helpers import FAMILIES, SWIN_CFG, randomise_conv_state, tiny_swin

ALPHA = 100.0
CFG = SWIN_CFG
# every choice: stage 1 [msa, 3x3 (shifted block: full-map conv)], stage 2 [1x1, msa (shifted)], stage 3 [skip, msa]
CHOICES, KEEP = FAMILIES["swin"].choices, FAMILIES["swin"].keep
# Swin column j of head_probs -> (dy, dx) of the 3x3 tap (centre first; docs/method.md §1.3)
SWIN_TAPS = [(0, 0), (-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)]
DATA = os.path.join(os.path.dirname(__file__), "data")


def randomise(model):
    """Non-trivial BN statistics and head mixing (alpha 100: logits spread of order 100 to matter)."""
    return randomise_conv_state(model, 60.0)


def swin_pruned(choices=CHOICES, keep=KEEP, official_skip=True):
    m = tiny_swin()
    arch = Architecture(model_name_of(m), signature_of(m), [BlockArch(a, tuple(k)) for a, k in zip(choices, keep)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official-skip notice
        return randomise(spvit.prune(m, arch, official_skip=official_skip)).eval()


# ----------------------------------------------------------------------------------------------------------------------
# The original layout, written from the original module tree
# ----------------------------------------------------------------------------------------------------------------------
def rel_index(w):
    """The original's (N, N) relative position index: (dr + w - 1) * (2w - 1) + (dc + w - 1)."""
    coords = [(r, c) for r in range(w) for c in range(w)]
    return torch.tensor([[(a[0] - b[0] + w - 1) * (2 * w - 1) + a[1] - b[1] + w - 1 for b in coords]
                         for a in coords])


def shift_mask(res, w, s):
    """The original's (nW, N, N) mask of a shifted block: -100 between tokens of different regions."""
    region = torch.zeros(res, res)
    cuts = [(0, res - w), (res - w, res - s), (res - s, res)]
    for i, (r0, r1) in enumerate(cuts):
        for j, (c0, c1) in enumerate(cuts):
            region[r0:r1, c0:c1] = 3 * i + j
    win = region.reshape(res // w, w, res // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


def stage_layout(depths=CFG["depths"], grid=16, window=4):
    """[(stage, block, resolution, window, shift)] of the original model."""
    out = []
    for s, depth in enumerate(depths):
        res = grid // 2 ** s
        w = min(window, res)
        for j in range(depth):
            out.append((s, j, res, w, w // 2 if (j % 2 and res > window) else 0))
    return out


def original_layout(model):
    """Our Swin model's state dict in the original's key layout (search or fine-tune module tree)."""
    sig = model.signature
    sd = {}
    for k, v in model.state_dict().items():
        k = k[len("swin."):]
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":  # the end of the previous stage in the original
            k = ".".join(["layers", str(int(parts[1]) - 1)] + parts[2:])
        elif parts[0] == "head":  # head.fc.* -> head.*
            k = "head." + parts[-1]
        if ".attn.qkv." in k:
            c = v.shape[0] // 3
            sd[k.replace("qkv", "qk")], sd[k.replace("qkv", "v")] = v[:2 * c].clone(), v[2 * c:].clone()
        else:
            sd[k] = v.clone()
    for s, j, res, w, shift in stage_layout(sig.depths, sig.grid[0], sig.window_size):
        p = f"layers.{s}.blocks.{j}."
        if p + "attn.relative_position_bias_table" in sd:
            sd[p + "attn.relative_position_index"] = rel_index(w)
        if shift:
            sd[p + "attn_mask"] = shift_mask(res, w, shift)
    return sd


# ----------------------------------------------------------------------------------------------------------------------
# The original fine-tune Swin, computed from an original-layout state dict
# ----------------------------------------------------------------------------------------------------------------------
def _ln(x, sd, p, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"], eps)


def _bn_relu(y, sd, p):
    return torch.relu(F.batch_norm(y, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"],
                                   sd[p + "bias"], False, 0.0, 1e-5))


def _conv_layer(xn, sd, p, heads, alpha):
    """Fine-tune 1x1 / 3x3 on the full (B, C, H, W) map (head_probs in the Swin order), or a bconv layer."""
    if p + "bconv.0.weight" in sd:
        w0 = sd[p + "bconv.0.weight"]
        y = F.conv2d(xn, w0, sd[p + "bconv.0.bias"], padding=w0.shape[-1] // 2)
        r = _bn_relu(y, sd, p + "bconv.1.")
        return F.conv2d(r, sd[p + "bconv.3.weight"], sd[p + "bconv.3.bias"])
    c = xn.shape[1]
    d = c // heads
    mix = torch.softmax(sd[p + "head_probs"] / alpha, dim=0)  # (h, 9)
    wv, bv, wo = sd[p + "v.weight"].reshape(heads, d, c), sd[p + "v.bias"].reshape(heads, d), sd[p + "proj.weight"]
    K = torch.einsum("gj,gdc->jdc", mix, wv)
    cb = mix.t() @ bv
    Rm = torch.einsum("gj,cgd->jcd", mix, wo.reshape(c, heads, d))
    if p + "bn_3x3.weight" in sd:
        w = torch.zeros(d, c, 3, 3)
        for j, (dy, dx) in enumerate(SWIN_TAPS):
            w[:, :, dy + 1, dx + 1] = K[j]
        y = F.conv2d(xn, w, cb.sum(0), padding=1)
        r = _bn_relu(y, sd, p + "bn_3x3.")
        return F.conv2d(r, Rm.sum(0)[:, :, None, None], sd[p + "proj.bias"])
    y = F.conv2d(xn, K[0][:, :, None, None], cb[0])  # 1x1: the centre, column 0
    r = _bn_relu(y, sd, p + "bn_1x1.")
    return F.conv2d(r, Rm[0][:, :, None, None], sd[p + "proj.bias"])


def _window_msa(xn, sd, p, heads, w, shift, mask):
    b, hh, ww, c = xn.shape
    d = c // heads
    if shift:
        xn = torch.roll(xn, (-shift, -shift), (1, 2))
    win = xn.reshape(b, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
    n = w * w
    qk = F.linear(win, sd[p + "qk.weight"], sd.get(p + "qk.bias")).reshape(-1, n, 2, heads, d).permute(2, 0, 3, 1, 4)
    v = F.linear(win, sd[p + "v.weight"], sd[p + "v.bias"]).reshape(-1, n, heads, d).transpose(1, 2)
    logits = (qk[0] * d ** -0.5) @ qk[1].transpose(-1, -2)
    table = sd[p + "relative_position_bias_table"]
    logits = logits + table[rel_index(w).reshape(-1)].reshape(n, n, heads).permute(2, 0, 1)[None]
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.reshape(-1, nw, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    o = F.linear(o, sd[p + "proj.weight"], sd[p + "proj.bias"])
    o = o.reshape(b, hh // w, ww // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
    return torch.roll(o, (shift, shift), (1, 2)) if shift else o


def original_forward(sd, x, depths=CFG["depths"], heads=CFG["num_heads"], patch=CFG["patch_size"],
                     window=CFG["window_size"], alpha=ALPHA):
    """Logits of the original fine-tune SPVisionTransformerSwin for an original-layout state dict ``sd``."""
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = _ln(t.permute(0, 2, 3, 1), sd, "patch_embed.norm.")  # (B, H, W, C)
    layout = stage_layout(depths, t.shape[1], window)
    for s, depth in enumerate(depths):
        for (s2, j, res, w, shift) in [r for r in layout if r[0] == s]:
            p = f"layers.{s}.blocks.{j}."
            xn = _ln(t, sd, p + "norm1.")
            a = p + "attn."
            if a + "qk.weight" in sd:
                t = t + _window_msa(xn, sd, a, heads[s], w, shift, sd.get(p + "attn_mask"))
            elif any(k.startswith(a) for k in sd if "relative_position" not in k):
                t = t + _conv_layer(xn.permute(0, 3, 1, 2), sd, a, heads[s], alpha).permute(0, 2, 3, 1)
            else:
                t = t + xn  # the original fine-tune skip: the attention module returns its input (quirk Q4)
            hid = F.gelu(F.linear(_ln(t, sd, p + "norm2."), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
            t = t + F.linear(hid, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        if f"layers.{s}.downsample.reduction.weight" in sd:  # the original merges at the END of the stage
            x0, x1, x2, x3 = t[:, 0::2, 0::2], t[:, 1::2, 0::2], t[:, 0::2, 1::2], t[:, 1::2, 1::2]
            t = _ln(torch.cat([x0, x1, x2, x3], -1), sd, f"layers.{s}.downsample.norm.")
            t = F.linear(t, sd[f"layers.{s}.downsample.reduction.weight"])
    t = _ln(t, sd, "norm.").mean(dim=(1, 2))
    return F.linear(t, sd["head.weight"], sd["head.bias"])


def bconv_layout(pruned, alpha, center_col, tap_order):
    """The parameter-optimised layout (docs/method.md §6) of our pruned model's conv layers: what the original's
    post-training script writes when mixing with ``alpha``, taking the 1x1 from column ``center_col`` and laying the
    3x3 out in ``tap_order`` ("swin": the correct conversion; quirk Q9: the shipped script uses 0.01, 4, "deit")."""
    sd = original_layout(pruned)
    deit_taps = [(k % 3 - 1, k // 3 - 1) for k in range(9)]
    taps = SWIN_TAPS if tap_order == "swin" else deit_taps
    for s, j, *_ in stage_layout():
        p = f"layers.{s}.blocks.{j}.attn."
        if p + "head_probs" not in sd:
            continue
        heads = CFG["num_heads"][s]
        c = sd[p + "v.weight"].shape[1]
        d = c // heads
        mix = torch.softmax(sd.pop(p + "head_probs") / alpha, dim=0)
        wv, bv = sd.pop(p + "v.weight").reshape(heads, d, c), sd.pop(p + "v.bias").reshape(heads, d)
        wo = sd.pop(p + "proj.weight").reshape(c, heads, d)
        K, cb, Rm = torch.einsum("gj,gdc->jdc", mix, wv), mix.t() @ bv, torch.einsum("gj,cgd->jcd", mix, wo)
        bn = "bn_3x3." if p + "bn_3x3.weight" in sd else "bn_1x1."
        if bn == "bn_3x3.":
            w0 = torch.zeros(d, c, 3, 3)
            for col, (dy, dx) in enumerate(taps):
                w0[:, :, dy + 1, dx + 1] = K[col]
            b0, w3 = cb.sum(0), Rm.sum(0)
        else:
            w0, b0, w3 = K[center_col][:, :, None, None], cb[center_col], Rm[center_col]
        sd[p + "bconv.0.weight"], sd[p + "bconv.0.bias"] = w0, b0
        sd[p + "bconv.3.weight"], sd[p + "bconv.3.bias"] = w3[:, :, None, None], sd.pop(p + "proj.bias")
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            sd[p + "bconv.1." + t] = sd.pop(p + bn + t)
    return sd


def images(b=2):
    return torch.randn(b, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------
def test_finetune_checkpoint_equals_the_original_computation(tmp_path):
    ours = swin_pruned()
    sd = original_layout(ours)
    assert "layers.0.downsample.reduction.weight" in sd and "layers.2.downsample.norm.weight" not in sd
    assert "head.weight" in sd and "layers.1.blocks.1.attn_mask" in sd
    path = tmp_path / "ft.pth"
    torch.save({"model": sd}, path)
    with pytest.warns(UserWarning, match="Q4"):
        got = spvit.load_official(str(path), tiny_swin()).eval()
    assert isinstance(got, spvit.SwinPrunedModel)
    assert got.architecture.attn_choices == CHOICES
    assert got.architecture.ffn_widths == [len(k) for k in KEEP]
    assert got.alpha == ALPHA
    x = images()
    with torch.no_grad():
        ref = original_forward(sd, x)
        torch.testing.assert_close(ours(x), ref, atol=2e-5, rtol=1e-5)  # our model computes the original function
        torch.testing.assert_close(got(x), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got(x), ours(x), atol=1e-6, rtol=1e-6)


def test_finetune_checkpoint_trained_without_qkv_bias(tmp_path):
    """An original fine-tune of a ``qkv_bias=False`` Swin: its MSA layers' ``qk`` has no bias while the value
    projection keeps one (the original always builds ``v`` with a bias). It loads onto a base Swin with or without
    qkv biases and computes the original function."""
    sd = original_layout(swin_pruned())
    msa = [k for k in sd if k.endswith(".attn.qk.bias")]
    assert len(msa) == CHOICES.count("msa")
    for k in msa:
        del sd[k]
    assert all(k.replace("qk.bias", "v.bias") in sd for k in msa)
    path = tmp_path / "ft.pth"
    torch.save({"model": sd}, path)
    x = images()
    with torch.no_grad():
        ref = original_forward(sd, x)
    for base in (tiny_swin(qkv_bias=False), tiny_swin()):
        with pytest.warns(UserWarning, match="Q4"):
            got = spvit.load_official(str(path), base).eval()
        assert got.architecture.attn_choices == CHOICES
        with torch.no_grad():
            torch.testing.assert_close(got(x), ref, atol=2e-5, rtol=1e-5)


def test_search_checkpoint(tmp_path):
    sn = spvit.supernet(tiny_swin())
    randomise(sn)
    with torch.no_grad():
        for a in sn.attns:
            a.kernel_thresholds_full.uniform_(-1, 1)
        for m in sn.mlps:
            m.ffn_thresholds.uniform_(-1, 1)
    sn.eval()
    sd = original_layout(sn)
    for (s, j, *_), m in zip(stage_layout(), sn.mlps):  # the original also stores this buffer (quirk Q5)
        sd[f"layers.{s}.blocks.{j}.mlp.assigned_indicator_index"] = (m.ffn_thresholds.detach() > 0).float()
    assert "layers.0.blocks.0.attn.kernel_thresholds_full" in sd and "layers.0.blocks.0.attn.qk.weight" in sd
    path = tmp_path / "search.pth"
    torch.save({"model": sd}, path)
    got = spvit.load_official(str(path), "swin_tiny_patch4_window7_224", **{k: v for k, v in CFG.items()}).eval()
    assert isinstance(got, spvit.SwinSupernet) and got.alpha == ALPHA
    assert got.architecture().blocks == sn.architecture().blocks  # (model names differ: a name vs an instance)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(got(x), sn(x))


def test_param_optimised_checkpoint_and_quirk_q9(tmp_path):
    ours = swin_pruned(choices=["msa", "3x3", "1x1", "msa", "1x1", "msa"])
    x = images()
    with torch.no_grad():
        ref = ours(x)
    # what the Swin post-training script should write: alpha 100, the 1x1 from column 0, the Swin tap order
    good = tmp_path / "ft_optimized.pth"
    torch.save({"model": bconv_layout(ours, ALPHA, 0, "swin")}, good)
    with pytest.warns(UserWarning, match="Q9"):
        got = spvit.load_official(str(good), tiny_swin()).eval()
    assert got.architecture.attn_choices == ["msa", "3x3", "1x1", "msa", "1x1", "msa"]
    with torch.no_grad():
        torch.testing.assert_close(got(x), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(original_forward(bconv_layout(ours, ALPHA, 0, "swin"), x), ref, atol=2e-5,
                                   rtol=1e-5)
        # what the shipped script writes (the DeiT script: alpha 0.01, column 4, DeiT tap order) loads, but is
        # another function (quirk Q9)
        bad = tmp_path / "ft_q9.pth"
        torch.save({"model": bconv_layout(ours, 0.01, 4, "deit")}, bad)
        with pytest.warns(UserWarning, match="Q9"):
            wrong = spvit.load_official(str(bad), tiny_swin()).eval()
        assert (wrong(x) - ref).abs().max() > 1e-2


def test_shipped_ffn_indicator_file():
    """The original Swin-T indicator file (SPViT_Swin/ffn_indicators, 12 blocks): kept units per block."""
    path = os.path.join(DATA, "spvit_swin_t_l28_t32_search_12epoch.pth")
    kept = read_ffn_indicators(path, "swin_tiny_patch4_window7_224")
    assert [len(k) for k in kept] == [186, 152, 646, 504, 1350, 1319, 1289, 1249, 1234, 1082, 3041, 2994]
    hidden = [384] * 2 + [768] * 2 + [1536] * 6 + [3072] * 2
    assert all(list(k) == sorted(set(k)) and k[-1] < h for k, h in zip(kept, hidden))
    with pytest.raises(ValueError, match="stage depths"):
        read_ffn_indicators(path, "swin_small_patch4_window7_224")


def test_checkpoints_of_another_model(tmp_path):
    ours = swin_pruned(official_skip=True)
    p = tmp_path / "ft.pth"
    torch.save({"model": original_layout(ours)}, p)
    with pytest.raises(ValueError, match=r"stage depths \(2, 2, 2\) but .* has \(2, 4, 2\)"):
        spvit.load_official(str(p), tiny_swin(depths=(2, 4, 2)))
    with pytest.raises(ValueError, match="shape mismatches"):
        spvit.load_official(str(p), tiny_swin(embed_dim=64))
    with pytest.raises(ValueError, match="is an SPViT Swin checkpoint"):
        from tests.helpers import tiny_vit

        spvit.load_official(str(p), tiny_vit(depth=6))
    # a DeiT checkpoint for a Swin
    deit = spvit.supernet(__import__("tests.helpers", fromlist=["tiny_vit"]).tiny_vit(depth=2))
    q = tmp_path / "deit.pth"
    torch.save({k[4:]: v for k, v in deit.state_dict().items()}, q)
    with pytest.raises(ValueError, match="DeiT/ViT checkpoint"):
        spvit.load_official(str(q), tiny_swin())
    # another window size: the stored relative position index / shift mask differ from the model's
    sd = original_layout(ours)
    sd["layers.0.blocks.1.attn_mask"] = shift_mask(16, 4, 1)
    r = tmp_path / "shift.pth"
    torch.save(sd, r)
    with pytest.raises(ValueError, match="attn_mask differs"):
        spvit.load_official(str(r), tiny_swin())


@pytest.mark.slow
def test_released_swin_t_layout_through_timm(tmp_path):
    """A checkpoint of the published SPViT-Swin-T architecture in the original layout (random weights, real size)
    loads through timm's registration and computes the original's function."""
    import timm

    from spvit.models.registry import shipped_architecture

    name = "spvit_swin_tiny_patch4_window7_224"
    base = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = randomise(spvit.prune(base, shipped_architecture(name, base), official_skip=True)).eval()
    sd = original_layout(ours)
    path = tmp_path / "spvit_swin_t_l28_t32.pth"
    torch.save({"model": sd}, path)
    del base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert got.architecture.attn_choices == ["1x1", "skip", "1x1", "skip"] + ["msa"] * 8
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = original_forward(sd, x, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), patch=4, window=7)
        torch.testing.assert_close(got(x), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got(x), ours(x), atol=1e-5, rtol=1e-5)
