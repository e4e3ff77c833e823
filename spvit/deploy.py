"""Deployment: a fine-tuned SPViT model as the fastest exact inference model (docs/method.md §6, §10.4).

``deploy(pruned)`` returns a :class:`DeployedModel`, an eval-only copy of the pruned model in which

* kept MSA layers are one fused qkv GEMM + ``F.scaled_dot_product_attention`` + the output projection;
* 3x3 / 1x1 conv layers have head mixing and their BatchNorm folded into constant weights once
  (``reference.fold_bn``: K' = s*K, b' = s*(b - mu) + beta) and run ``spvit_kernels.deploy_conv`` (projection GEMM ->
  shift-sum + bias + ReLU -> output GEMM; the class token passes through);
* skip layers are gone (the block is its FFN only); original fine-tune checkpoints trained with the official skip
  semantics keep ``x + LN1(x)`` (quirk Q4);
* FFNs run ``spvit_kernels.ffn`` on the compacted weights; a width-0 FFN is just its output bias;
* LayerScale (DeiT-III) is folded into the output projections (kept as a scale after conv layers, whose class token
  passes through); dropout / drop path are gone.

The ops go through the :mod:`spvit_kernels` dispatcher, so the backend (Triton / extension / eager) is chosen per
call (``SPVIT_BACKEND``, ``spvit_kernels.use_backend``). Under ``torch.compile`` / ``torch.export`` the same
dispatcher is used (the choice is made at trace time): every kernel provider is a ``torch.library`` op, so traces see
the kernels; ``DeployedModel.kernels_when_tracing = False`` traces every op as the eager reference instead.

Files: :meth:`DeployedModel.save` writes a plain dict (format tag, format version, package version, architecture,
trunk description, state dict) that loads with ``torch.load(weights_only=True)``; :func:`load_deployed` rebuilds
the model from it without timm's model registry. The model's modules are in :mod:`spvit.deployed`.

    deployed = spvit.deploy(pruned)                  # or deploy(pruned, dtype=torch.bfloat16, device="cuda")
    deployed.save("spvit_deit_s.pt"); deployed = spvit.load_deployed("spvit_deit_s.pt")
    torch.export.export(deployed, (x,)); torch.compile(deployed)
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from spvit_kernels import reference as R

from ._version import __version__
from .arch import Architecture
from .checkpoints import model_from_checkpoint
from .choices import CONV_CHOICES, MSA, SKIP, SKIP_LN
from .deployed import (FORMAT, FORMAT_VERSION, CompactFFN, DeployedBlock, DeployedModel, FoldedConv, FusedAttention,
                       _norm_desc, _pad_default, pad_ffns)
from .families import family_of
from .models.convert import UnsupportedModelError, gelu_approximate
from .models.official import load_official
from .models.pruned import ConvAttention, ExplicitConvAttention, PrunedModel, SkipAttention
from .models.supernet import Supernet
from .models.timm_api import data_cfg_of
from .runs import load_torch_file




# ----------------------------------------------------------------------------------------------------------------------
# deploy(): PrunedModel -> DeployedModel
# ----------------------------------------------------------------------------------------------------------------------
def _f64(t: Optional[torch.Tensor], like: Optional[torch.Tensor] = None, n: Optional[int] = None) -> torch.Tensor:
    """``t`` as float64 (zeros of length ``n`` on ``like``'s device when ``t`` is None)."""
    if t is None:
        return torch.zeros(n, dtype=torch.float64, device=like.device)
    return t.detach().to(torch.float64)


def _layer_scale(blk: nn.Module, name: str) -> Optional[torch.Tensor]:
    ls = getattr(blk, name, None)
    if ls is None or isinstance(ls, nn.Identity):
        return None
    gamma = getattr(ls, "gamma", None)
    if gamma is None:
        raise UnsupportedModelError(f"{name} {type(ls).__name__} is not supported (LayerScale or identity only)")
    return _f64(gamma)


def _bn_of(attn: nn.Module, i: int) -> R.BNState:
    bn = attn.bn
    if not bn.track_running_stats or bn.running_mean is None:
        raise UnsupportedModelError(f"block {i}: BatchNorm without running statistics cannot be folded")
    d = bn.num_features
    like = bn.running_mean
    w = _f64(bn.weight) if bn.weight is not None else torch.ones(d, dtype=torch.float64, device=like.device)
    b = _f64(bn.bias, like, d)
    return R.BNState(w, b, _f64(bn.running_mean), _f64(bn.running_var), eps=float(bn.eps))


def _ln_eps(norm: nn.Module, where: str) -> float:
    desc = _norm_desc(norm, where)
    if desc is None or not desc["bias"]:
        raise UnsupportedModelError(f"{where}: expected an affine LayerNorm with bias, got {type(norm).__name__}")
    return desc["eps"]


def _block_config_and_state(i: int, blk: nn.Module, kind: str, sig) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """Deployed description and float64 state (keys relative to the block) of one pruned timm block."""
    dim = sig.embed_dim
    attn, mlp = blk.attn, blk.mlp
    sd: Dict[str, torch.Tensor] = {}
    ref = blk.norm2.weight
    g1, g2 = _layer_scale(blk, "ls1"), _layer_scale(blk, "ls2")
    kind, eps1, eps2 = _norm_state(i, blk, kind, sd, skip_eps=1e-6)
    if kind == MSA:
        if not hasattr(attn, "qkv") or not hasattr(attn, "proj"):
            raise UnsupportedModelError(f"block {i}: MSA layer {type(attn).__name__} has no qkv/proj")
        if abs(getattr(attn, "scale", attn.head_dim ** -0.5) - attn.head_dim ** -0.5) > 1e-12:
            raise UnsupportedModelError(f"block {i}: attention scale other than head_dim**-0.5")
        w_o, b_o = _f64(attn.proj.weight), _f64(attn.proj.bias, ref, dim)
        if g1 is not None:
            w_o, b_o = w_o * g1[:, None], b_o * g1
        sd.update({"attn.qkv.weight": _f64(attn.qkv.weight), "attn.qkv.bias": _f64(attn.qkv.bias, ref, 3 * dim),
                   "attn.proj.weight": w_o, "attn.proj.bias": b_o})
    elif kind in CONV_CHOICES:
        _folded_conv_state(i, attn, kind, ref, dim, sd)
        if g1 is not None:  # the class token passes the conv unscaled, so ls1 cannot go into w_out: keep it
            sd["ls1"] = g1
    elif kind == SKIP_LN:
        if g1 is not None:  # the residual is ls1(LN1(x)): fold gamma into LN1's affine parameters
            sd["norm1.weight"], sd["norm1.bias"] = sd["norm1.weight"] * g1, sd["norm1.bias"] * g1
    elif kind != SKIP:
        raise ValueError(f"block {i}: unknown attention choice {kind!r}")

    width = _ffn_state(blk, ref, dim, sd, g2)
    cfg = {"kind": kind, "ffn_width": width, "approximate": gelu_approximate(mlp.act), "eps1": eps1, "eps2": eps2,
           "ls1": "ls1" in sd}
    return cfg, sd


def _norm_state(i: int, blk: nn.Module, kind: str, sd: Dict[str, torch.Tensor],
                skip_eps: float) -> Tuple[str, float, float]:
    """(kind, eps1, eps2) of a block, its LN1 parameters put into ``sd`` unless the layer is a plain skip; a skip
    layer's kind becomes "skip_ln" when it has the original x + LN1(x) semantics (docs/method.md Q4)."""
    if isinstance(blk.attn, SkipAttention):
        kind = SKIP_LN if blk.attn.official else SKIP
    eps1 = _ln_eps(blk.norm1, f"block {i} norm1") if kind != SKIP else skip_eps
    eps2 = _ln_eps(blk.norm2, f"block {i} norm2")
    if kind != SKIP:
        sd["norm1.weight"], sd["norm1.bias"] = _f64(blk.norm1.weight), _f64(blk.norm1.bias)
    return kind, eps1, eps2


def _folded_conv_state(i: int, attn: nn.Module, kind: str, ref: torch.Tensor, dim: int,
                       sd: Dict[str, torch.Tensor]) -> None:
    """Head mixing and BN folded (float64, docs/method.md §10.4) into ``sd``: attn.w_planes / b_fold / w_out / b_out,
    with the planes in the kernels' (DeiT) tap order."""
    if not isinstance(attn, (ConvAttention, ExplicitConvAttention)):
        raise UnsupportedModelError(f"block {i}: architecture says {kind} but the layer is {type(attn).__name__}")
    if attn.kind != kind:
        raise ValueError(f"block {i}: architecture says {kind} but the layer is a {attn.kind} conv")
    taps, tap_bias, out_map = attn.conv_params()
    b_out = attn.bconv[3].bias if hasattr(attn, "bconv") else attn.proj.bias  # bconv: a stored compact conv
    w_planes, b_fold = R.fold_bn(_f64(taps), _f64(tap_bias, ref, taps.shape[1]), _bn_of(attn, i))
    sd.update({"attn.w_planes": w_planes, "attn.b_fold": b_fold, "attn.w_out": _f64(out_map),
               "attn.b_out": _f64(b_out, ref, dim)})


def _ffn_state(blk: nn.Module, ref: torch.Tensor, dim: int, sd: Dict[str, torch.Tensor],
               g2: Optional[torch.Tensor] = None) -> int:
    """The compact FFN (and LN2) of a block into ``sd``, layer scale ``g2`` folded; returns its width. A width-0 FFN
    leaves only its output bias (``ffn_bias``)."""
    mlp = blk.mlp
    width = int(mlp.fc1.out_features)
    b2 = _f64(mlp.fc2.bias, ref, dim)
    if width > 0:
        w2 = _f64(mlp.fc2.weight)
        if g2 is not None:
            w2, b2 = w2 * g2[:, None], b2 * g2
        sd.update({"norm2.weight": _f64(blk.norm2.weight), "norm2.bias": _f64(blk.norm2.bias),
                   "mlp.fc1.weight": _f64(mlp.fc1.weight), "mlp.fc1.bias": _f64(mlp.fc1.bias, ref, width),
                   "mlp.fc2.weight": w2, "mlp.fc2.bias": b2})
    else:
        sd["ffn_bias"] = b2 * g2 if g2 is not None else b2
    return width


def _trunk_config(vit: nn.Module, sig) -> Dict[str, Any]:
    if getattr(vit, "attn_pool", None) is not None:
        raise UnsupportedModelError("attention-pool heads (global_pool='map') are not supported by deploy")
    if getattr(vit, "reg_token", None) is not None:
        raise UnsupportedModelError("register tokens are not supported")
    pe = vit.patch_embed
    if not getattr(pe, "flatten", True) or getattr(pe, "dynamic_img_pad", False):
        raise UnsupportedModelError("only timm's flattening PatchEmbed without dynamic padding is supported")
    pool = vit.global_pool
    if pool not in ("token", "avg", "max", "avgmax", ""):
        raise UnsupportedModelError(f"global_pool={pool!r} is not supported by deploy")
    return {
        "img_size": list(sig.img_size), "patch_size": sig.patch_size, "in_chans": sig.in_chans,
        "grid": list(sig.grid), "embed_dim": sig.embed_dim, "num_heads": sig.num_heads,
        "num_classes": int(vit.num_classes), "patch_bias": pe.proj.bias is not None,
        "patch_norm": _norm_desc(pe.norm, "patch_embed.norm"),
        "pos_embed": vit.pos_embed is not None, "no_embed_class": bool(getattr(vit, "no_embed_class", False)),
        "norm_pre": _norm_desc(vit.norm_pre, "norm_pre"), "norm": _norm_desc(vit.norm, "norm"),
        "fc_norm": _norm_desc(vit.fc_norm, "fc_norm"), "global_pool": pool,
        "pool_include_prefix": bool(getattr(vit, "pool_include_prefix", False)),
    }


def deploy(model: nn.Module, dtype: Optional[torch.dtype] = None,
           device: Optional[Union[str, torch.device]] = None, pad_ffn: Optional[bool] = None) -> DeployedModel:
    """The inference model of a fine-tuned SPViT model (the input is not modified).

    Folding is done in float64 from the model's weights, then cast to ``dtype``; a model in training mode is read as
    in eval mode (BatchNorm running statistics, no dropout).

    Args:
        model: a :class:`PrunedModel` (from :func:`spvit.prune`, fine-tuning, or :func:`spvit.load_official` of a
            fine-tune checkpoint), or a ``SwinPrunedModel`` (deployed as a :class:`~spvit.deploy_swin.DeployedSwin`).
        dtype: parameter dtype of the result (default: the model's).
        device: device of the result (default: the model's).
        pad_ffn: run each pruned FFN at its kept width rounded up to a multiple of 64, with zero hidden units (exact;
            aligned GEMMs). Default: on for a CUDA result, off otherwise. Files always hold the kept width.
    Returns:
        a :class:`DeployedModel` equal to ``model.eval()`` up to rounding.
    Raises:
        TypeError: for a Supernet (still in search mode) or anything that is not a PrunedModel.
    """
    if isinstance(model, Supernet):
        raise TypeError("this model is a Supernet, still in search mode; read out the architecture "
                        "(arch = supernet.architecture()) and prune first (spvit.prune(model, arch)), then fine-tune "
                        "and deploy the PrunedModel")
    family = family_of(model)
    if not isinstance(model, family.pruned_class):
        raise TypeError(f"deploy expects a PrunedModel (spvit.prune / spvit.load_official); got "
                        f"{type(model).__name__}")
    return _pad_default(family.deploy(model, dtype=dtype, device=device), pad_ffn)


def deploy_vit(model: PrunedModel, dtype: Optional[torch.dtype] = None,
               device: Optional[Union[str, torch.device]] = None) -> DeployedModel:
    """The inference model of a fine-tuned ViT/DeiT (the ViT family's ``deploy``; see :func:`deploy`)."""
    vit, arch, sig = model.vit, model.architecture, model.signature
    dtype, device = deploy_target(model, dtype, device)
    config = _trunk_config(vit, sig)
    state: Dict[str, torch.Tensor] = {}
    blocks: List[Dict] = []
    with torch.no_grad():
        for i, (blk, b) in enumerate(zip(vit.blocks, arch.blocks)):
            cfg, sd = _block_config_and_state(i, blk, b.attn, sig)
            check_ffn_width(i, cfg, b)
            blocks.append(cfg)
            state.update({f"blocks.{i}.{k}": v for k, v in sd.items()})
        config["blocks"] = blocks
        for name in ("patch_embed", "norm_pre", "norm", "fc_norm", "head"):
            state.update({f"{name}.{k}": v.detach() for k, v in getattr(vit, name).state_dict().items()})
        state["cls_token"] = vit.cls_token.detach()
        if vit.pos_embed is not None:
            state["pos_embed"] = vit.pos_embed.detach()
        config["data_cfg"] = data_cfg_of(model)  # timm's data settings (resolve_data_config(model=deployed))
        return assemble(DeployedModel, config, arch, state, dtype, device)


def deploy_target(model: nn.Module, dtype: Optional[torch.dtype],
                  device: Optional[Union[str, torch.device]]) -> Tuple[torch.dtype, torch.device]:
    """(dtype, device) of a deployed model: those given, else the pruned model's.

    Raises:
        ValueError: a dtype that is not a floating point type.
    """
    src_param = next(model.parameters())
    dtype = dtype or src_param.dtype
    device = torch.device(device) if device is not None else src_param.device
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    return dtype, device


def check_ffn_width(i: int, cfg: Dict[str, Any], block) -> None:
    """The FFN width read from pruned block ``i`` must be the architecture's (``block``: its BlockArch)."""
    if cfg["ffn_width"] != block.ffn_width:
        raise ValueError(f"block {i}: FFN width {cfg['ffn_width']} differs from the architecture's "
                         f"{block.ffn_width}")


def assemble(cls: type, config: Dict[str, Any], arch: Architecture, state: Dict[str, torch.Tensor],
             dtype: torch.dtype, device: torch.device) -> DeployedModel:
    """The deployed model ``cls(config, arch)`` holding the float64 ``state``, rounded once to ``dtype``."""
    out = cls(config, Architecture.from_dict(arch.to_dict()))
    own = out.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:  # a programming error, not a user error
        raise RuntimeError(f"deploy: state mismatch; missing {missing[:5]}, unexpected {extra[:5]}")
    out.to(device=device, dtype=dtype)
    out.load_state_dict(state)  # copy_ rounds the float64 values once, to ``dtype``
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------
def save_deployed(model: DeployedModel, path: str) -> None:
    """``model.save(path)`` (function form)."""
    if not isinstance(model, DeployedModel):
        raise TypeError(f"save_deployed expects a DeployedModel, got {type(model).__name__}")
    model.save(path)


def load_deployed(path: str, device: Optional[Union[str, torch.device]] = None,
                  dtype: Optional[torch.dtype] = None, pad_ffn: Optional[bool] = None) -> DeployedModel:
    """Load a file written by :meth:`DeployedModel.save`.

    Args:
        path: the file.
        device: where to put the model (default CPU).
        dtype: cast to this dtype (default: the dtype it was saved in).
        pad_ffn: pad the FFN widths to multiples of 64 as :func:`deploy` does (default: on CUDA only).
    Raises:
        FileNotFoundError: no such file.
        ValueError: not a deployed SPViT model, a format version this package does not read, or missing / misshapen
            weights (the message names the problem).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"deployed model file not found: {path}")
    try:  # weights_only=True; corrupt, truncated or holding pickled objects: one ValueError
        obj = load_torch_file(path, "the file")
    except ValueError as exc:
        raise ValueError(f"cannot read {path} as a deployed SPViT model: {exc}") from None
    return _pad_default(from_file_dict(obj, path, device=device, dtype=dtype), pad_ffn)


def from_file_dict(obj: Any, path: str = "<dict>", device=None, dtype: Optional[torch.dtype] = None) -> DeployedModel:
    """Rebuild a :class:`DeployedModel` from :meth:`DeployedModel.to_file_dict` output."""

    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deployed SPViT model (no 'format': {FORMAT!r} tag); for a fine-tuned "
                         "checkpoint use spvit.deploy.deploy_checkpoint or `spvit deploy`")
    ver = obj.get("format_version")
    if ver != FORMAT_VERSION:
        raise ValueError(f"{path} has deployed-model format version {ver} (written by spvit "
                         f"{obj.get('spvit_version', '?')}); this spvit {__version__} reads version {FORMAT_VERSION}. "
                         "Deploy the fine-tuned checkpoint again with this version")
    for key in ("architecture", "config", "state_dict"):
        if key not in obj:
            raise ValueError(f"{path}: missing {key!r} (written by spvit {obj.get('spvit_version', '?')})")
    try:
        arch = Architecture.from_dict(obj["architecture"])
        if not isinstance(obj["config"], dict):
            raise TypeError(f"config is a {type(obj['config']).__name__}, not a dict")
        model = family_of(obj["config"]).deployed_class(obj["config"], arch)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: malformed model description ({type(exc).__name__}: {exc})") from exc
    sd = obj["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:5]))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:5]))
        if shapes:
            parts.append("shape mismatches: " + "; ".join(shapes[:5]))
        raise ValueError(f"{path}: weights do not match the described model: " + " | ".join(parts))
    saved = getattr(torch, str(obj.get("dtype", "float32")), torch.float32)
    model.to(dtype=saved)
    model.load_state_dict(sd)
    model.to(device=device or "cpu", dtype=dtype or saved)
    return model


def deploy_checkpoint(checkpoint: str, out: Optional[str] = None, model: Optional[Union[str, nn.Module]] = None,
                      dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
                      **create_kwargs) -> DeployedModel:
    """Deploy a fine-tuned checkpoint file (the body of ``spvit deploy``); save it to ``out`` when given.

    Accepted files:
      * ours: ``best.pth`` / ``checkpoint.pth`` of ``spvit finetune`` (``{"model": state_dict, "arch": {...},
        "model_name", "model_kwargs", "num_classes"}``); ``model_name`` overrides the recorded one;
      * an original SPViT (DeiT or Swin) fine-tune checkpoint (``{"model": state_dict}`` with ``qk`` / ``bn_*`` keys,
        or the parameter-optimised ``bconv`` form): needs ``model`` (the timm model name it was trained from, or a timm
        model instance used as the skeleton);
      * a file already written by :meth:`DeployedModel.save` (loaded, re-cast, re-saved).

    Args:
        checkpoint: the file. out: where to write the deployed model (optional).
        model: timm model name or instance (required for original checkpoints).
        dtype / device: of the deployed model.
        create_kwargs: extra ``timm.create_model`` arguments for original checkpoints.
    Raises:
        FileNotFoundError, ValueError (naming what is wrong with the file), TypeError (a search checkpoint).
    """
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    obj = load_torch_file(checkpoint, "checkpoint")  # weights_only=True; every failure is one ValueError
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        deployed = from_file_dict(obj, checkpoint, device=device, dtype=dtype)
    elif isinstance(obj, dict) and isinstance(obj.get("arch"), dict) and isinstance(obj.get("model"), dict):
        if model is not None and not isinstance(model, str):
            raise TypeError("for a checkpoint of spvit finetune, `model` is a timm model name (or None)")
        deployed = deploy(_pruned_from_ours(obj, checkpoint, model), dtype=dtype, device=device)
    else:
        if model is None:
            raise ValueError(f"{checkpoint} has no SPViT architecture record; if it is an original SPViT fine-tune "
                             "checkpoint, give the timm model it was trained from (model= / --model, e.g. "
                             "deit_small_patch16_224 or swin_tiny_patch4_window7_224)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = load_official(checkpoint, model, **create_kwargs)
        if not isinstance(pruned, family_of(pruned).pruned_class):
            raise TypeError(f"{checkpoint} is a search (supernet) checkpoint, still in search mode; read out the "
                            "architecture, prune and fine-tune it before deploying")
        deployed = deploy(pruned, dtype=dtype, device=device)
    if out:
        deployed.save(out)
    return deployed


def _pruned_from_ours(obj: Dict, path: str, model_name: Optional[str]) -> PrunedModel:
    return model_from_checkpoint(obj, path, model_name=model_name)


__all__ = ["DeployedModel", "DeployedBlock", "FusedAttention", "FoldedConv",
           "CompactFFN", "pad_ffns", "deploy", "load_deployed", "save_deployed", "deploy_checkpoint", "from_file_dict",
           "FORMAT", "FORMAT_VERSION"]
