"""timm's model API on the pruned models of every family (the ``family`` fixture) and on the spvit_* registrations:
features / head / intermediates against the modules run by hand, reset_classifier keeps the pruned trunk,
TorchScript / fx, features_only, optimizer-factory groups, pretrained cfgs, errors."""
import copy

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2

import spvit
from spvit.data import DataConfig
from spvit.deploy import deploy
from spvit.models.registry import RELEASE_FILES, SHIPPED

from spvit.models.pruned import ExplicitConvAttention
from spvit.models.timm_api import WrappedVitApi, features_only_model

from .helpers import FAMILIES
from .test_deploy import CHOICES, images, mixed_pruned, randomise, tiny_vit

REGISTERED = sorted(SHIPPED)
REGISTERED_BASE = {"spvit_deit_tiny_patch16_224": "deit_tiny_patch16_224",
                   "spvit_swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224"}


def by_hand(pruned, x):
    """Token features after each block and after the final norm, computed from the modules directly."""
    vit = pruned.vit
    t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    outs = []
    for blk in vit.blocks:
        t = blk(t)
        outs.append(t)
    return outs, vit.norm(t)


class FamilyApi:
    """What the generic timm-API tests check of a family's tiny pruned model (tests/helpers.py FAMILIES)."""

    def __init__(self, by_hand, pool, to_nchw, width, taps, head):
        self.by_hand = by_hand  # (outputs of every feature tap, normalised final features), from the modules
        self.pool, self.to_nchw = pool, to_nchw  # the head's pooling; a tap's output as forward_intermediates gives it
        self.width, self.taps, self.head = width, taps, head  # num_features; feature_info (module, chs, reduction)


def _swin_by_hand(m, x):
    """Stage outputs (B, H, W, C) and the normalised final map, from the modules directly."""
    t = m.swin.patch_embed(x)
    stages = []
    for stage in m.swin.layers:
        t = stage.downsample(t)
        for blk in stage.blocks:
            t = blk(t)
        stages.append(t)
    return stages, m.swin.norm(t)


API = {
    # 4 blocks on a 4x4 grid (patch 8), a class token; token pooling
    "vit": FamilyApi(by_hand, lambda f: f[:, 0], lambda t: t[:, 1:].reshape(t.shape[0], 4, 4, -1).permute(0, 3, 1, 2),
                     32, [(f"vit.blocks.{i}", 32, 8) for i in range(4)], lambda m: m.vit.head),
    # 3 stages on 16x16, 8x8, 4x4 maps (NHWC); average pooling
    "swin": FamilyApi(_swin_by_hand, lambda f: f.mean(dim=(1, 2)), lambda t: t.permute(0, 3, 1, 2), 128,
                      [(f"swin.layers.{i}", 32 * 2 ** i, 2 ** (i + 1)) for i in range(3)], lambda m: m.swin.head.fc),
}


def test_features_head_and_intermediates_match_the_modules(family):
    api = API[family.name]
    m = family.pruned(**family.richest)
    x = family.images(2)
    with torch.no_grad():
        taps, feats = api.by_hand(m, x)
        torch.testing.assert_close(m.forward_features(x), feats)
        torch.testing.assert_close(m.forward_head(feats, pre_logits=True), api.pool(feats))  # no fc_norm
        torch.testing.assert_close(m.forward_head(m.forward_features(x)), m(x))
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert len(inter) == len(taps) == len(api.taps)
        for got, ref in zip(inter, taps):  # NCHW (ViT: class token split off)
            torch.testing.assert_close(got, api.to_nchw(ref))
        last = m.forward_intermediates(x, indices=[1], intermediates_only=True)
        assert len(last) == 1
        torch.testing.assert_close(last[0], api.to_nchw(taps[1]))
    with pytest.raises(ValueError, match="expected images"):
        m.forward_features(torch.randn(2, 3, 48, 48))
    assert m.num_features == m.head_hidden_size == api.width and m.num_classes == 10 and m.in_chans == 3
    assert [(f["module"], f["num_chs"], f["reduction"]) for f in m.feature_info] == api.taps


def test_vit_intermediates_as_tokens():
    """ViT only: the NLC output format of forward_intermediates, several indices."""
    m = FAMILIES["vit"].pruned(layer_scale=True)
    x = images(2)
    with torch.no_grad():
        blocks, _ = by_hand(m, x)
        last = m.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(last[0], blocks[1][:, 1:])
    torch.testing.assert_close(last[1], blocks[3][:, 1:])


