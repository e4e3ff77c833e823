"""Walking a timm VisionTransformer: what SPViT can convert, and its :class:`ModelSignature`."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..arch import ModelSignature


class UnsupportedModelError(ValueError):
    """The model cannot be converted to SPViT (the message says why)."""


# Column j of a Swin head_probs (centre first, docs/method.md §1.3) for DeiT tap k: the DeiT-order matrix is
# ``head_probs[:, SWIN_TO_DEIT]`` (DeiT taps 0-3 are Swin columns 1-4, the centre 4 is column 0, 5-8 stay).
SWIN_TO_DEIT = (1, 2, 3, 4, 0, 5, 6, 7, 8)


def _timm_classes():
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    from timm.layers import Mlp
    return VisionTransformer, Block, Attention, Mlp


def gelu_approximate(act: nn.Module) -> str:
    """'none' or 'tanh' for a GELU activation module; raises for anything else."""
    if isinstance(act, nn.GELU):
        return act.approximate
    name = type(act).__name__
    if name == "GELU":  # timm.layers.activations.GELU (erf)
        return "none"
    if name in ("GELUTanh", "GELU_tanh"):
        return "tanh"
    raise UnsupportedModelError(f"FFN activation {name} is not supported (SPViT's FFN gates need GELU)")


def model_name_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def signature_of(model: nn.Module, check_blocks: bool = True) -> ModelSignature:
    """Signature of a timm ViT (or of a Supernet / PrunedModel wrapping one); of a timm Swin Transformer (or a
    wrapper of one) its :class:`~spvit.arch.SwinSignature`.

    Raises:
        UnsupportedModelError: naming why the model cannot be converted.
    """
    from .swin import is_swin, swin_signature_of

    if is_swin(getattr(model, "swin", model)):
        return swin_signature_of(model, check_blocks)
    vit = getattr(model, "vit", model)
    VisionTransformer, Block, Attention, Mlp = _timm_classes()
    if not isinstance(vit, VisionTransformer):
        raise UnsupportedModelError(
            f"spvit converts timm VisionTransformer models (ViT/DeiT/DeiT-III); got {type(vit).__name__}")
    if getattr(vit, "cls_token", None) is None:
        raise UnsupportedModelError("the model has no class token; SPViT's conv layers pass the class token through")
    if getattr(vit, "dist_token", None) is not None:
        raise UnsupportedModelError("distilled models (with a distillation token) are not supported; use the "
                                    "non-distilled variant (e.g. deit_small_patch16_224)")
    if vit.num_prefix_tokens != 1:
        raise UnsupportedModelError(f"the model has {vit.num_prefix_tokens} prefix tokens (class + register "
                                    "tokens); SPViT supports exactly one class token")
    if getattr(vit, "dynamic_img_size", False):
        raise UnsupportedModelError("dynamic_img_size=True is not supported: the conv layers need a fixed patch grid")
    pe = vit.patch_embed
    grid = tuple(int(g) for g in pe.grid_size)
    patch = pe.patch_size
    if isinstance(patch, (tuple, list)):
        if patch[0] != patch[1]:
            raise UnsupportedModelError(f"non-square patches {tuple(patch)} are not supported")
        patch = patch[0]
    in_chans = pe.proj.in_channels if hasattr(pe.proj, "in_channels") else 3
    embed_dim = vit.embed_dim
    blocks = list(vit.blocks)
    if not blocks:
        raise UnsupportedModelError("the model has no transformer blocks")
    heads, hidden = None, None
    for i, blk in enumerate(blocks):
        if check_blocks:
            _check_block(i, blk, embed_dim, Block, Attention, Mlp)
        attn = blk.attn
        h = getattr(attn, "num_heads", None)
        hid = _hidden_of(blk.mlp)
        heads = heads or h
        hidden = hidden or hid
        if h is not None and h != heads:
            raise UnsupportedModelError(f"block {i} has {h} heads, block 0 has {heads}; all blocks must agree")
    num_classes = vit.num_classes
    return ModelSignature(
        embed_dim=embed_dim, depth=len(blocks), num_heads=int(heads), mlp_hidden=int(hidden), grid=grid,
        patch_size=int(patch), in_chans=int(in_chans), num_prefix_tokens=1, num_classes=int(num_classes),
    )


def _hidden_of(mlp: nn.Module) -> Optional[int]:
    full = getattr(mlp, "full_hidden", None)  # our modules remember the dense width
    if full is not None:
        return full
    fc1 = getattr(mlp, "fc1", None)
    return fc1.out_features if fc1 is not None else None


def _check_block(i, blk, embed_dim, Block, Attention, Mlp) -> None:
    if not isinstance(blk, Block):
        raise UnsupportedModelError(f"block {i} is a {type(blk).__name__}; only timm's standard pre-norm Block is "
                                    "supported")
    attn = blk.attn
    if isinstance(attn, Attention):
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            raise UnsupportedModelError(f"block {i}: qk_norm attention is not supported")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(f"block {i}: scale_norm attention is not supported")
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"block {i}: gated attention is not supported")
        if attn.num_heads * attn.head_dim != embed_dim:
            raise UnsupportedModelError(f"block {i}: attention width {attn.num_heads * attn.head_dim} != embedding "
                                        f"dim {embed_dim}")
        if attn.proj.out_features != embed_dim:
            raise UnsupportedModelError(f"block {i}: attention output dim differs from the embedding dim")
        if attn.proj.bias is None:
            raise UnsupportedModelError(f"block {i}: attention projection without bias is not supported")
    elif not hasattr(attn, "spvit_kind"):
        raise UnsupportedModelError(f"block {i}: attention {type(attn).__name__} is not timm's Attention")
    mlp = blk.mlp
    if isinstance(mlp, Mlp):
        if not isinstance(mlp.norm, nn.Identity):
            raise UnsupportedModelError(f"block {i}: FFN with an inner norm is not supported")
        gelu_approximate(mlp.act)
    elif not hasattr(mlp, "full_hidden"):
        raise UnsupportedModelError(f"block {i}: FFN {type(mlp).__name__} is not timm's Mlp (GLU FFNs are not "
                                    "supported)")


def check_images(x, sig: ModelSignature) -> None:
    """Clear error for images of the wrong rank, channels or size."""
    if x.dim() != 4:
        raise ValueError(f"expected images (batch, {sig.in_chans}, H, W); got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != sig.in_chans or tuple(x.shape[-2:]) != sig.img_size:
        raise ValueError(f"expected images of shape (batch, {sig.in_chans}, {sig.img_size[0]}, {sig.img_size[1]}); "
                         f"got {tuple(x.shape)}. SPViT's conv layers are built for a fixed {sig.grid[0]}x"
                         f"{sig.grid[1]} patch grid")
