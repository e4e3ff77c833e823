"""The architectures published with the original SPViT (docs/method.md §8.3) and timm registrations of them, and
the small ViT of the demo (``spvit_demo_vit``).

``timm.create_model("spvit_deit_small_patch16_224")`` builds the SPViT-DeiT-S fine-tune model (a
:class:`~spvit.models.pruned.PrunedModel`) from a DeiT of the same size. No weights are bundled: with a released
checkpoint of the original SPViT downloaded, ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=path))`` loads it (through :func:`spvit.load_official`). Each registration carries a
timm pretrained cfg (input size, mean/std, the evaluation crop, the release file name in ``notes``), so
``timm.data.resolve_data_config`` gives the original evaluation transform.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import timm

from ..arch import Architecture, BlockArch
from ..choices import AttnChoice
from ..families import family_of
from .convert import signature_of
from .official import load_official
from .pruned import prune
from .timm_api import features_only_model, split_feature_kwargs

_M, _S, _1, _3 = (c.value for c in (AttnChoice.MSA, AttnChoice.SKIP, AttnChoice.CONV1, AttnChoice.CONV3))

# name -> (timm base model, MSA choice per block, kept FFN units per block); from the configs and indicator files.
SHIPPED: Dict[str, Tuple[str, List[str], List[int]]] = {
    "spvit_deit_tiny_patch16_224": (
        "deit_tiny_patch16_224", [_1, _1] + [_M] * 10,
        [744, 758, 764, 767, 766, 764, 756, 659, 633, 473, 179, 145]),
    "spvit_deit_small_patch16_224": (
        "deit_small_patch16_224", [_1] + [_M] * 11,
        [1304, 1399, 1344, 1214, 1251, 1183, 1140, 925, 742, 391, 104, 103]),
    "spvit_deit_base_patch16_224": (  # bs_l008_t60, the published SPViT-DeiT-B
        "deit_base_patch16_224", [_1] * 3 + [_3] * 2 + [_M] * 7,
        [1118, 489, 1050, 1345, 1336, 1326, 1431, 1564, 1606, 1702, 1290, 190]),
    "spvit_deit_base_l006_t100_patch16_224": (
        "deit_base_patch16_224", [_1] * 3 + [_3] + [_M] * 8,
        [1253, 610, 1343, 1912, 2354, 2306, 2483, 2753, 2869, 2860, 2443, 934]),
}

# Swin (docs/method.md §8.3): name -> (timm base model, MSA choice per block nested per stage, kept FFN units per
# block nested per stage); from the original fine-tune configs and FFN indicator files. No 3x3 layer in any.
SHIPPED_SWIN: Dict[str, Tuple[str, List[List[str]], List[List[int]]]] = {
    "spvit_swin_tiny_patch4_window7_224": (  # tn_l28_t32
        "swin_tiny_patch4_window7_224", [[_1, _S], [_1, _S], [_M] * 6, [_M] * 2],
        [[186, 152], [646, 504], [1350, 1319, 1289, 1249, 1234, 1082], [3041, 2994]]),
    "spvit_swin_small_patch4_window7_224": (  # sm_l04_t55
        "swin_small_patch4_window7_224", [[_1, _S], [_M, _M], [_M] * 12 + [_S, _1, _M, _M, _S, _S], [_M, _M]],
        [[188, 209], [748, 680], [1159, 1260, 1127, 1036, 919, 916, 868, 918, 903, 937, 961, 1037, 1063, 996, 888,
                                  866, 741, 509], [3064, 3051]]),
    "spvit_swin_base_patch4_window7_224": (  # bs_l01_t100 (no result or weights published)
        "swin_base_patch4_window7_224", [[_M, _S], [_M, _M], [_M] * 7 + [_S] + [_M] * 6 + [_S, _1, _M, _S], [_M, _M]],
        [[311, 303], [1011, 980], [1763, 1673, 1636, 1523, 1410, 1377, 1332, 1345, 1440, 1426, 1400, 1315, 1371, 1321,
                                   1324, 1265, 1127, 734], [3572, 2931]]),
}


def _flat(nested: List[List]) -> List:
    return [v for stage in nested for v in stage]


def shipped_entry(name: str) -> Tuple[str, List[str], List[int]]:
    """(timm base model, attention choice per block, kept FFN units per block) of a published architecture."""
    if name in SHIPPED:
        return SHIPPED[name]
    if name in SHIPPED_SWIN:
        base, attn, widths = SHIPPED_SWIN[name]
        return base, _flat(attn), _flat(widths)
    raise KeyError(f"unknown SPViT architecture {name!r}; known: {sorted(SHIPPED) + sorted(SHIPPED_SWIN)}")


def shipped_architecture(name: str, base_model=None, **create_kwargs) -> Architecture:
    """The published architecture ``name`` (FFN units indexed 0..width-1: the original files store only the kept
    weights' count per layer in the fine-tune checkpoints)."""
    base_name, attn, widths = shipped_entry(name)
    base = base_model if base_model is not None else timm.create_model(base_name, pretrained=False, **create_kwargs)
    return Architecture(base_name, signature_of(base), [BlockArch(a, tuple(range(w))) for a, w in zip(attn, widths)],
                        meta={"source": f"SPViT release ({name})"})


# ----------------------------------------------------------------------------------------------------------------------
# timm pretrained cfgs of the spvit_deit_* registrations
# ----------------------------------------------------------------------------------------------------------------------
RELEASE_URL = "https://github.com/ziplab/SPViT/releases/tag/1.0"
# registered name -> checkpoint file of the original release (None: architecture published without weights)
RELEASE_FILES: Dict[str, Optional[str]] = {
    "spvit_deit_tiny_patch16_224": "spvit_deit_ti_l200_t10.pth",
    "spvit_deit_small_patch16_224": "spvit_deit_sm_l30_t32.pth",
    "spvit_deit_base_patch16_224": "spvit_deit_bs_l008_t60.pth",
    "spvit_deit_base_l006_t100_patch16_224": None,
    "spvit_swin_tiny_patch4_window7_224": "spvit_swin_t_l28_t32.pth",
    "spvit_swin_small_patch4_window7_224": "spvit_swin_sm_l04_t55.pth",
    "spvit_swin_base_patch4_window7_224": None,
}
# The original evaluation transform (DeiT's recipe, docs/method.md §4.5): resize 256 (bicubic), centre crop 224;
# the original Swin code evaluates the same way (TEST.CROP: resize 256/224 x 224, centre crop 224, bicubic).
EVAL_CROP_PCT = 224 / 256


def spvit_deit_cfg(name: str) -> Dict[str, Any]:
    """timm pretrained cfg (as a dict) of the registered SPViT-DeiT model ``name``."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    release = RELEASE_FILES[name]
    note = (f"original release file {release} ({RELEASE_URL}); load it with pretrained=True, "
            f"pretrained_cfg_overlay=dict(file=<path>)" if release else "no released weights")
    swin = name in SHIPPED_SWIN
    return {
        "architecture": name, "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "fixed_input_size": True,
        "pool_size": (224 // 32, 224 // 32) if swin else None,  # Swin: the last stage's map (stride 32)
        "crop_pct": EVAL_CROP_PCT, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "swin.patch_embed.proj" if swin else "vit.patch_embed.proj",
        "classifier": "swin.head.fc" if swin else "vit.head", "license": "apache-2.0", "origin_url": RELEASE_URL,
        "paper_name": "Pruning Self-attentions into Convolutional Layers in Single Path",
        "paper_ids": "arXiv:2111.11802", "notes": (note,),
    }


# timm reads the pretrained cfgs of an entry point from ``default_cfgs`` of the module it is registered from
default_cfgs: Dict[str, Any] = {}


def _deit_default_cfgs() -> Dict[str, Any]:
    """The generated timm default cfgs of the spvit_deit registrations."""
    from timm.models import generate_default_cfgs

    return generate_default_cfgs({name: spvit_deit_cfg(name) for name in list(SHIPPED) + list(SHIPPED_SWIN)})


def _load_release(name: str, path: str, num_classes: Optional[int], create_kwargs: Dict[str, Any]):
    """The PrunedModel of a released checkpoint ``path`` of architecture ``name`` (checked against the registry)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: checkpoint file not found: {path}")
    base_name, attn, widths = shipped_entry(name)
    model = load_official(path, base_name, **create_kwargs)
    if not isinstance(model, family_of(model).pruned_class):
        raise ValueError(f"{name}: {path} is a search (supernet) checkpoint, not a fine-tuned {name}")
    arch = model.architecture
    if arch.attn_choices != attn or arch.ffn_widths != widths:
        raise ValueError(f"{name}: {path} holds another architecture (attention {arch.attn_choices}, FFN widths "
                         f"{arch.ffn_widths}; expected {attn}, {widths})")
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def _factory(name: str):
    def build(pretrained: bool = False, **kwargs):
        swin = name in SHIPPED_SWIN
        features_only = kwargs.pop("features_only", False)
        feature_kwargs = split_feature_kwargs(kwargs, stride=32 if swin else 16) if features_only else {}
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("cache_dir", None)
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        cfg = dict(spvit_deit_cfg(name), **overlay)
        if pretrained:
            if not cfg.get("file"):
                release = RELEASE_FILES[name]
                where = (f"download {release} from the original SPViT release ({RELEASE_URL}) and pass"
                         if release else "no weights were released for this architecture; for your own checkpoint "
                         "of it pass")
                raise ValueError(f"{name}: no bundled pretrained weights; {where} "
                                 "pretrained_cfg_overlay=dict(file=<path>)")
            num_classes = kwargs.pop("num_classes", None)
            model = _load_release(name, cfg["file"], num_classes, kwargs)
        else:
            base = timm.create_model(shipped_entry(name)[0], pretrained=False, **kwargs)
            arch = shipped_architecture(name, base)
            # Skip layers as in the released checkpoints (x + LN1(x), docs/method.md Q4, §11): the model is the one
            # that pretrained=True loads them into, with or without weights. The method's identity skip:
            # spvit.prune(base, arch).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="skip layers use the original fine-tune semantics")
                model = prune(base, arch, official_skip=AttnChoice.SKIP in arch.attn_choices)
        cfg["num_classes"] = model.num_classes
        model.pretrained_cfg = cfg
        if features_only:  # block (ViT) or stage (Swin) outputs through forward_intermediates, as timm's own
            return features_only_model(model, feature_kwargs, name, out_indices=(0, 1, 2, 3) if swin else 3)
        return model

    build.__name__ = name
    build.__module__ = __name__
    build.__doc__ = f"SPViT fine-tune model {name} (docs/method.md §8.3) built on {shipped_entry(name)[0]}."
    build.timm_base = shipped_entry(name)[0]  # the timm model it is built on (selects timm's tests for it)
    return build


DEMO_MODEL = "spvit_demo_vit"


def spvit_demo_vit(pretrained: bool = False, **kwargs):
    """Small ViT of the digits demo (a plain timm ``VisionTransformer``): 16x16 one-channel input, patch 4, dim 64,
    depth 6, 4 heads by default; every size can be given as a keyword."""
    from timm.models import build_model_with_cfg
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ValueError(f"{DEMO_MODEL} has no pretrained weights")
    args = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
                mlp_ratio=4.0, class_token=True, global_pool="token")
    args.update(kwargs)
    # timm's builder: pretrained cfg from the registry, features_only through forward_intermediates as timm's ViTs
    model = build_model_with_cfg(VisionTransformer, DEMO_MODEL, pretrained=False,
                                 feature_cfg=dict(out_indices=3, feature_cls="getter"), **args)
    if not args.get("features_only"):
        size = args["img_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        model.pretrained_cfg.update(num_classes=model.num_classes, input_size=(args["in_chans"], *size))
    return model


def _demo_cfg() -> Dict[str, Any]:
    """timm pretrained cfg of the demo model (no weights; the digits demo's 16x16 one-channel images, normalised as
    spvit.data.DigitsDataset)."""
    return {"architecture": DEMO_MODEL, "url": "", "num_classes": 10, "input_size": (1, 16, 16), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.3,), "std": (0.4,),
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
            "notes": ("the small ViT of the digits demo (spvit demo); no released weights",)}


spvit_demo_vit.timm_base = "test_vit"  # a plain timm VisionTransformer, like timm's small test ViT


def register_with_timm() -> None:
    """Register every shipped architecture and the demo model with timm (idempotent)."""
    from timm.models import generate_default_cfgs, is_model, register_model

    default_cfgs.update(_deit_default_cfgs())
    default_cfgs.update(generate_default_cfgs({DEMO_MODEL: _demo_cfg()}))
    for name in list(SHIPPED) + list(SHIPPED_SWIN):
        if not is_model(name):
            register_model(_factory(name))
    if not is_model(DEMO_MODEL):
        register_model(spvit_demo_vit)