def test_reset_classifier_keeps_the_pruned_trunk(family):
    api = API[family.name]
    m = family.pruned()
    x = family.images(2)
    head = next(name + "." for name, mod in m.named_modules() if mod is api.head(m))  # "vit.head.", "swin.head.fc."
    trunk = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith(head)}
    assert len(trunk) == len(m.state_dict()) - 2
    arch = m.architecture
    m.reset_classifier(5)
    assert m.get_classifier() is api.head(m) and api.head(m).out_features == 5
    assert m.num_classes == 5 and m.architecture.signature.num_classes == 5 and m.pretrained_cfg["num_classes"] == 5
    assert m.architecture.attn_choices == arch.attn_choices and m.architecture.ffn_widths == arch.ffn_widths
    for k, v in m.state_dict().items():
        if k in trunk:
            assert torch.equal(v, trunk[k]), k
    with torch.no_grad():
        out = m.eval()(x)
        assert out.shape == (2, 5)
        torch.testing.assert_close(deploy(m)(x), out, atol=1e-5, rtol=1e-5)  # still deploys
        _, feats = api.by_hand(m, x)
        m.reset_classifier(0)
        torch.testing.assert_close(m(x), api.pool(feats))  # no head: pooled features
        m.reset_classifier(0, "")
        torch.testing.assert_close(m(x), feats)  # no pooling either: every token / the NHWC map
    with pytest.raises(ValueError, match="num_classes"):
        m.reset_classifier(-1)


def test_grad_checkpointing_same_outputs_and_grads():
    m = mixed_pruned().train()
    x = images(2)

    def step():
        m.zero_grad()
        torch.manual_seed(3)
        out = m(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    bn_state = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    ref_out, ref_grads = step()
    m.load_state_dict({**m.state_dict(), **bn_state})
    m.set_grad_checkpointing(True)
    assert m.vit.grad_checkpointing
    out, grads = step()
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["spvit_deit_tiny_patch16_224", "spvit_swin_tiny_patch4_window7_224"])
def test_optimizer_factory_groups_follow_the_dense_model(name):
    """timm's optimizer factory with layer decay gives every kept timm parameter of a registered spvit model the
    learning-rate scale and weight decay it gives the dense model (the same group matcher, prefixed); no_weight_decay
    is the dense model's, prefixed, less the parameters pruning removed."""
    m = timm.create_model(name)
    dense = timm.create_model(REGISTERED_BASE[name])
    prefix = spvit.family_of(m).timm_attr + "."
    names = dict(m.named_parameters())
    nwd, dense_nwd, dense_names = m.no_weight_decay(), dense.no_weight_decay(), dict(dense.named_parameters())
    assert nwd <= {prefix + n for n in dense_nwd} and {prefix + n for n in dense_nwd} & set(names) <= nwd
    assert all(n in names or n[len(prefix):] not in dense_names for n in nwd)  # or a name timm lists for any ViT
    kw = dict(lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    ours = create_optimizer_v2(m, "adamw", **kw)
    ref = create_optimizer_v2(dense, "adamw", **kw)
    group_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in ours.param_groups for p in g["params"]}
    dense_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in ref.param_groups for p in g["params"]}
    compared = 0
    for n, p in dense.named_parameters():
        if prefix + n in names and names[prefix + n].shape == p.shape:
            assert group_of[id(names[prefix + n])] == dense_of[id(p)], n
            compared += 1
    assert compared > 100 and len(group_of) == len(names)


def test_vit_gate_weights_in_the_optimizer_groups():
    """The head-mixing weights of a conv layer are decayed (as in the original) and share their block's scale."""
    m = timm.create_model("spvit_deit_tiny_patch16_224")
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    group_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert group_of[id(m.vit.pos_embed)][1] == 0 and group_of[id(m.vit.cls_token)][1] == 0
    assert group_of[id(m.vit.blocks[0].norm1.weight)][1] == 0
    assert group_of[id(m.vit.blocks[0].attn.head_probs)] == group_of[id(m.vit.blocks[0].mlp.fc1.weight)]
    assert group_of[id(m.vit.blocks[0].attn.head_probs)][1] == 0.05
    assert len({scale for scale, _ in group_of.values()}) == 14  # stem, one group per block, norm, head


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_pretrained_cfg(name):
    cfg = get_pretrained_cfg(name)
    assert cfg is not None and cfg.input_size == (3, 224, 224) and cfg.fixed_input_size
    assert cfg.crop_pct == DataConfig().crop_pct  # the original evaluation transform, as spvit.data uses
    assert cfg.interpolation == "bicubic" and cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN
    if RELEASE_FILES[name]:
        assert RELEASE_FILES[name] in cfg.notes[0]
    assert not cfg.has_weights  # nothing timm would try to download
    m = timm.create_model(name, num_classes=3)
    data = resolve_data_config(model=m)
    assert data["crop_pct"] == cfg.crop_pct and data["input_size"] == cfg.input_size and data["std"] == cfg.std
    sd = m.state_dict()
    assert m.pretrained_cfg["first_conv"] + ".weight" in sd and m.pretrained_cfg["classifier"] + ".weight" in sd
    assert m.default_cfg is m.pretrained_cfg and m.num_classes == 3 and m.pretrained_cfg["num_classes"] == 3
    assert m.architecture.attn_choices == SHIPPED[name][1] and m.architecture.ffn_widths == SHIPPED[name][2]


