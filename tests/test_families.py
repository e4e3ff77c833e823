"""What every model family does the same way: the family lookup, search -> prune -> deploy, files.

Parametrised over the ``family`` fixture (tests/conftest.py): a tiny ViT and a tiny Swin (tests/helpers.py).
Family-specific behaviour stays in the family's own test files (test_deploy.py, test_swin.py, ...).
"""
import pytest
import torch

import spvit
from spvit.arch import Architecture
from spvit.deploy import FORMAT_VERSION, deploy, load_deployed, save_deployed
from spvit.families import families, family_named, family_of
from spvit.models.convert import model_name_of, signature_of

from .helpers import randomise_conv_state


def test_lookup_follows_the_model_through_every_phase(family):
    m = family.model()
    fam = family_of(m)
    assert fam.name == family.name and fam is family_named(family.name)
    sn = spvit.supernet(m)
    assert type(sn) is fam.supernet_class and family_of(sn) is fam
    assert sn.alpha == fam.default_alpha
    pruned = spvit.prune(sn, family.architecture(m))
    assert type(pruned) is fam.pruned_class and family_of(pruned) is fam
    deployed = deploy(pruned)
    assert type(deployed) is fam.deployed_class and family_of(deployed) is fam
    # the records it leaves: signature, architecture, deployed config
    assert isinstance(pruned.signature, fam.signature_type)
    assert family_of(pruned.signature) is fam and family_of(pruned.architecture) is fam
    assert family_of(deployed.config) is fam
    # the wrapped timm model sits under the family's attribute (state-dict prefix)
    assert all(k.startswith(fam.timm_attr + ".") for k in pruned.state_dict())


def test_lookup_by_name_and_unknowns():
    assert family_of("deit_small_patch16_224").name == "vit"
    assert family_of("swin_tiny_patch4_window7_224").name == "swin"
    assert family_of("spvit_swin_tiny_patch4_window7_224").name == "swin"
    assert family_of("swin").name == "swin" and family_of({}).name == "vit"  # a ViT deployed config has no key
    assert families()[-1].name == "vit"  # the default: its checks name what is unsupported
    assert family_of(torch.nn.Linear(2, 2)).name == "vit"
    with pytest.raises(spvit.UnsupportedModelError, match="VisionTransformer"):
        spvit.supernet(torch.nn.Linear(2, 2))
    with pytest.raises(KeyError, match="unknown model family 'cnn'"):
        family_named("cnn")


def test_macs_of_the_family_match_the_supernet_readout(family):
    """gflops of the architecture (family.macs on fixed gates) = the supernet's differentiable count at the same
    decisions."""
    m = family.model()
    sn = spvit.supernet(m)
    arch = family.architecture(m)
    sn.fix_architecture(arch)
    assert sn.architecture().attn_choices == arch.attn_choices
    assert sn.gflops() == pytest.approx(spvit.gflops(arch), rel=1e-6)
    assert spvit.gflops(m) == pytest.approx(sn.dense_gflops(), rel=1e-9)


def test_flops_loss_gradient_matches_closed_form(family):
    """dL/dtheta of an FFN unit and of a block's MSA gate, for the first and the last block, from the family's block
    costs: L = lambda (T - F/1e9)^2, indicator'(t) = sigmoid'(sigmoid(t) - 1/2) sigmoid'(t) (§2.4, §3.2)."""
    sn = spvit.supernet(family.model(), theta=0.7)
    fam = family_of(sn)
    with torch.no_grad():
        for a in sn.attns:
            a.kernel_thresholds.uniform_(-2, 2)
        for m in sn.mlps:
            m.ffn_thresholds.uniform_(-2, 2)
    target, lam = sn.min_gflops() + 0.3 * (sn.dense_gflops() - sn.min_gflops()), 5.0
    loss = sn.flops_loss(target, lam)
    loss.backward()
    f = sn.macs_tensor().detach() / 1e9
    assert loss.item() == pytest.approx(lam * (target - f.item()) ** 2, rel=1e-5)
    dldf = -2 * lam * (target - f) / 1e9

    def dind(t):
        s = torch.sigmoid(t)
        return torch.sigmoid(s - 0.5) * (1 - torch.sigmoid(s - 0.5)) * s * (1 - s)

    for i in (0, len(sn.attns) - 1):
        c1, c3, cm, per_unit, _ = fam.block_costs(sn.signature, i)
        t_ffn = sn.mlps[i].ffn_thresholds
        torch.testing.assert_close(t_ffn.grad, dldf * per_unit * dind(t_ffn.detach()), rtol=1e-4, atol=1e-12)
        t = sn.attns[i].kernel_thresholds.detach()
        g = (t > 0).float()
        # F = g1*c1 + g1*g3*(c3 - c1) + g1*g3*gm*(cm - c3) + ...: dF/dg_m = g1*g3*(cm - c3)
        torch.testing.assert_close(sn.attns[i].kernel_thresholds.grad[2], dldf * g[0] * g[1] * (cm - c3) * dind(t[2]),
                                   rtol=1e-4, atol=1e-12)


