"""Loading state dicts in the layouts of the original SPViT code (search, fine-tune, parameter-optimised)."""
import pytest
import torch

import spvit
from spvit.arch import Architecture, BlockArch
from tests.helpers import randomise_bn, randomise_head_probs, tiny_vit

ALPHA = 0.01


def _model():
    return tiny_vit(depth=4)


def _trained_supernet(m):
    sn = spvit.supernet(m, alpha=ALPHA)
    randomise_head_probs(sn, seed=1)
    randomise_bn(sn, seed=2)
    with torch.no_grad():
        for a in sn.attns:
            a.kernel_thresholds.uniform_(-1, 1)
        for mm in sn.mlps:
            mm.ffn_thresholds.uniform_(-1, 1)
    return sn


def test_search_checkpoint(tmp_path):
    m = _model()
    sn = _trained_supernet(m).eval()
    sd = {k[len("vit."):]: v for k, v in sn.state_dict().items()}
    for i, mm in enumerate(sn.mlps):  # the original also stores this (detached) buffer
        sd[f"blocks.{i}.mlp.assigned_indicator_index"] = (mm.ffn_thresholds.detach() > 0).float()
    path = tmp_path / "search.pth"
    torch.save({"model": sd}, path)
    got = spvit.load_official(str(path), tiny_vit(depth=4)).eval()
    assert isinstance(got, spvit.Supernet)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), sn(x))
    assert got.architecture() == sn.architecture()


def _finetune_sd(pruned):
    """Our pruned model -> the original's fine-tune key layout (qkv split into qk / v for MSA layers)."""
    sd = {}
    c = pruned.signature.embed_dim
    for k, v in pruned.state_dict().items():
        k = k[len("vit."):]
        if ".attn.qkv." in k:
            sd[k.replace("qkv", "qk")] = v[: 2 * c]
            sd[k.replace("qkv", "v")] = v[2 * c:]
        else:
            sd[k] = v
    return sd


def _arch(sig, name):
    widths = [50, 3, 64, 0]
    return Architecture(name, sig, [BlockArch(a, tuple(range(w))) for a, w in zip(["msa", "3x3", "1x1", "skip"], widths)])


def test_finetune_checkpoint_with_skip(tmp_path):
    m = _model()
    sn = _trained_supernet(m)
    arch = _arch(sn.signature, sn.model_name)
    with pytest.warns(UserWarning):
        ours = spvit.prune(sn, arch, official_skip=True).eval()
    path = tmp_path / "ft.pth"
    torch.save(_finetune_sd(ours), path)
    with pytest.warns(UserWarning, match="Q4"):
        got = spvit.load_official(str(path), tiny_vit(depth=4)).eval()
    assert isinstance(got, spvit.PrunedModel)
    assert got.architecture.attn_choices == ["msa", "3x3", "1x1", "skip"]
    assert got.architecture.ffn_widths == [50, 3, 64, 0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), ours(x))


def _param_opt_sd(pruned):
    """Apply the original post-training optimisation (docs/method.md §6) to conv layers, computed per the formula of docs/method.md §6."""
    sd = _finetune_sd(pruned)
    sig = pruned.signature
    h, d = sig.num_heads, sig.head_dim
    for i, b in enumerate(pruned.architecture.blocks):
        if b.attn not in ("3x3", "1x1"):
            continue
        p = f"blocks.{i}.attn."
        mix = torch.softmax(sd[p + "head_probs"] / ALPHA, dim=0)
        wv, bv, wo = sd[p + "v.weight"], sd[p + "v.bias"], sd[p + "proj.weight"]
        K = [sum(mix[g, k] * wv[g * d:(g + 1) * d] for g in range(h)) for k in range(9)]
        cb = [sum(mix[g, k] * bv[g * d:(g + 1) * d] for g in range(h)) for k in range(9)]
        Rk = [sum(mix[g, k] * wo[:, g * d:(g + 1) * d] for g in range(h)) for k in range(9)]
        if b.attn == "3x3":
            w0 = torch.zeros(d, sig.embed_dim, 3, 3)
            for kh in range(3):
                for kw in range(3):
                    w0[:, :, kh, kw] = K[kh + 3 * kw]
            b0, w3 = sum(cb), sum(Rk)
        else:
            w0, b0, w3 = K[4][:, :, None, None], cb[4], Rk[4]
        bn = "bn_3x3" if b.attn == "3x3" else "bn_1x1"
        sd[p + "bconv.0.weight"], sd[p + "bconv.0.bias"] = w0, b0
        sd[p + "bconv.3.weight"], sd[p + "bconv.3.bias"] = w3[:, :, None, None], sd[p + "proj.bias"]
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            sd[p + f"bconv.1.{t}"] = sd.pop(p + f"{bn}.{t}")
        for k in ("v.weight", "v.bias", "proj.weight", "proj.bias", "head_probs"):
            del sd[p + k]
    return sd


def test_param_optimised_checkpoint(tmp_path):
    m = _model()
    sn = _trained_supernet(m)
    arch = _arch(sn.signature, sn.model_name)
    arch.blocks[3] = BlockArch("1x1", arch.blocks[3].ffn_keep)  # no skip here
    ours = spvit.prune(sn, arch).eval()
    path = tmp_path / "ft_optimized.pth"
    torch.save({"model": _param_opt_sd(ours)}, path)
    got = spvit.load_official(str(path), tiny_vit(depth=4)).eval()
    assert type(got.vit.blocks[1].attn).__name__ == "ExplicitConvAttention"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), ours(x), rtol=1e-5, atol=1e-5)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        spvit.load_official(str(tmp_path / "nope.pth"), tiny_vit())
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        spvit.load_official(str(bad), tiny_vit())
    notsd = tmp_path / "list.pth"
    torch.save([1, 2, 3], notsd)
    with pytest.raises(ValueError, match="state dict"):
        spvit.load_official(str(notsd), tiny_vit())
    # a search checkpoint of a 4-block model loaded as a 3-block model
    sn = spvit.supernet(tiny_vit(depth=4))
    p = tmp_path / "s.pth"
    torch.save({k[4:]: v for k, v in sn.state_dict().items()}, p)
    with pytest.raises(ValueError, match="another model"):
        spvit.load_official(str(p), tiny_vit(depth=3))
    # ... or as a model of another width
    with pytest.raises(ValueError, match="shape mismatches"):
        spvit.load_official(str(p), tiny_vit(depth=4, dim=48, heads=3))
