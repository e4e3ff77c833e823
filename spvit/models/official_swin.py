"""Loading checkpoints of the original SPViT Swin code (``SPViT_Swin``), docs/method.md §7, §5.7, §6, §11.

The original Swin model (``SPVisionTransformerSwin``) and timm's ``SwinTransformer`` compute the same function with
different module trees; the mapping from the original names to ours (:func:`original_to_timm_keys`):

* ``layers.{s}.downsample.*`` -> ``layers.{s+1}.downsample.*``: the original merges patches at the END of stage s,
  timm at the START of stage s+1. The 2x2 concatenation order is the same in both (rows/cols (0,0), (1,0), (0,1),
  (1,1)), so the PatchMerging norm and reduction weights are used unchanged;
* ``head.{weight,bias}`` -> ``head.fc.{weight,bias}`` (timm's ``ClassifierHead``);
* ``relative_position_index`` and the blocks' ``attn_mask`` are persistent buffers in the original and computed
  (non-persistent) buffers in timm: they are checked against ours (a window or shift configuration that differs is
  an error) and dropped;
* fine-tuned MSA layers: ``attn.qk`` + ``attn.v`` -> timm's fused ``attn.qkv`` (rows q, k, v); an original ``qk``
  without bias (``qkv_bias=False``) gets zero q/k biases, and the value bias the original keeps even then is loaded
  (a base Swin built with ``qkv_bias=False`` gets a biased ``qkv`` in those layers);
* everything else (patch embedding, norms, the search modules' ``qk``/``v``/``proj``/``head_probs``/``bn_*``/
  ``kernel_thresholds_full``, FFN ``fc1``/``fc2``/``ffn_thresholds``) keeps its name under ``swin.``;
  ``assigned_indicator_index`` buffers of search checkpoints are dropped (the decisions come from the thresholds,
  quirk Q5).

Three checkpoint kinds are recognised from the keys: search (``kernel_thresholds_full``), fine-tune (per block
``qk`` = MSA, ``bn_3x3`` / ``bn_1x1`` with ``v``, ``proj``, ``head_probs`` = conv, nothing = skip; compacted FFNs) and
parameter-optimised fine-tune (conv layers as ``bconv.{0,1,3}``, the layout of the original's
``UnifiedWindowAttentionParamOpt``). The original FFN indicator files (``ffn_indicators/*.pth``: one 0/1
``layers.{s}.blocks.{j}.mlp.assigned_indicator_index`` vector per block) are read by :func:`read_ffn_indicators`.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn


from ..arch import Architecture, BlockArch
from ..choices import AttnChoice
from .convert import is_swin, signature_of
from .official import _base_model, choice_from_keys, _load_strict, _read_state_dict
from .official import load_official as _load_official
from .pruned import ExplicitConvAttention, prune
from .swin import SwinSupernet

_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")
_DROPPED_BUFFERS = ("relative_position_index", "attn_mask")

# What the original SPViT_Swin/post_training_optimize_checkpoint.py writes is wrong for Swin (quirk Q9): it is the
# DeiT script (alpha 0.01, 1x1 from column 4, DeiT tap order, stage index used as block index, so every conv layer is
# converted as a 1x1). A correct Swin conversion uses alpha 100, column 0 for the 1x1 and the Swin tap order for the
# 3x3 (docs/method.md §1.3, §6, §11). We cannot repair a converted file (it no longer holds v, proj, head_probs):
# bconv layers are loaded as the convolution they store, with this warning.
Q9_WARNING = ("{path}: parameter-optimised (bconv) Swin conv layers are loaded as stored. A file written by the "
              "original SPViT_Swin/post_training_optimize_checkpoint.py does not reproduce its fine-tuned model "
              "(quirk Q9: it uses alpha 0.01, the DeiT centre column 4 and tap order, and converts every conv layer "
              "as a 1x1); load the fine-tune checkpoint itself instead where you have it")


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping (pure dict transforms)
# ----------------------------------------------------------------------------------------------------------------------
def original_to_timm_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the original Swin keys to timm's ``SwinTransformer`` layout (no ``swin.`` prefix, qk/v not fused).

    Moves ``layers.{s}.downsample`` to ``layers.{s+1}.downsample`` and ``head`` to ``head.fc``; other keys are kept.
    """
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", k)
        if m:
            k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        elif k.startswith("head.") and not k.startswith("head.fc."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


def timm_to_original_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`original_to_timm_keys`."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)$", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        elif k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        out[k] = v
    return out


def fuse_msa_qkv(sd: Dict[str, torch.Tensor], msa_blocks: Sequence[Tuple[int, int]]) -> Dict[str, torch.Tensor]:
    """Replace ``attn.qk`` + ``attn.v`` of the given (stage, block) MSA layers by timm's fused ``attn.qkv``."""
    out = dict(sd)
    for s, j in msa_blocks:
        p = f"layers.{s}.blocks.{j}.attn."
        qk_w, v_w = out.pop(p + "qk.weight"), out.pop(p + "v.weight")
        out[p + "qkv.weight"] = torch.cat([qk_w, v_w])
        qk_b, v_b = out.pop(p + "qk.bias", None), out.pop(p + "v.bias", None)
        if qk_b is not None or v_b is not None:
            qk_b = qk_b if qk_b is not None else qk_w.new_zeros(qk_w.shape[0])
            v_b = v_b if v_b is not None else v_w.new_zeros(v_w.shape[0])
            out[p + "qkv.bias"] = torch.cat([qk_b, v_b])
    return out


def stage_depths_of(sd: Dict[str, torch.Tensor]) -> Tuple[int, ...]:
    """Blocks per stage found in an original Swin state dict (empty when it has no ``layers.{s}.blocks.{j}`` keys)."""
    seen: Dict[int, int] = {}
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            s, j = int(m.group(1)), int(m.group(2))
            seen[s] = max(seen.get(s, 0), j + 1)
    return tuple(seen.get(s, 0) for s in range(max(seen) + 1)) if seen else ()


def block_choice(sd: Dict[str, torch.Tensor], s: int, j: int) -> str:
    """Attention choice of block (s, j) of an original fine-tune state dict: msa / 3x3 / 1x1 / skip."""
    return choice_from_keys(sd, f"layers.{s}.blocks.{j}.attn.", f"stage {s} block {j}", _DROPPED_BUFFERS)


class SwinExplicitConvAttention(ExplicitConvAttention):
    """A parameter-optimised (``bconv``) conv layer of a Swin fine-tune checkpoint: an
    :class:`~spvit.models.pruned.ExplicitConvAttention` (conv C->d, BN, ReLU, 1x1 conv d->C; docs/method.md §6)
    without prefix tokens, on the full stage map (as the original's ``UnifiedWindowAttentionParamOpt`` runs 3x3
    layers; for 1x1 layers windows and full map agree). forward(x_hat: (B, H*W, C)) -> (B, H*W, C).
    """

    def __init__(self, kind: str, dim: int, head_dim: int, grid):
        super().__init__(kind, dim, head_dim, grid, num_prefix_tokens=0)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
def looks_like_swin_checkpoint(sd: Dict[str, torch.Tensor]) -> bool:
    return any(_BLOCK.match(k) for k in sd)


def _check_model(sd: Dict[str, torch.Tensor], base: nn.Module, name: str, path: str) -> Tuple[int, ...]:
    depths = tuple(len(stage.blocks) for stage in base.layers)
    if not looks_like_swin_checkpoint(sd):
        what = ("a DeiT/ViT checkpoint (blocks.{i} keys)" if any(re.match(r"blocks\.\d+\.", k) for k in sd)
                else "not an SPViT Swin checkpoint (no layers.{s}.blocks.{j} keys)")
        raise ValueError(f"{path} is {what}; {name} is a Swin model")
    found = stage_depths_of(sd)
    if found != depths:
        raise ValueError(f"{path} has stage depths {found} but {name} has {depths}: a checkpoint of another model")
    if "absolute_pos_embed" in sd:
        raise ValueError(f"{path} uses an absolute position embedding (ape=True), which timm's SwinTransformer does "
                         "not have")
    return depths


def _check_and_drop_buffers(model: nn.Module, mapped: Dict[str, torch.Tensor], path: str) -> Dict[str, torch.Tensor]:
    """Drop the original's persistent index / mask buffers after checking them against the model's own."""
    own = model.state_dict()
    out = {}
    for k, v in mapped.items():
        if k in own or not k.endswith(_DROPPED_BUFFERS):
            out[k] = v
            continue
        mod_name, _, buf = k.rpartition(".")
        try:
            mine = model.get_submodule(mod_name)._buffers.get(buf)
        except AttributeError:
            mine = None
        if mine is None:
            if buf == "attn_mask" and v is not None and v.numel():
                raise ValueError(f"{path}: {k} is a shifted-window mask but the model's block is not shifted")
            continue  # e.g. the index of a layer that has no relative position bias here
        if tuple(mine.shape) != tuple(v.shape) or not torch.equal(mine.to(v.dtype).cpu(), v):
            raise ValueError(f"{path}: {k} differs from the model's (window size or shift configuration differs)")
    return out


def _strict(module: nn.Module, sd: Dict[str, torch.Tensor], path: str, what: str) -> None:
    _load_strict(module, _check_and_drop_buffers(module, sd, path), path, what)


def load_official_swin(sd: Dict[str, torch.Tensor], base: nn.Module, name: str, path: str,
                       alpha: Optional[float] = None):
    """The body of :func:`spvit.load_official` for a Swin model (``sd`` already read and unwrapped; alpha default
    100, the original Swin configs' ``EXTRA.alpha``)."""
    alpha = 100.0 if alpha is None else alpha
    _check_model(sd, base, name, path)
    if any(k.endswith("kernel_thresholds_full") for k in sd):
        sn = SwinSupernet(base, alpha=alpha, model_name=name)
        own = {k: v for k, v in original_to_timm_keys(sd).items() if not k.endswith("assigned_indicator_index")}
        _strict(sn, {f"swin.{k}": v for k, v in own.items()}, path, f"an SPViT Swin supernet of {name}")
        return sn
    return _load_finetune(sd, base, name, path, alpha)


def _load_finetune(sd, base, name, path, alpha):
    sig = signature_of(base)
    blocks: List[BlockArch] = []
    where: List[Tuple[int, int]] = []
    explicit: List[int] = []
    for s, stage in enumerate(base.layers):
        hidden = sig.mlp_hidden[s]
        for j in range(len(stage.blocks)):
            choice = block_choice(sd, s, j)
            key = f"layers.{s}.blocks.{j}.mlp.fc1.weight"
            if key not in sd:
                raise ValueError(f"{path}: missing {key}; not an SPViT Swin fine-tune checkpoint of {name}")
            width = sd[key].shape[0]
            if width > hidden:
                raise ValueError(f"{path}: stage {s} block {j} FFN width {width} exceeds {name}'s {hidden}")
            # the original stores only the compacted weights, not which units they were: index them 0..width-1
            blocks.append(BlockArch(choice, tuple(range(width))))
            if f"layers.{s}.blocks.{j}.attn.bconv.0.weight" in sd:
                explicit.append(len(where))
            where.append((s, j))
    arch = Architecture(name, sig, blocks, meta={"source": os.path.basename(path)})
    has_skip = AttnChoice.SKIP in arch.attn_choices
    if has_skip:
        warnings.warn(f"{path} has skip layers: reproducing the original fine-tune semantics x + LN1(x) (quirk Q4)",
                      stacklevel=4)
    if explicit:
        warnings.warn(Q9_WARNING.format(path=path), stacklevel=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = prune(base, arch, alpha=alpha, official_skip=has_skip)
    for i in explicit:
        s, j = where[i]
        blk = pruned.swin.layers[s].blocks[j]
        dim = sig.stage_dims[s]
        blk.attn = SwinExplicitConvAttention(blocks[i].attn, dim, sig.head_dim, sig.stage_grid(s))
    mapped = original_to_timm_keys(sd)
    mapped = fuse_msa_qkv(mapped, [w for w, b in zip(where, blocks) if b.attn == AttnChoice.MSA])
    for s, j in where:  # an original 3x3 layer of a qkv_bias=False model has no value bias; ours has a zero one
        p = f"layers.{s}.blocks.{j}.attn.v."
        if p + "weight" in mapped and p + "bias" not in mapped:
            mapped[p + "bias"] = mapped[p + "weight"].new_zeros(mapped[p + "weight"].shape[0])
        # an original MSA layer always keeps its value bias (only ``qk`` follows qkv_bias): on a base Swin built
        # without qkv biases, its fused qkv gets one (zero for q and k)
        attn = pruned.swin.layers[s].blocks[j].attn
        qkv = getattr(attn, "qkv", None)
        if isinstance(qkv, nn.Linear) and qkv.bias is None and f"layers.{s}.blocks.{j}.attn.qkv.bias" in mapped:
            biased = nn.Linear(qkv.in_features, qkv.out_features, bias=True, device=qkv.weight.device,
                               dtype=qkv.weight.dtype)
            with torch.no_grad():
                biased.weight.copy_(qkv.weight)
            attn.qkv = biased
    _strict(pruned, {f"swin.{k}": v for k, v in mapped.items()}, path,
            f"the SPViT Swin fine-tune model of {name} ({' '.join(arch.attn_choices)})")
    return pruned


def load_official(path: str, model: Union[str, nn.Module], alpha: Optional[float] = None, **create_kwargs):
    """:func:`spvit.load_official` (which handles both families); here for callers that import it from this module."""
    return _load_official(path, model, alpha=alpha, **create_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# FFN indicator files
# ----------------------------------------------------------------------------------------------------------------------
def read_ffn_indicators(path: str, model: Union[str, nn.Module], **create_kwargs) -> List[Tuple[int, ...]]:
    """Kept FFN units per block (stage by stage, block by block) from an original Swin FFN indicator file.

    The file (``SPViT_Swin/ffn_indicators/*.pth``, docs/method.md §4.8) holds ``{"model": {...}}`` with one 0/1
    vector ``layers.{s}.blocks.{j}.mlp.assigned_indicator_index`` per block; a search checkpoint holds the same
    vectors and is accepted too. Combine with the MSA choices of the configuration to get the architecture:
    ``Architecture(name, signature, [BlockArch(a, k) for a, k in zip(choices, kept)])``.

    Args:
        path: the file. model: the timm Swin it belongs to (name or instance).
    Returns:
        one sorted tuple of kept hidden-unit indices per block.
    Raises:
        FileNotFoundError; ValueError for a file that is not an indicator file of this model.
    """
    sd = _read_state_dict(path)
    if isinstance(model, str):
        create_kwargs.setdefault("device", "meta")  # only the shapes are needed
    base = _base_model(model, {}, **create_kwargs)
    if not is_swin(base):
        raise ValueError(f"read_ffn_indicators reads Swin indicator files; {type(base).__name__} is not a Swin")
    name = model if isinstance(model, str) else type(base).__name__
    ind = {k: v for k, v in sd.items() if k.endswith("mlp.assigned_indicator_index")}
    if not ind:
        raise ValueError(f"{path} holds no mlp.assigned_indicator_index vectors (not an SPViT FFN indicator file)")
    _check_model(ind, base, name, path)
    kept = []
    for s, stage in enumerate(base.layers):
        for j, blk in enumerate(stage.blocks):
            key = f"layers.{s}.blocks.{j}.mlp.assigned_indicator_index"
            hidden = blk.mlp.fc1.out_features
            v = ind.get(key)
            if v is None or v.shape != (hidden,):
                got = "missing" if v is None else f"shape {tuple(v.shape)}"
                raise ValueError(f"{path}: {key} is {got}; {name} needs ({hidden},)")
            kept.append(tuple(int(i) for i in torch.nonzero(v > 0.5).flatten().tolist()))
    return kept


__all__ = ["load_official", "original_to_timm_keys", "timm_to_original_keys", "fuse_msa_qkv", "stage_depths_of",
           "block_choice",
           "load_official_swin", "read_ffn_indicators", "is_swin", "looks_like_swin_checkpoint", "Q9_WARNING",
           "SwinExplicitConvAttention"]