def test_registration_errors():
    with pytest.raises(ValueError, match="spvit_deit_ti_l200_t10.pth.*pretrained_cfg_overlay"):
        timm.create_model("spvit_deit_tiny_patch16_224", pretrained=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        timm.create_model("spvit_deit_tiny_patch16_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file="/nonexistent/spvit.pth"))
    with pytest.raises(TypeError):
        timm.create_model("spvit_deit_tiny_patch16_224", not_a_model_arg=1)


def _original_layout(pruned):
    """A PrunedModel's weights in the original fine-tune checkpoint layout (qkv of MSA layers split into qk / v)."""
    sd, c = {}, pruned.signature.embed_dim
    for k, v in pruned.state_dict().items():
        k = k[len("vit."):]
        if ".attn.qkv." in k:
            sd[k.replace("qkv", "qk")], sd[k.replace("qkv", "v")] = v[:2 * c], v[2 * c:]
        else:
            sd[k] = v
    return {"model": sd}


def test_pretrained_from_a_release_file(tmp_path):
    src = timm.create_model("spvit_deit_tiny_patch16_224").eval()
    with torch.no_grad():
        for n, p in src.named_parameters():
            if n.endswith("bias") or "head_probs" in n:
                p.normal_(0, 0.1)
    path = tmp_path / "spvit_deit_ti_l200_t10.pth"
    torch.save(_original_layout(src), path)
    m = timm.create_model("spvit_deit_tiny_patch16_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert m.pretrained_cfg["file"] == str(path) and m.pretrained_cfg["crop_pct"] == DataConfig().crop_pct
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(m(x), src(x))
    m5 = timm.create_model("spvit_deit_tiny_patch16_224", pretrained=True, num_classes=5,
                           pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(m5.forward_features(x), src.forward_features(x))
    assert m5(x).shape == (2, 5)
    # a checkpoint of another architecture is refused
    with pytest.raises(ValueError, match="another architecture|different|blocks"):
        timm.create_model("spvit_deit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def _with_explicit_conv(m):
    """The mixed model with its 1x1 conv layer replaced by the explicit ``bconv`` form (random weights, BN stats)."""
    i = CHOICES.index("1x1")
    old = m.vit.blocks[i].attn
    new = ExplicitConvAttention("1x1", old.dim, old.head_dim, old.grid)
    with torch.no_grad():
        for p in new.parameters():
            p.normal_(0, 0.2)
    m.vit.blocks[i].attn = new
    return randomise(m)


def _bn_stats(m):
    return {k: v.clone() for k, v in m.state_dict().items() if "running" in k}


def _scripted_and_traced_equal_eager(m, x):
    """The scripted, the fx-traced and the fx-traced-then-scripted (timm's ``test_model_forward_fx_torchscript``)
    copies of ``m`` give ``m``'s eval output on ``x``; returns the scripted copy and m's BN statistics."""
    scripted = torch.jit.script(copy.deepcopy(m))
    traced = torch.fx.symbolic_trace(copy.deepcopy(m))
    traced_scripted = torch.jit.script(torch.fx.symbolic_trace(copy.deepcopy(m)))
    with torch.no_grad():
        ref = m(x)
        torch.testing.assert_close(scripted(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced_scripted(x), ref, atol=1e-5, rtol=1e-5)
    return scripted, _bn_stats(m)


@pytest.mark.parametrize("alt", [False, True], ids=["base", "alt-form"])
def test_torchscript_and_fx_match_eager(family, alt):
    """Scripted and fx-traced models (conv layers in their conv2d form; Swin: shifted-window MSA with sizes from the
    module) equal the eager reference path: outputs in eval and training mode, the BatchNorm running statistics a
    training step updates, gradients. ``alt``: the ViT's 1x1 layer in its explicit ``bconv`` form; the Swin's skip
    layers as in the released checkpoints (x + LN1(x))."""
    m = family.pruned(official_skip=alt and family.name == "swin")
    if alt and family.name == "vit":
        m = _with_explicit_conv(m)
    x = family.images(2)
    scripted, stats = _scripted_and_traced_equal_eager(m, x)
    # fx records the mode it traced in (as timm's fx feature extractor, which traces train and eval separately)
    for variant in (scripted.train(), torch.fx.symbolic_trace(copy.deepcopy(m).train())):
        eager = copy.deepcopy(m).train()
        torch.manual_seed(0)  # the same drop-path draws (timm's Swin default drop_path_rate 0.1)
        out_ref = eager(x)
        torch.manual_seed(0)
        out = variant(x)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        new_ref, new = _bn_stats(eager), _bn_stats(variant)  # an fx graph keeps only the buffers it reads
        assert new.keys() == new_ref.keys() == stats.keys() and len(new) == 4  # the 3x3 and the 1x1 layer
        assert all(not torch.equal(new_ref[k], stats[k]) for k in stats)  # a training step moved them
        for k in new_ref:
            torch.testing.assert_close(new[k], new_ref[k], atol=1e-6, rtol=1e-5)
    # gradients through the scripted conv form equal the eager ones
    eager = copy.deepcopy(m).train()
    scripted = torch.jit.script(copy.deepcopy(m)).train()
    torch.manual_seed(1)
    eager(x).square().mean().backward()
    torch.manual_seed(1)
    scripted(x).square().mean().backward()
    grads = dict(scripted.named_parameters())
    for n, p in eager.named_parameters():
        if p.grad is None:  # only the unused LN1 of an identity skip block
            assert grads[n].grad is None and ".norm1." in n and not (alt and family.name == "swin"), n
            continue
        torch.testing.assert_close(grads[n].grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)
    with pytest.raises(torch.jit.Error, match="expected images"):
        scripted(torch.randn(2, 3, 48, 48))


def test_conv_attention_refuses_attention_masks():
    conv = mixed_pruned().vit.blocks[CHOICES.index("3x3")].attn
    with pytest.raises(ValueError, match="attention masks"):
        conv(torch.randn(1, 17, 32), attn_mask=torch.zeros(17, 17))


def test_features_only(family):
    """features_only: timm's FeatureGetterNet over the feature taps (blocks of a ViT, stages of a Swin; NCHW), the
    model pruned after the last tap it keeps (its architecture record too)."""
    api = API[family.name]
    src = family.pruned()
    x = family.images(1)
    keep = (0, 1)
    with torch.no_grad():
        taps = src.forward_intermediates(x, intermediates_only=True)
    feats = features_only_model(copy.deepcopy(src), {"out_indices": keep}, family.name)
    assert feats.feature_info.channels() == [api.taps[i][1] for i in keep]
    assert feats.feature_info.reduction() == [api.taps[i][2] for i in keep]
    model = feats.model
    assert model.signature.num_classes == 0 and model.architecture.signature == model.signature
    assert model.architecture.attn_choices == family.choices[:len(model.architecture.blocks)]
    assert len(model.architecture.blocks) == model.signature.depth == {"vit": 2, "swin": 4}[family.name]
    with torch.no_grad():
        out = feats(x)
    assert len(out) == len(keep)
    for got, i in zip(out, keep):
        torch.testing.assert_close(got, taps[i])


@pytest.mark.parametrize("name,channels,reduction", [("spvit_deit_tiny_patch16_224", [192] * 3, [16] * 3),
                                                     ("spvit_swin_tiny_patch4_window7_224", [96, 192, 384, 768],
                                                      [4, 8, 16, 32])])
def test_features_only_through_timm(name, channels, reduction):
    """timm.create_model(spvit name, features_only=True) (on the meta device: the structure only), and its errors."""
    with torch.device("meta"):
        m = timm.create_model(name, features_only=True)
    assert m.feature_info.channels() == channels and m.feature_info.reduction() == reduction
    assert m.default_cfg["input_size"] == (3, 224, 224)
    with pytest.raises(ValueError, match="feature_cls='getter'"):
        timm.create_model(name, features_only=True, feature_cls="hook")
    with pytest.raises(ValueError, match="output_stride"):
        timm.create_model(name, features_only=True, output_stride=8)


def test_prune_intermediate_layers_keeps_a_deployable_model():
    m = mixed_pruned()
    x = images(2)
    with torch.no_grad():
        taps = m.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    take = m.prune_intermediate_layers([1], prune_norm=True)
    assert take == [1] and len(m.vit.blocks) == 2 and m.architecture.attn_choices == CHOICES[:2]
    assert m.num_classes == 0 and m.signature.depth == 2
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(out[:, 1:], taps[1])
        torch.testing.assert_close(deploy(m)(x), out, atol=1e-5, rtol=1e-5)


def test_supernet_timm_api():
    vit = tiny_vit()
    sn = spvit.supernet(vit).eval()
    x = images(2)
    with torch.no_grad():
        feats = sn.forward_features(x)
        torch.testing.assert_close(feats, sn.vit.forward_features(x))
        torch.testing.assert_close(sn.forward_head(feats), sn(x))
        torch.testing.assert_close(sn.forward_head(feats, pre_logits=True), feats[:, 0])
    assert sn.num_classes == 10 and sn.num_features == sn.head_hidden_size == 32 and sn.in_chans == 3
    assert sn.get_classifier() is sn.vit.head
    gates = {n for n, _ in sn.named_parameters() if "thresholds" in n}
    assert len(gates) == 8 and gates <= sn.no_weight_decay()
    opt = create_optimizer_v2(sn, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(sn.named_parameters())
    for n in gates:
        assert group_of[id(params[n])]["weight_decay"] == 0, n
    assert group_of[id(params["vit.blocks.0.attn.head_probs"])]["weight_decay"] == 0.05  # a weight (Q22)
    assert group_of[id(params["vit.pos_embed"])]["weight_decay"] == 0
    # layer decay: gates share their block's learning-rate scale, deeper blocks get larger scales
    scale = {n: group_of[id(p)]["lr_scale"] for n, p in params.items()}
    assert scale["vit.blocks.1.attn.kernel_thresholds"] == scale["vit.blocks.1.mlp.fc1.weight"]
    assert scale["vit.patch_embed.proj.weight"] < scale["vit.blocks.0.mlp.fc1.weight"] < scale["vit.head.weight"]
    dense = create_optimizer_v2(vit, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    dense_scale = {id(p): g["lr_scale"] for g in dense.param_groups for p in g["params"]}
    for n, p in vit.named_parameters():  # the timm model's own groups, prefixed
        if "vit." + n in scale:
            assert scale["vit." + n] == dense_scale[id(p)], n
    sn.reset_classifier(0)
    assert sn.num_classes == 0 and sn.signature.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(sn(x), feats[:, 0])
    arch = sn.architecture()
    assert arch.signature.num_classes == 0
    with pytest.raises(ValueError, match="num_classes"):
        sn.reset_classifier(-2)


def test_deployed_timm_api(tmp_path):
    pruned = mixed_pruned()
    pruned.pretrained_cfg = dict(pruned.pretrained_cfg, crop_pct=0.9, mean=(0.1, 0.2, 0.3))
    x = images(2)
    d = deploy(pruned)
    assert d.num_classes == 10 and d.num_features == d.head_hidden_size == 32 and d.in_chans == 3
    assert d.get_classifier() is d.head
    data = resolve_data_config(model=d)
    assert data["crop_pct"] == 0.9 and data["mean"] == (0.1, 0.2, 0.3) and data["input_size"] == (3, 32, 32)
    with torch.no_grad():
        pooled = pruned.forward_head(pruned.forward_features(x), pre_logits=True)
        torch.testing.assert_close(d.forward_head(d.forward_features(x), pre_logits=True), pooled, atol=1e-5,
                                   rtol=1e-5)
        d.reset_classifier(0)
        assert d.num_classes == 0 and isinstance(d.get_classifier(), torch.nn.Identity)
        torch.testing.assert_close(d(x), pooled, atol=1e-5, rtol=1e-5)
        d.save(str(tmp_path / "d.pt"))
        back = spvit.load_deployed(str(tmp_path / "d.pt"))
        assert back.num_classes == 0 and resolve_data_config(model=back)["crop_pct"] == 0.9
        torch.testing.assert_close(back(x), pooled, atol=1e-5, rtol=1e-5)
        d.reset_classifier(4, global_pool="avg")
        assert d(x).shape == (2, 4) and not any(p.requires_grad for p in d.parameters())
    with pytest.raises(ValueError, match="global_pool"):
        d.reset_classifier(0, global_pool="cls")
    for name in ("no_weight_decay", "group_matcher", "set_grad_checkpointing"):
        assert not hasattr(d, name)  # inference-only: no optimizer hooks
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.jit.script(d)


class _Wrapped(WrappedVitApi, torch.nn.Module):
    """A test wrapper of a timm model under another attribute name (as a Swin supernet would hold one)."""

    timm_attr = "swin"

    def __init__(self, model):
        super().__init__()
        self.swin = model

    def forward(self, x):
        return self.swin(x)


def test_wrapped_api_prefixes_any_timm_model():
    """The mixin's optimizer hooks give a wrapped timm Swin exactly the groups timm gives the bare model."""
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2),
                             num_classes=5)
    wrapped = _Wrapped(swin)
    assert wrapped.num_classes == 5 and wrapped.num_features == swin.num_features
    assert wrapped.no_weight_decay() == {"swin." + n for n in swin.no_weight_decay()}
    kw = dict(lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    ours = create_optimizer_v2(wrapped, "adamw", **kw)
    ref = create_optimizer_v2(swin, "adamw", **kw)
    got = {id(p): (g["lr_scale"], g["weight_decay"]) for g in ours.param_groups for p in g["params"]}
    want = {id(p): (g["lr_scale"], g["weight_decay"]) for g in ref.param_groups for p in g["params"]}
    assert got == want and len({v[0] for v in got.values()}) > 3


# ----------------------------------------------------------------------------------------------------------------------
# Swin: SwinPrunedModel / SwinSupernet / DeployedSwin and the spvit_swin_* registrations
# ----------------------------------------------------------------------------------------------------------------------
def _swin_pruned(official_skip=False):
    from .test_official_swin import swin_pruned

    return swin_pruned(official_skip=official_skip)  # 32 px, stages 16/8/4; msa, 3x3, 1x1, shifted msa, skip, msa


def test_swin_registration_keeps_the_released_skips():
    """The registered Swin's skip layers are those of the released checkpoints (x + LN1(x)): every parameter is
    used; its pretrained cfg has the final map's size."""
    from spvit.models.pruned import SkipAttention

    m = timm.create_model("spvit_swin_tiny_patch4_window7_224")
    skips = [b.attn for b in m.blocks if isinstance(b.attn, SkipAttention)]
    assert len(skips) == 2 and all(s.official for s in skips)
    cfg = m.pretrained_cfg
    assert cfg["pool_size"] == (7, 7) and cfg["input_size"] == (3, 224, 224)


def test_swin_supernet_and_deployed_timm_api():
    from .test_official_swin import tiny_swin

    sn = spvit.supernet(tiny_swin()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = sn.forward_features(x)
        torch.testing.assert_close(feats, sn.swin.forward_features(x))
        torch.testing.assert_close(sn.forward_head(feats), sn(x))
    assert sn.num_features == sn.head_hidden_size == 128 and sn.num_classes == 10
    assert sn.get_classifier() is sn.swin.head.fc
    gates = {n for n, _ in sn.named_parameters() if "thresholds" in n}
    tables = {n for n, _ in sn.named_parameters() if n.endswith("relative_position_bias_table")}
    assert len(gates) == 12 and len(tables) == 6 and sn.no_weight_decay() == gates | tables
    assert [f["module"] for f in sn.feature_info] == ["swin.layers.0", "swin.layers.1", "swin.layers.2"]
    with pytest.raises(ValueError, match="expected images"):
        sn.forward_features(torch.randn(2, 3, 48, 48))
    pruned = _swin_pruned()
    pruned.pretrained_cfg = dict(pruned.pretrained_cfg, crop_pct=0.9, mean=(0.1, 0.2, 0.3))
    d = deploy(pruned)
    assert d.num_features == d.head_hidden_size == 128 and d.output_fmt == "NHWC"
    assert d.pretrained_cfg["pool_size"] == (4, 4)
    data = resolve_data_config(model=d)  # the source model's data settings are kept
    assert data["crop_pct"] == 0.9 and data["mean"] == (0.1, 0.2, 0.3) and data["input_size"] == (3, 32, 32)
    with torch.no_grad():
        feats = d.forward_features(x)
        d.reset_classifier(0)
        torch.testing.assert_close(d(x), feats.mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="global_pool"):
        d.reset_classifier(0, "token")