def test_deploy_does_not_touch_the_model(family):
    pruned = family.pruned().train()
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    deployed = deploy(pruned)
    assert pruned.training and not deployed.training
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in deployed.parameters())
    with pytest.raises(RuntimeError, match="inference-only"):
        deployed.train()
    x = family.images()
    with torch.no_grad():  # a model in training mode is deployed as its eval-mode self
        torch.testing.assert_close(deployed(x), pruned.eval()(x), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(family, tmp_path):
    deployed = deploy(family.pruned(official_skip=True, **family.richest))
    path = str(tmp_path / "m.pt")
    save_deployed(deployed, path)  # = deployed.save(path)
    obj = torch.load(path, weights_only=True)  # plain data only
    assert obj["format"] == "spvit-deployed" and obj["format_version"] == FORMAT_VERSION
    assert obj["spvit_version"] == spvit.__version__
    assert family_of(obj["config"]).name == family.name
    loaded = load_deployed(path)
    assert type(loaded) is type(deployed) and not loaded.training
    assert loaded.architecture == deployed.architecture
    x = family.images()
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))
    assert load_deployed(path, dtype=torch.bfloat16).dtype == torch.bfloat16
    sd = dict(obj["state_dict"])
    gone = sorted(sd)[-1]
    del sd[gone]
    torch.save({**obj, "state_dict": sd}, path)
    with pytest.raises(ValueError, match="missing keys .*" + gone.split(".")[-1]):
        load_deployed(path)
    torch.save({**obj, "config": {**obj["config"], "family": "cnn"}}, path)
    with pytest.raises(ValueError, match="malformed model description.*unknown model family 'cnn'"):
        load_deployed(path)


def test_all_msa_supernet_equals_timm(family):
    """Every gate open (the supernet as built): the timm model's output; the timm model is not modified."""
    m = family.model()
    attn_types = {type(mod) for n, mod in m.named_modules() if n.endswith(".attn")}
    sn = spvit.supernet(m).eval()
    x = family.images(3)
    with torch.no_grad():
        torch.testing.assert_close(sn(x), m(x), rtol=1e-5, atol=1e-5)
    assert {type(mod) for n, mod in m.named_modules() if n.endswith(".attn")} == attn_types and len(attn_types) == 1


# The attention choices a family's search and fine-tune models compute alike. A Swin 3x3 layer is window-local in
# search and runs on the full map in fine-tuning, as in the original code (docs/method.md, "Swin search and fine-tune
# 3x3 keep their own semantics").
SEARCH_EQUALS_FINETUNE = {"vit": ("msa", "3x3", "1x1", "skip"), "swin": ("msa", "1x1", "skip")}


def test_pruned_from_supernet_equals_supernet_fixed_choices(family):
    """An architecture with every attention choice and uneven FFN widths: the pruned model equals the supernet with
    those choices fixed (shared weights, BatchNorm state and head mixing carried over), at the same FLOPs and with
    fewer parameters; where a family's 3x3 differs between search and fine-tuning, it does differ."""
    same = SEARCH_EQUALS_FINETUNE[family.name]
    x = family.images(3)
    alike = [c if c in same else "msa" for c in family.choices]
    for choices in [alike] + ([family.choices] if alike != family.choices else []):
        m = family.model()
        sn = randomise_conv_state(spvit.supernet(m), family.head_probs_std)
        arch = Architecture.from_choices(model_name_of(m), signature_of(m), choices, family.keep)
        sn.fix_architecture(arch)
        sn.eval()
        pruned = spvit.prune(sn, arch).eval()
        assert pruned.architecture == arch
        with torch.no_grad():
            got, ref = pruned(x), sn(x)
        if set(choices) <= set(same):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        else:
            assert (got - ref).abs().max() > 1e-3, choices
        assert spvit.gflops(pruned) == pytest.approx(sn.gflops())
        assert spvit.count_params(pruned) < spvit.count_params(sn)
