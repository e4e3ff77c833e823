"""Loading checkpoints saved by the original SPViT code (github ziplab/SPViT, DeiT part), docs/method.md §4.8, §5.7, §6.

Three layouts are recognised from the keys:

* search (supernet): ``blocks.{i}.attn.{qk,v,proj}``, ``head_probs``, ``bn_1x1``, ``bn_3x3``, ``kernel_thresholds``,
  ``blocks.{i}.mlp.ffn_thresholds`` (+ ``assigned_indicator_index`` buffers, ignored: the decisions come from the
  thresholds, quirk Q5);
* fine-tune: per block ``qk`` (MSA), ``bn_3x3`` / ``bn_1x1`` with ``v``, ``proj``, ``head_probs`` (conv) or nothing
  (skip), and compacted ``mlp.fc1``/``fc2``;
* parameter-optimised fine-tune (``post_training_optimize_checkpoint``): conv layers as ``bconv.{0,1,3}``.

Everything else (patch embedding, cls token, position embedding, norms, head) has timm's names. Checkpoints of the
original Swin code go through :mod:`spvit.models.official_swin` (:func:`load_official` dispatches on the model).
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..arch import Architecture, BlockArch
from ..choices import AttnChoice
from ..families import families, family_of
from .convert import model_name_of, signature_of
from .pruned import ExplicitConvAttention, prune
from .supernet import Supernet


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (or a {{'model': state_dict}} wrapper)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _base_model(model: Union[str, nn.Module], sd: Dict[str, torch.Tensor], **kwargs) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    import timm
    if "head.weight" in sd and "num_classes" not in kwargs:
        kwargs["num_classes"] = sd["head.weight"].shape[0]
    try:
        return timm.create_model(model, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise ValueError(f"cannot build timm model {model!r}: {exc}") from exc


def _load_strict(module: nn.Module, sd: Dict[str, torch.Tensor], path: str, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:5]))
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:5]))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:5]))
        raise ValueError(f"{path} does not match {what}: " + " | ".join(parts))
    module.load_state_dict(sd, strict=True)


def load_official(path: str, model: Union[str, nn.Module], alpha: Optional[float] = None, **create_kwargs):
    """Load an original SPViT (DeiT or Swin) checkpoint as our equivalent model, with identical outputs.

    Swin (``model`` a timm ``SwinTransformer``, e.g. ``"swin_tiny_patch4_window7_224"``) is handled by
    :mod:`spvit.models.official_swin`: the original's names and PatchMerging placement are mapped onto timm's; skip
    layers of fine-tune checkpoints keep the original x + LN1(x) (quirk Q4, with a warning). Parameter-optimised
    (``bconv``) Swin files are loaded as the convolutions they store, with a warning: those written by the original
    Swin ``post_training_optimize_checkpoint.py`` are wrong (quirk Q9: alpha 0.01, the DeiT centre column and tap
    order, every conv layer converted as a 1x1), so they do not reproduce the fine-tuned model; a correct file holds
    the taps mixed with alpha 100, the 1x1 from column 0 and the 3x3 in the Swin tap order (docs/method.md §6, §11).

    Args:
        path: the ``.pth`` file (a state dict or ``{"model": state_dict}``).
        model: the timm model name it was trained from (e.g. ``"deit_small_patch16_224"``) or a timm model instance
            to use as the skeleton (its weights are replaced).
        alpha: head-mixing temperature (default: 0.01 for DeiT, hard-coded in the original DeiT code; 100 for Swin,
            the original Swin configs' ``EXTRA.alpha``).
        create_kwargs: passed to ``timm.create_model``.
    Returns:
        :class:`Supernet` / ``SwinSupernet`` for a search checkpoint, :class:`PrunedModel` / ``SwinPrunedModel`` for
        a fine-tune one.
    Raises:
        ValueError: a checkpoint of another model (a DeiT file for a Swin or the reverse, another depth or width),
            naming the mismatch.
    """
    if not isinstance(model, (str, nn.Module)):
        raise TypeError(f"load_official: model must be a timm model name (e.g. 'deit_small_patch16_224') or a timm "
                        f"model instance, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_official: path must be a file path, got {type(path).__name__}")
    sd = _read_state_dict(path)
    base = _base_model(model, sd, **create_kwargs)
    name = model if isinstance(model, str) else model_name_of(base)
    family = family_of(base)
    for other in families():
        if other is not family and other.claims_checkpoint(sd):
            raise ValueError(f"{path} is an SPViT {other.display_name} checkpoint but {name} is not a "
                             f"{other.display_name} model; give the timm model it was trained from (e.g. "
                             f"{other.example_model})")
    return family.load_official(sd, base, name, path, alpha)


def load_official_vit(sd: Dict[str, torch.Tensor], base: nn.Module, name: str, path: str,
                      alpha: Optional[float] = None):
    """The body of :func:`load_official` for a ViT/DeiT model (the ViT family's ``load_official``; ``sd`` already
    read and unwrapped; alpha default 0.01, hard-coded in the original DeiT code)."""
    alpha = 1e-2 if alpha is None else alpha
    sig = signature_of(base)
    depth_in_ckpt = 1 + max((int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m), default=-1)
    if depth_in_ckpt != sig.depth:
        raise ValueError(f"{path} has {depth_in_ckpt} blocks but {name} has {sig.depth}: a checkpoint of another model")
    if any(k.endswith("kernel_thresholds") for k in sd):
        sn = Supernet(base, alpha=alpha, model_name=name)
        own = {k: v for k, v in sd.items() if not k.endswith("assigned_indicator_index")}
        _load_strict(sn, {f"vit.{k}": v for k, v in own.items()}, path, f"an SPViT supernet of {name}")
        return sn
    return _load_finetune(sd, base, sig, name, alpha, path)


def choice_from_keys(sd: Dict[str, torch.Tensor], prefix: str, where: str, ignore: Tuple[str, ...] = ()) -> str:
    """Attention choice of a block of an original fine-tune state dict from its attention keys (``prefix``: the
    block's ``attn.``): ``qk`` MSA, ``bn_3x3`` / ``bn_1x1`` a conv, ``bconv`` a stored conv (3x3 or 1x1 by its kernel),
    nothing a skip layer. Keys ending in ``ignore`` do not count.

    Raises:
        ValueError: other attention keys (``where`` names the block).
    """
    if prefix + "qk.weight" in sd:
        return AttnChoice.MSA.value
    if prefix + "bn_3x3.weight" in sd:
        return AttnChoice.CONV3.value
    if prefix + "bn_1x1.weight" in sd:
        return AttnChoice.CONV1.value
    if prefix + "bconv.0.weight" in sd:
        return (AttnChoice.CONV3 if sd[prefix + "bconv.0.weight"].shape[-1] == 3 else AttnChoice.CONV1).value
    own = [k for k in sd if k.startswith(prefix) and not (ignore and k.endswith(ignore))]
    if own:
        raise ValueError(f"{where}: unrecognised attention keys " + ", ".join(own)[:300])
    return AttnChoice.SKIP.value


def _block_choice(sd, i: int) -> str:
    return choice_from_keys(sd, f"blocks.{i}.attn.", f"block {i}")


def _load_finetune(sd, base, sig, name, alpha, path):
    blocks, explicit = [], []
    for i in range(sig.depth):
        choice = _block_choice(sd, i)
        key = f"blocks.{i}.mlp.fc1.weight"
        if key not in sd:
            raise ValueError(f"{path}: missing {key}; not an SPViT fine-tune checkpoint of {name}")
        width = sd[key].shape[0]
        if width > sig.mlp_hidden:
            raise ValueError(f"{path}: block {i} FFN width {width} exceeds {name}'s {sig.mlp_hidden}")
        # The original stores only the compacted weights, not which units they were: index them 0..width-1.
        blocks.append(BlockArch(choice, tuple(range(width))))
        explicit.append(f"blocks.{i}.attn.bconv.0.weight" in sd)
    arch = Architecture(name, sig, blocks, meta={"source": os.path.basename(path)})
    has_skip = AttnChoice.SKIP in arch.attn_choices
    if has_skip:
        warnings.warn(f"{path} has skip layers: reproducing the original fine-tune semantics x + LN1(x) (quirk Q4)",
                      stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = prune(base, arch, alpha=alpha, official_skip=has_skip)
    for i, is_explicit in enumerate(explicit):
        if is_explicit:
            pruned.vit.blocks[i].attn = ExplicitConvAttention(blocks[i].attn, sig.embed_dim, sig.head_dim, sig.grid)
    mapped = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.attn\.(qk|v)\.(weight|bias)$", k)
        if m and blocks[int(m.group(1))].attn == AttnChoice.MSA:
            continue  # fused below
        mapped[f"vit.{k}"] = v
    for i, b in enumerate(blocks):
        if b.attn == AttnChoice.MSA:
            for t in ("weight", "bias"):
                qk, v = sd.get(f"blocks.{i}.attn.qk.{t}"), sd.get(f"blocks.{i}.attn.v.{t}")
                if qk is not None and v is not None:
                    mapped[f"vit.blocks.{i}.attn.qkv.{t}"] = torch.cat([qk, v])
    _load_strict(pruned, mapped, path, f"the SPViT fine-tune model of {name} ({' '.join(arch.attn_choices)})")
    return pruned
