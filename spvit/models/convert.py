"""Walking a timm VisionTransformer or SwinTransformer: what SPViT can convert, and its :class:`ModelSignature` /
:class:`SwinSignature`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..arch import ModelSignature, SwinSignature
from ..families import family_of


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
    return family_of(model).signature_of(model, check_blocks)


def vit_signature_of(model: nn.Module, check_blocks: bool = True) -> ModelSignature:
    """Signature of a timm VisionTransformer (or of a Supernet / PrunedModel wrapping one): the ViT family's.

    Raises:
        UnsupportedModelError: naming why the model cannot be converted.
    """
    vit = getattr(model, "vit", model)
    VisionTransformer, Block, Attention, Mlp = _timm_classes()
    if not isinstance(vit, VisionTransformer):
        raise UnsupportedModelError(
            f"spvit converts timm VisionTransformer (ViT/DeiT/DeiT-III) and SwinTransformer (Swin v1) models; "
            f"got {type(vit).__name__}")
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
    _check_ffn(f"block {i}", blk.mlp, Mlp, " (GLU FFNs are not supported)")


def _check_ffn(where: str, mlp: nn.Module, Mlp, why: str = "") -> None:
    """A block's FFN must be timm's Mlp without an inner norm and with a GELU (or already an spvit FFN)."""
    if isinstance(mlp, Mlp):
        if not isinstance(mlp.norm, nn.Identity):
            raise UnsupportedModelError(f"{where}: FFN with an inner norm is not supported")
        gelu_approximate(mlp.act)
    elif not hasattr(mlp, "full_hidden"):
        raise UnsupportedModelError(f"{where}: FFN {type(mlp).__name__} is not timm's Mlp{why}")


def check_images(x, sig: ModelSignature) -> None:
    """Clear error for images of the wrong rank, channels or size."""
    if x.dim() != 4:
        raise ValueError(f"expected images (batch, {sig.in_chans}, H, W); got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != sig.in_chans or tuple(x.shape[-2:]) != sig.img_size:
        raise ValueError(f"expected images of shape (batch, {sig.in_chans}, {sig.img_size[0]}, {sig.img_size[1]}); "
                         f"got {tuple(x.shape)}. SPViT's conv layers are built for a fixed {sig.grid[0]}x"
                         f"{sig.grid[1]} patch grid")


# ----------------------------------------------------------------------------------------------------------------------
# Swin (docs/method.md §7)
# ----------------------------------------------------------------------------------------------------------------------
def _timm_swin():
    from timm.models import swin_transformer as S
    return S


def is_swin(model: nn.Module) -> bool:
    """True for a timm SwinTransformer or an spvit model wrapping one (``.swin``)."""
    return isinstance(getattr(model, "swin", model), _timm_swin().SwinTransformer)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def swin_signature_of(model: nn.Module, check_blocks: bool = True) -> SwinSignature:
    """Signature of a timm SwinTransformer (or of a SwinSupernet / SwinPrunedModel wrapping one).

    Raises:
        UnsupportedModelError: naming why the model cannot be converted (window or image size the layers cannot
            handle, absolute position embedding, head dims that differ across stages, non-GELU FFN, ...).
    """
    S = _timm_swin()
    swin = getattr(model, "swin", model)
    if not isinstance(swin, S.SwinTransformer):
        raise UnsupportedModelError(f"expected a timm SwinTransformer; got {type(swin).__name__}")
    if getattr(swin, "absolute_pos_embed", None) is not None:
        raise UnsupportedModelError("Swin with an absolute position embedding is not supported (no original SPViT "
                                    "configuration uses one)")
    if getattr(swin, "dynamic_img_size", False):
        raise UnsupportedModelError("dynamic image size (strict_img_size=False) is not supported: the windows, masks "
                                    "and conv layers are built for a fixed image size")
    pe = swin.patch_embed
    patch = _pair(pe.patch_size)
    if patch[0] != patch[1]:
        raise UnsupportedModelError(f"non-square patches {patch} are not supported")
    grid = tuple(int(g) for g in pe.grid_size)
    if grid[0] != grid[1]:
        raise UnsupportedModelError(f"non-square patch grid {grid[0]}x{grid[1]} is not supported")
    in_chans = pe.proj.in_channels if hasattr(pe.proj, "in_channels") else 3
    layers = list(swin.layers)
    if not layers:
        raise UnsupportedModelError("the model has no stages")
    embed_dim = int(pe.proj.out_channels) if hasattr(pe.proj, "out_channels") else int(swin.embed_dim)
    # the nominal window: the largest window any stage uses (smaller ones are stages of a single window)
    windows = [_pair(b.window_size) for st in layers for b in st.blocks]
    if not windows:
        raise UnsupportedModelError("the model has no transformer blocks")
    window = max(w[0] for w in windows)
    depths, heads, hidden = [], [], []
    for s, stage in enumerate(layers):
        dim = embed_dim * 2 ** s
        res = grid[0] // 2 ** s
        if s > 0:
            if not isinstance(stage.downsample, S.PatchMerging):
                raise UnsupportedModelError(f"stage {s + 1} does not start with timm's PatchMerging")
            if stage.downsample.reduction.out_features != dim:
                raise UnsupportedModelError(f"stage {s + 1} has {stage.downsample.reduction.out_features} channels; "
                                            f"SPViT's Swin needs the standard doubling ({dim})")
            if (grid[0] // 2 ** (s - 1)) % 2:
                raise UnsupportedModelError(f"stage {s} has an odd resolution {grid[0] // 2 ** (s - 1)} (timm would "
                                            f"pad before merging patches); choose an image size whose patch grid "
                                            f"halves evenly")
        elif not isinstance(stage.downsample, nn.Identity):
            raise UnsupportedModelError("stage 1 must not downsample")
        blocks = list(stage.blocks)
        if not blocks:
            raise UnsupportedModelError(f"stage {s + 1} has no blocks")
        w_eff = min(window, res)
        if res % w_eff:
            raise UnsupportedModelError(
                f"stage {s + 1}: resolution {res}x{res} is not divisible by the window {w_eff} (timm would pad the "
                f"map; the windowed conv layers of SPViT need whole windows); choose an image size whose stage grids "
                f"are multiples of the window size")
        shift = 0 if res <= window else window // 2
        h_stage, hid_stage = None, None
        for j, blk in enumerate(blocks):
            where = f"stage {s + 1} block {j}"
            if not (isinstance(blk, S.SwinTransformerBlock) or getattr(blk, "spvit_block", None) == "swin"):
                raise UnsupportedModelError(f"{where} is a {type(blk).__name__}, not timm's SwinTransformerBlock")
            if _pair(blk.window_size) != (w_eff, w_eff):
                raise UnsupportedModelError(f"{where}: window {tuple(blk.window_size)}, expected {(w_eff, w_eff)} "
                                            f"(one window size for every stage is supported)")
            want_shift = shift if j % 2 else 0
            if _pair(blk.shift_size) != (want_shift, want_shift):
                raise UnsupportedModelError(f"{where}: shift {tuple(blk.shift_size)}, expected "
                                            f"{(want_shift, want_shift)} (the standard shifted-window schedule)")
            if getattr(blk, "always_partition", False) or getattr(blk, "dynamic_mask", False):
                raise UnsupportedModelError(f"{where}: always_partition / dynamic masks are not supported")
            if tuple(blk.input_resolution) != (res, res):
                raise UnsupportedModelError(f"{where}: input resolution {tuple(blk.input_resolution)}, expected "
                                            f"{(res, res)}")
            h = getattr(blk.attn, "num_heads", None)
            if h is None:  # a skip layer of a pruned model: heads from the stage's other blocks
                h = h_stage
            if check_blocks:
                _check_swin_block(where, blk, dim, S)
            if h is not None:
                if h_stage is not None and h != h_stage:
                    raise UnsupportedModelError(f"{where} has {h} heads, the stage's other blocks {h_stage}")
                h_stage = h
            hid = getattr(blk.mlp, "full_hidden", None) or blk.mlp.fc1.out_features
            if hid_stage is not None and hid != hid_stage:
                raise UnsupportedModelError(f"{where}: FFN width {hid} differs from the stage's other blocks "
                                            f"({hid_stage})")
            hid_stage = hid
        if h_stage is None:
            h_stage = getattr(stage, "spvit_num_heads", None)
        if h_stage is None:
            raise UnsupportedModelError(f"stage {s + 1}: cannot tell the number of heads")
        depths.append(len(blocks))
        heads.append(int(h_stage))
        hidden.append(int(hid_stage))
    head_dims = [embed_dim * 2 ** s // h for s, h in enumerate(heads)]
    if len(set(head_dims)) != 1 or any(embed_dim * 2 ** s % h for s, h in enumerate(heads)):
        raise UnsupportedModelError(f"head dims {head_dims} differ across stages (heads {heads}); SPViT's Swin needs "
                                    f"one head dim (32 in Swin-T/S/B)")
    return SwinSignature(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads), window_size=int(window),
                         grid=grid, patch_size=int(patch[0]), in_chans=int(in_chans), mlp_hidden=tuple(hidden),
                         num_classes=int(swin.num_classes))


def _check_swin_block(where: str, blk: nn.Module, dim: int, S) -> None:
    from timm.layers import Mlp

    attn = blk.attn
    if isinstance(attn, S.WindowAttention):
        if attn.qkv.out_features != 3 * dim or attn.proj.out_features != dim:
            raise UnsupportedModelError(f"{where}: attention width {attn.qkv.out_features // 3} differs from the "
                                        f"stage dim {dim} (head_dim overrides are not supported)")
        if attn.proj.bias is None:
            raise UnsupportedModelError(f"{where}: attention projection without bias is not supported")
    elif not hasattr(attn, "spvit_kind"):
        raise UnsupportedModelError(f"{where}: attention {type(attn).__name__} is not timm's WindowAttention")
    _check_ffn(where, blk.mlp, Mlp)


def check_swin_images(x: torch.Tensor, sig: SwinSignature) -> None:
    """Clear error for images of the wrong rank, channels or size."""
    if x.dim() != 4:
        raise ValueError(f"expected images (batch, {sig.in_chans}, H, W); got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != sig.in_chans or tuple(x.shape[-2:]) != sig.img_size:
        raise ValueError(f"expected images of shape (batch, {sig.in_chans}, {sig.img_size[0]}, {sig.img_size[1]}); "
                         f"got {tuple(x.shape)}. SPViT's Swin layers are built for a fixed {sig.grid[0]}x"
                         f"{sig.grid[1]} patch grid")
