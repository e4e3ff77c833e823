"""Supernet: weight sharing with timm, gate sampling, read-out, error messages."""
import math

import pytest
import torch

import spvit
from spvit import gates as G
from spvit.arch import Architecture
from tests.helpers import randomise_head_probs, tiny_vit


def test_weights_are_split_from_qkv():
    """(The all-MSA supernet equals the timm model: tests/test_families.py.)"""
    m = tiny_vit()
    sn = spvit.supernet(m)
    a, t = sn.attns[1], m.blocks[1].attn
    c = m.embed_dim
    torch.testing.assert_close(a.qk.weight, t.qkv.weight[:2 * c])
    torch.testing.assert_close(a.v.bias, t.qkv.bias[2 * c:])
    assert torch.all(a.head_probs == 1) and torch.all(a.kernel_thresholds == 1.5)
    assert sn.mlps[0].ffn_thresholds.shape == (m.blocks[0].mlp.fc1.out_features,)


def test_sample_gate_probability_and_straight_through():
    torch.manual_seed(0)
    theta = torch.full((20000,), 1.5, requires_grad=True)
    s = G.sample_gate(theta)
    assert set(s.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(s.mean().item() - 1 / (1 + math.exp(-1.5))) < 0.01  # P(1) = sigmoid(theta)
    s.sum().backward()
    assert torch.all(theta.grad > 0) and torch.all(theta.grad <= 0.25)


def test_sample_gate_gradient_is_sigmoid_derivative_of_logit():
    torch.manual_seed(1)
    theta = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    torch.manual_seed(5)
    s = G.sample_gate(theta)
    s.sum().backward()
    torch.manual_seed(5)
    u = torch.rand(3).clamp(G.EPS, 1 - G.EPS)
    ell = torch.log(u) - torch.log1p(-u) + theta.detach()
    torch.testing.assert_close(theta.grad, torch.sigmoid(ell) * (1 - torch.sigmoid(ell)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s.detach(), (ell > 0).float())


def test_initial_choice_probabilities():
    # §2.6: P(MSA) = 0.547, P(3x3) = 0.122, P(1x1) = 0.149, P(skip) = 0.182
    sn = spvit.supernet(tiny_vit(depth=1))
    p = sn.gate_summary()[0]["p_choice"]
    assert p["msa"] == pytest.approx(0.547, abs=1e-3) and p["3x3"] == pytest.approx(0.122, abs=1e-3)
    assert p["1x1"] == pytest.approx(0.149, abs=1e-3) and p["skip"] == pytest.approx(0.182, abs=1e-3)


def test_train_forward_samples_and_backprops_to_gates():
    torch.manual_seed(2)
    sn = spvit.supernet(tiny_vit(depth=2)).train()
    x = torch.randn(4, 3, 32, 32)
    sn(x).square().mean().backward()
    for a in sn.attns:
        assert a.kernel_thresholds.grad is not None and torch.isfinite(a.kernel_thresholds.grad).all()
        assert a.last_gates is not None
    for mm in sn.mlps:
        assert mm.ffn_thresholds.grad is not None and mm.ffn_thresholds.grad.abs().sum() > 0
    # both conv BNs track statistics every training step (§4.6)
    assert int(sn.attns[0].bn_3x3.num_batches_tracked) == 1 and int(sn.attns[0].bn_1x1.num_batches_tracked) == 1


def test_skip_gate_makes_block_identity_in_attention():
    sn = spvit.supernet(tiny_vit(depth=1)).eval()
    arch = sn.architecture()
    arch.blocks[0] = spvit.BlockArch("skip", arch.blocks[0].ffn_keep)
    sn.fix_architecture(arch)
    blk = sn.vit.blocks[0]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        assert torch.count_nonzero(blk.attn(blk.norm1(x))) == 0


def test_architecture_readout_and_roundtrip(tmp_path):
    sn = spvit.supernet(tiny_vit(depth=4))
    with torch.no_grad():
        sn.attns[0].kernel_thresholds.copy_(torch.tensor([1.0, 1.0, -1.0]))
        sn.attns[1].kernel_thresholds.copy_(torch.tensor([1.0, -1.0, 1.0]))  # msa gate without 3x3 -> 1x1
        sn.attns[2].kernel_thresholds.copy_(torch.tensor([-1.0, 1.0, 1.0]))
        sn.mlps[3].ffn_thresholds[::3] = -0.5
    arch = sn.architecture()
    assert arch.attn_choices == ["3x3", "1x1", "skip", "msa"]
    hidden = sn.signature.mlp_hidden
    assert arch.blocks[3].ffn_keep == tuple(i for i in range(hidden) if i % 3)
    p = tmp_path / "arch.json"
    arch.save(str(p))
    again = Architecture.load(str(p))
    assert again == arch and again.model_name == arch.model_name
    assert spvit.gflops(again) == pytest.approx(sn.gflops())


def test_fix_architecture_reads_back():
    sn = spvit.supernet(tiny_vit(depth=4))
    arch = sn.architecture()
    blocks = [spvit.BlockArch(c, tuple(range(0, 64, k))) for c, k in zip(["msa", "3x3", "1x1", "skip"], [1, 2, 5, 7])]
    target = Architecture(arch.model_name, arch.signature, blocks)
    sn.fix_architecture(target)
    assert sn.architecture() == target


def test_bad_inputs():
    sn = spvit.supernet(tiny_vit())
    with pytest.raises(ValueError, match="expected images of shape"):
        sn(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expected images"):
        sn(torch.randn(3, 32, 32))
    from timm.models.vision_transformer import VisionTransformer
    with pytest.raises(spvit.UnsupportedModelError, match="class token"):
        spvit.supernet(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                         class_token=False, global_pool="avg"))
    with pytest.raises(spvit.UnsupportedModelError, match="prefix tokens"):
        spvit.supernet(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=2))
    with pytest.raises(spvit.UnsupportedModelError, match="VisionTransformer"):
        spvit.supernet(torch.nn.Linear(3, 3))
    import timm
    with pytest.raises(spvit.UnsupportedModelError, match="distill"):
        spvit.supernet(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32))


@pytest.mark.parametrize("kw", [dict(img=48, patch=8), dict(img=40, patch=8, heads=4), dict(img=32, patch=4, dim=48, heads=3)])
def test_other_grids_and_heads_train_and_eval(kw):
    torch.manual_seed(3)
    m = tiny_vit(depth=2, **kw)
    sn = spvit.supernet(m)
    randomise_head_probs(sn)
    x = torch.randn(2, 3, kw["img"], kw["img"])
    sn.train()
    sn(x).sum().backward()
    sn.eval()
    with torch.no_grad():
        torch.testing.assert_close(sn(x), m(x), rtol=1e-5, atol=1e-5)


def test_deit3_layerscale_model_converts():
    import timm
    m = timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=64, num_classes=5).eval()
    sn = spvit.supernet(m).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(sn(x), m(x), rtol=1e-4, atol=1e-4)
