"""The architectures published with the original SPViT (docs/method.md §8.3) and timm registrations of them, and
the small ViT of the demo (``spvit_demo_vit``).

``timm.create_model("spvit_deit_small_patch16_224")`` builds the SPViT-DeiT-S fine-tune model (a
:class:`~spvit.models.pruned.PrunedModel`) from a DeiT of the same size; ``pretrained=True`` is not available (no
released weights are bundled: load the original checkpoints with :func:`spvit.load_official`).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from ..arch import Architecture, BlockArch
from .convert import signature_of

# name -> (timm base model, MSA choice per block, kept FFN units per block); from the configs and indicator files.
SHIPPED: Dict[str, Tuple[str, List[str], List[int]]] = {
    "spvit_deit_tiny_patch16_224": (
        "deit_tiny_patch16_224", ["1x1", "1x1"] + ["msa"] * 10,
        [744, 758, 764, 767, 766, 764, 756, 659, 633, 473, 179, 145]),
    "spvit_deit_small_patch16_224": (
        "deit_small_patch16_224", ["1x1"] + ["msa"] * 11,
        [1304, 1399, 1344, 1214, 1251, 1183, 1140, 925, 742, 391, 104, 103]),
    "spvit_deit_base_patch16_224": (  # bs_l008_t60, the published SPViT-DeiT-B
        "deit_base_patch16_224", ["1x1"] * 3 + ["3x3"] * 2 + ["msa"] * 7,
        [1118, 489, 1050, 1345, 1336, 1326, 1431, 1564, 1606, 1702, 1290, 190]),
    "spvit_deit_base_l006_t100_patch16_224": (
        "deit_base_patch16_224", ["1x1"] * 3 + ["3x3"] + ["msa"] * 8,
        [1253, 610, 1343, 1912, 2354, 2306, 2483, 2753, 2869, 2860, 2443, 934]),
}


def shipped_architecture(name: str, base_model=None, **create_kwargs) -> Architecture:
    """The published architecture ``name`` (FFN units indexed 0..width-1: the original files store only the kept
    weights' count per layer in the fine-tune checkpoints)."""
    import timm

    if name not in SHIPPED:
        raise KeyError(f"unknown SPViT architecture {name!r}; known: {sorted(SHIPPED)}")
    base_name, attn, widths = SHIPPED[name]
    base = base_model if base_model is not None else timm.create_model(base_name, pretrained=False, **create_kwargs)
    return Architecture(base_name, signature_of(base), [BlockArch(a, tuple(range(w))) for a, w in zip(attn, widths)],
                        meta={"source": f"SPViT release ({name})"})


def _factory(name: str):
    def build(pretrained: bool = False, **kwargs):
        import timm

        from .pruned import prune

        if pretrained:
            raise ValueError(f"{name}: no bundled pretrained weights; load an original checkpoint with "
                             "spvit.load_official(path, base_model_name)")
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        base = timm.create_model(SHIPPED[name][0], pretrained=False, **kwargs)
        return prune(base, shipped_architecture(name, base))

    build.__name__ = name
    build.__doc__ = f"SPViT fine-tune model {name} (docs/method.md §8.3) built on {SHIPPED[name][0]}."
    return build


DEMO_MODEL = "spvit_demo_vit"


def spvit_demo_vit(pretrained: bool = False, **kwargs):
    """Small ViT of the digits demo (a plain timm ``VisionTransformer``): 16x16 one-channel input, patch 4, dim 64,
    depth 6, 4 heads by default; every size can be given as a keyword."""
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ValueError(f"{DEMO_MODEL} has no pretrained weights")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    args = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
                mlp_ratio=4.0, class_token=True, global_pool="token")
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = {"architecture": DEMO_MODEL, "num_classes": args["num_classes"]}
    return model


def register_with_timm() -> None:
    """Register every shipped architecture and the demo model with timm (idempotent)."""
    from timm.models import is_model, register_model

    for name in SHIPPED:
        if not is_model(name):
            register_model(_factory(name))
    if not is_model(DEMO_MODEL):
        register_model(spvit_demo_vit)
