"""Pruned (fine-tune) ViT models: dense initialisation, training, errors (equality with the supernet's fixed choices:
tests/test_families.py)."""
import pytest
import torch

import spvit
from spvit.arch import Architecture, BlockArch
from tests.helpers import tiny_vit

MIXED = ["msa", "3x3", "1x1", "skip"]


def _mixed_arch(sn, widths=(64, 37, 1, 0)):
    sig = sn.signature
    g = torch.Generator().manual_seed(7)
    blocks = [BlockArch(a, tuple(sorted(torch.randperm(sig.mlp_hidden, generator=g)[:w].tolist())))
              for a, w in zip(MIXED, widths)]
    return Architecture(sn.model_name, sig, blocks)


def test_pruned_from_dense_uses_uniform_mixing_and_fresh_bn():
    m = tiny_vit(depth=4)
    sn = spvit.supernet(m)
    arch = _mixed_arch(sn)
    pruned = spvit.prune(m, arch)
    conv = pruned.vit.blocks[1].attn
    assert torch.all(conv.head_probs == 1) and torch.all(conv.bn.running_var == 1)
    torch.testing.assert_close(conv.v.weight, m.blocks[1].attn.qkv.weight[64:])
    # equals the supernet built from the same dense model with the same choices (fresh BN, uniform mixing)
    sn.fix_architecture(arch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), sn.eval()(x), rtol=1e-5, atol=1e-5)
    # FFN rows are the kept units of the dense FFN
    keep = list(arch.blocks[0].ffn_keep)
    torch.testing.assert_close(pruned.vit.blocks[0].mlp.fc1.weight, m.blocks[0].mlp.fc1.weight[keep])


def test_pruned_trains_in_train_mode():
    sn = spvit.supernet(tiny_vit(depth=4))
    pruned = spvit.prune(sn, _mixed_arch(sn)).train()
    # patch tokens reach the logits only through attention, which blocks 2 (1x1) and 3 (skip) lack: use all tokens
    pruned.vit.forward_features(torch.randn(2, 3, 32, 32)).sum().backward()
    assert pruned.vit.blocks[1].attn.head_probs.grad is not None
    assert pruned.vit.blocks[1].attn.v.weight.grad.abs().sum() > 0


def test_official_skip_semantics_adds_ln1():
    sn = spvit.supernet(tiny_vit(depth=4))
    arch = _mixed_arch(sn)
    with pytest.warns(UserWarning, match="Q4"):
        p = spvit.prune(sn, arch, official_skip=True).eval()
    blk = p.vit.blocks[3]
    x = torch.randn(1, 17, 32)
    torch.testing.assert_close(blk.attn(blk.norm1(x)), blk.norm1(x))


def test_arch_for_another_model_is_rejected():
    sn = spvit.supernet(tiny_vit(depth=4))
    arch = _mixed_arch(sn)
    with pytest.raises(ValueError, match="depth"):
        spvit.prune(tiny_vit(depth=3), Architecture.from_dict({**arch.to_dict(), "blocks": arch.to_dict()["blocks"][:3],
                                                              "signature": {**arch.to_dict()["signature"], "depth": 3,
                                                                            "embed_dim": 48}}))
    with pytest.raises(ValueError, match="num_classes"):
        spvit.prune(tiny_vit(depth=4, classes=7), arch)
    with pytest.raises(ValueError, match="expected images"):
        spvit.prune(sn, arch)(torch.randn(1, 3, 16, 16))


def test_architecture_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Architecture.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Architecture.load(str(bad))
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not an spvit architecture"):
        Architecture.load(str(bad))
