"""Fine-tune-mode SPViT: the searched architecture as a plain model (docs/method.md §5).

Attention layers are timm ``Attention`` (MSA), :class:`ConvAttention` (3x3/1x1 rebuilt from the shared value /
output projections and ``head_probs`` at every forward, as the original), :class:`ExplicitConvAttention` (the
parameter-optimised ``bconv`` form of the original's post-training script) or :class:`SkipAttention`; FFNs are
timm ``Mlp`` compacted to the kept units.
"""
# No postponed annotations (``from __future__ import annotations``) here: torch.fx copies the root forward's
# annotations into the code it generates, and TorchScript cannot resolve them as strings (fx, then script).
import copy
import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from spvit_kernels import reference as R

from ..arch import Architecture
from ..choices import CONV_CHOICES, AttnChoice
from ..families import family_of
from . import timm_api as T
from .convert import SWIN_TO_DEIT, gelu_approximate, model_name_of, signature_of
from .supernet import GatedMlp, SearchAttention, Supernet, _bn_state


class _ConvLayer(nn.Module):
    """The forward shared by the pruned model's conv layers: the eager reference path
    (``spvit_kernels.reference.conv_attention`` on :meth:`conv_params`, the output bias :meth:`out_bias` and the BN)
    or, when scripted or traced, the subclass's conv2d form ``_forward_graph``."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        T.refuse_attn_mask(attn_mask, is_causal)
        if torch.jit.is_scripting():
            return self._forward_graph(x)
        if T.is_tracing():
            return self._forward_graph(x)
        taps, tap_bias, out_map = self.conv_params()
        return R.conv_attention(x, taps, tap_bias, out_map, self.out_bias(), _bn_state(self.bn), self.grid,
                                self.training, self.num_prefix_tokens)


class ConvAttention(_ConvLayer):
    """A 3x3 or 1x1 conv layer sharing the MSA value/output projections (docs/method.md §1.2-1.6, §5.3).

    Parameters: ``v`` (C -> C), ``proj`` (C -> C), ``head_probs`` (h, 9), ``bn_3x3`` or ``bn_1x1``.
    ``tap_order="swin"``: ``head_probs`` columns in Swin's centre-first order (§1.3); Swin layers use
    ``num_prefix_tokens=0`` and the stage grid.
    forward(x_hat: (B, N, C)) -> (B, N, C), prefix (class) token passed through.
    """

    spvit_kind = "conv"
    __jit_unused_properties__ = ["bn", "bn_name"]

    def __init__(self, kind: str, dim: int, num_heads: int, grid, alpha: float = 1e-2, qkv_bias: bool = True,
                 num_prefix_tokens: int = 1, tap_order: str = "deit"):
        super().__init__()
        R.tap_columns(kind)  # validates
        if tap_order not in ("deit", "swin"):
            raise ValueError(f"tap_order must be 'deit' or 'swin', got {tap_order!r}")
        self.kind, self.dim, self.num_heads, self.head_dim = kind, dim, num_heads, dim // num_heads
        self.grid, self.alpha, self.num_prefix_tokens = tuple(grid), alpha, num_prefix_tokens
        self.tap_order = tap_order  # column order of head_probs: DeiT's, or Swin's centre-first (docs/method.md §1.3)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.head_probs = nn.Parameter(torch.ones(num_heads, 9))
        setattr(self, self.bn_name, nn.BatchNorm2d(self.head_dim))

    @property
    def bn_name(self) -> str:
        return "bn_3x3" if self.kind == AttnChoice.CONV3 else "bn_1x1"

    @property
    def bn(self) -> nn.BatchNorm2d:
        return getattr(self, self.bn_name)

    def conv_params(self):
        """(taps (T, d, C), tap_bias (d,), out_map (C, d)) of the current weights."""
        hp = self.head_probs if self.tap_order == "deit" else self.head_probs[:, list(SWIN_TO_DEIT)]
        m = R.head_mix(hp, self.alpha)
        return R.mixed_conv_params(self.v.weight, self.v.bias, self.proj.weight, m, self.num_heads, self.kind)

    def out_bias(self) -> torch.Tensor:
        return self.proj.bias

    def _forward_graph(self, x: torch.Tensor) -> torch.Tensor:
        """The forward in TorchScript / torch.fx friendly form (spvit.models.timm_api.graph_conv_attention)."""
        hp = self.head_probs
        if self.tap_order == "swin":  # Swin's centre-first columns -> DeiT order (hp[:, SWIN_TO_DEIT], as conv_params)
            hp = torch.cat([hp[:, 1:5], hp[:, 0:1], hp[:, 5:9]], dim=1)
        m = torch.softmax(hp.float() / self.alpha, dim=0).to(hp.dtype)  # R.head_mix
        taps, tap_bias, out_map = T.mixed_conv_params_graph(self.v.weight, self.v.bias, self.proj.weight, m,
                                                            self.num_heads, self.head_dim, self.kind)
        if hasattr(self, "bn_3x3"):  # resolved when scripting
            bn = self.bn_3x3
        else:
            bn = self.bn_1x1
        momentum = bn.momentum
        return T.graph_conv_attention(x, T.taps_to_weight(taps, self.kind), tap_bias, out_map, self.proj.bias,
                                      bn.weight, bn.bias, bn.running_mean, bn.running_var, self.training,
                                      0.1 if momentum is None else momentum, bn.eps, self.grid,
                                      self.num_prefix_tokens, self.dim)


class ExplicitConvAttention(_ConvLayer):
    """A conv layer stored as the compact conv it computes (the original's ``bconv``: conv C->d, BN, ReLU, 1x1 conv
    d->C; docs/method.md §6). forward(x_hat: (B, N, C)) -> (B, N, C)."""

    spvit_kind = "conv"
    __jit_unused_properties__ = ["bn"]

    def __init__(self, kind: str, dim: int, head_dim: int, grid, num_prefix_tokens: int = 1):
        super().__init__()
        k = 3 if kind == AttnChoice.CONV3 else 1
        self.kind, self.dim, self.head_dim = kind, dim, head_dim
        self.grid, self.num_prefix_tokens = tuple(grid), num_prefix_tokens
        self.bconv = nn.Sequential(nn.Conv2d(dim, head_dim, k, padding=k // 2), nn.BatchNorm2d(head_dim), nn.ReLU(),
                                   nn.Conv2d(head_dim, dim, 1))

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self.bconv[1]

    def conv_params(self):
        c0, c3 = self.bconv[0], self.bconv[3]
        return R.conv_weight_to_taps(c0.weight), c0.bias, c3.weight[:, :, 0, 0]

    def out_bias(self) -> torch.Tensor:
        return self.bconv[3].bias

    def _forward_graph(self, x: torch.Tensor) -> torch.Tensor:
        """The forward in TorchScript / torch.fx friendly form (spvit.models.timm_api.graph_conv_attention)."""
        h, w = self.grid
        p = self.num_prefix_tokens
        img = x[:, p:].transpose(1, 2).reshape(-1, self.dim, h, w)
        out = self.bconv(img).flatten(2).transpose(1, 2)  # conv, BN, ReLU, 1x1 conv as modules
        return torch.cat([x[:, :p].to(out.dtype), out], dim=1)


class SkipAttention(nn.Module):
    """A pruned attention layer. ``official=False`` (default): outputs 0, so the block's residual is the identity (the
    method, docs/method.md §1.4). ``official=True``: returns its input, i.e. the block adds LN1(x), as the original
    fine-tune code does (§5.4, quirk Q4) — used only for original checkpoints trained that way."""

    spvit_kind = "skip"

    def __init__(self, official: bool = False):
        super().__init__()
        self.official = official

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        T.refuse_attn_mask(attn_mask, is_causal)
        return x if self.official else torch.zeros_like(x)


def _compact_mlp(mlp: nn.Module, keep) -> nn.Module:
    """timm Mlp with fc1 rows / fc2 columns restricted to ``keep`` (docs/method.md §5.2)."""
    from timm.layers import Mlp

    if isinstance(mlp, GatedMlp):
        dim, act_approx, drop = mlp.fc1.in_features, mlp.approximate, mlp.drop
    else:
        dim, drop = mlp.fc1.in_features, mlp.drop1.p
        act_approx = gelu_approximate(mlp.act)
    idx = torch.as_tensor(list(keep), dtype=torch.long, device=mlp.fc1.weight.device)
    bias = mlp.fc1.bias is not None
    new = Mlp(dim, hidden_features=max(len(idx), 1), act_layer=lambda: nn.GELU(approximate=act_approx), drop=drop,
              bias=bias)
    if len(idx) == 0:  # every unit pruned (timm reads hidden_features=0 as "same as input"): fc2 yields its bias
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
            new.fc1, new.fc2 = nn.Linear(dim, 0, bias=bias), nn.Linear(0, dim, bias=mlp.fc2.bias is not None)
    new.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
    with torch.no_grad():
        new.fc1.weight.copy_(mlp.fc1.weight[idx])
        if mlp.fc1.bias is not None:
            new.fc1.bias.copy_(mlp.fc1.bias[idx])
        new.fc2.weight.copy_(mlp.fc2.weight[:, idx])
        if mlp.fc2.bias is not None:
            new.fc2.bias.copy_(mlp.fc2.bias)
    new.full_hidden = getattr(mlp, "full_hidden", mlp.fc1.out_features)
    return new


def _msa_from(attn: nn.Module, sig) -> nn.Module:
    """timm Attention with the weights of a timm Attention or a SearchAttention (qkv = [qk; v])."""
    from timm.models.vision_transformer import Attention

    if not isinstance(attn, SearchAttention):
        return copy.deepcopy(attn)
    new = Attention(sig.embed_dim, num_heads=sig.num_heads, qkv_bias=attn.qk.bias is not None,
                    proj_drop=attn.proj_drop.p)
    new.to(device=attn.qk.weight.device, dtype=attn.qk.weight.dtype)
    with torch.no_grad():
        new.qkv.weight.copy_(torch.cat([attn.qk.weight, attn.v.weight]))
        if attn.qk.bias is not None:
            new.qkv.bias.copy_(torch.cat([attn.qk.bias, attn.v.bias]))
        new.proj.load_state_dict(attn.proj.state_dict())
    return new


def _conv_from(attn: nn.Module, kind: str, sig, alpha: float, carry: bool) -> ConvAttention:
    if isinstance(attn, SearchAttention):
        w_v, b_v = attn.v.weight, attn.v.bias
    else:
        dim = sig.embed_dim
        w_v = attn.qkv.weight[2 * dim:]
        b_v = attn.qkv.bias[2 * dim:] if attn.qkv.bias is not None else None
    new = ConvAttention(kind, sig.embed_dim, sig.num_heads, sig.grid, alpha=alpha, qkv_bias=b_v is not None)
    new.to(device=w_v.device, dtype=w_v.dtype)
    with torch.no_grad():
        new.v.weight.copy_(w_v)
        if b_v is not None:
            new.v.bias.copy_(b_v)
        new.proj.load_state_dict(attn.proj.state_dict())
        if carry and isinstance(attn, SearchAttention):
            new.head_probs.copy_(attn.head_probs)
            new.bn.load_state_dict(getattr(attn, new.bn_name).state_dict())
    return new


def _prefixed_cfg(cfg: Any, prefix: str) -> Dict[str, Any]:
    """A timm pretrained cfg (dict or PretrainedCfg) as a dict whose module names carry ``prefix``."""
    if cfg is None:
        return {}
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    for key in ("first_conv", "classifier"):
        names = d.get(key)
        if isinstance(names, str):
            d[key] = prefix + names
        elif isinstance(names, (tuple, list)):
            d[key] = type(names)(prefix + n for n in names)
    return d


def wrapped_pretrained_cfg(base: nn.Module, prefix: str, signature, first_conv: str, classifier: str) -> Dict[str, Any]:
    """The timm pretrained cfg of a model wrapping ``base`` under attribute ``prefix`` (module names prefixed, the
    signature's fixed input size and class count; ``first_conv`` / ``classifier`` when the base cfg has none)."""
    cfg = _prefixed_cfg(getattr(base, "pretrained_cfg", None), prefix)
    cfg.update(input_size=(signature.in_chans, *signature.img_size), fixed_input_size=True,
               num_classes=signature.num_classes)
    cfg.setdefault("first_conv", prefix + first_conv)
    cfg.setdefault("classifier", prefix + classifier)
    return cfg


class PrunedApi(T.WrappedVitApi):
    """What the pruned models of every family share: the record of the architecture, timm's pretrained cfg and the
    timm model API of :class:`~spvit.models.timm_api.WrappedVitApi` on the wrapped timm model (``timm_attr``).

    A family's pruned model is ``class X(PrunedApi, nn.Module)`` with its own ``forward`` / ``forward_features`` /
    ``forward_head`` (TorchScript needs the wrapped model by its attribute name) and ``prune_intermediate_layers``.
    """

    classifier_name = "head"  # the head's module name inside the timm model (timm's pretrained cfg "classifier")

    def __init__(self, net: nn.Module, architecture: Architecture, alpha: float):
        super().__init__()
        setattr(self, self.timm_attr, net)
        self.architecture = architecture
        self.signature = architecture.signature
        self.input_chw: Tuple[int, int, int] = (int(self.signature.in_chans), *map(int, self.signature.img_size))
        self.model_name = architecture.model_name
        self.alpha = alpha
        self.pretrained_cfg = wrapped_pretrained_cfg(net, self.timm_attr + ".", self.signature, "patch_embed.proj",
                                                     self.classifier_name)

    # -- timm attributes (num_classes / num_features / head_hidden_size / in_chans / feature_info: WrappedVitApi) ----
    @property
    def default_cfg(self) -> Dict[str, Any]:
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: Dict[str, Any]) -> None:
        self.pretrained_cfg = cfg

    @property
    def arch(self) -> Architecture:
        """The same as ``architecture``."""
        return self.architecture

    @property
    def global_pool(self) -> str:
        return self._timm().global_pool

    def _check_images(self, x: torch.Tensor) -> None:
        if torch.jit.is_scripting():
            T.check_images_scripted(x, self.input_chw[0], self.input_chw[1], self.input_chw[2])
        elif not T.is_tracing():  # fx: shapes are symbolic
            self._check_input(x)

    # -- head ------------------------------------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head for ``num_classes`` (0: none, forward returns pooled features; Swin with ``global_pool=''``:
        the unpooled map); the pruned trunk is kept.

        The architecture's signature follows the new class count, so checkpoints of the result rebuild it.
        """
        super().reset_classifier(num_classes, global_pool)
        self.architecture = Architecture(self.architecture.model_name, self.signature, list(self.architecture.blocks),
                                         meta=dict(self.architecture.meta))
        if isinstance(self.pretrained_cfg, dict) and "num_classes" in self.pretrained_cfg:
            self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)


class PrunedModel(PrunedApi, nn.Module):
    """A searched SPViT architecture as a trainable model (fine-tune phase), with timm's model API.

    The timm methods (``forward_features``, ``forward_head``, ``forward_intermediates``, ``reset_classifier``,
    ``get_classifier``, ``set_grad_checkpointing``, ``no_weight_decay``, ``group_matcher``) act on the wrapped
    VisionTransformer; names they return carry its ``vit.`` prefix, so they match ``named_parameters()`` and feed
    timm's optimizer factory (weight-decay groups, layer decay) unchanged. ``head_probs`` of conv layers is a weight
    (decayed, as in the original fine-tune; docs/method.md quirk Q22).

    Attributes:
        vit: the timm VisionTransformer with replaced attention / FFN modules.
        architecture: the :class:`Architecture` it realises.
        pretrained_cfg / default_cfg: timm's data and model config (the base model's, module names prefixed
            ``vit.``; a registered ``spvit_*`` model carries its own).
    forward(images: (B, in_chans, H, W)) -> logits (B, num_classes) (pooled features when num_classes is 0).

    TorchScript (``torch.jit.script``) and torch.fx symbolic tracing work: conv layers then run their graph-friendly
    form (spvit.models.timm_api), and the image-shape check is skipped while fx traces.
    """

    __jit_unused_properties__ = ["default_cfg", "arch", "num_classes", "num_features", "head_hidden_size",
                                 "in_chans", "global_pool", "feature_info"]

    def __init__(self, vit: nn.Module, architecture: Architecture, alpha: float = 1e-2):
        super().__init__(vit, architecture, alpha)

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> token features (B, N, C) after the final norm, before pooling and head."""
        self._check_images(x)
        return self.vit.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """token features (B, N, C) -> logits (B, num_classes), or the pooled features (B, C) with ``pre_logits``."""
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return self.vit(x)

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, **kwargs):
        """Block outputs (timm's ``forward_intermediates``): the last ``indices`` blocks if an int, those listed if a
        sequence, all if None; ``output_fmt`` NCHW (B, C, H, W) or NLC (B, H*W, C), prefix tokens split off.

        Returns:
            ``(final features, [intermediates])``, or the list alone with ``intermediates_only``.
        """
        self._check_images(x)
        return self.vit.forward_intermediates(x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                              stop_early=stop_early, output_fmt=output_fmt,
                                              intermediates_only=intermediates_only, **kwargs)

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / head if asked), as timm's ViT; used by
        ``features_only=True``. The architecture record follows (its last blocks and, without a head, its classes
        go), so what remains still deploys. Returns the kept block indices."""
        take = self.vit.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        depth = len(self.vit.blocks)
        sig = dataclasses.replace(self.signature, depth=depth, num_classes=int(self.vit.num_classes))
        self.architecture = Architecture(self.architecture.model_name, sig, list(self.architecture.blocks)[:depth],
                                         meta=dict(self.architecture.meta))
        self.signature = sig
        return take

    # get_classifier / reset_classifier: PrunedApi

    # -- training --------------------------------------------------------------------------------------------------
    # set_grad_checkpointing (as timm's ViT; in training mode a conv layer's BatchNorm then updates its running
    # statistics twice per step, forward and recomputation) / no_weight_decay (position embedding, class / register /
    # distillation tokens): WrappedVitApi

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer decay: the stem, one group per block, the final norm; head last."""
        return dict(stem=r"^vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
                    blocks=[(r"^vit\.blocks\.(\d+)", None), (r"^vit\.norm", (99999,))])


def prune(model: Union[nn.Module, Supernet], arch: Architecture, carry_weights: Optional[bool] = None,
          alpha: Optional[float] = None, official_skip: bool = False) -> PrunedModel:
    """Build the fine-tune model of ``arch``.

    Args:
        model: a timm ViT (dense weights: conv layers start from the dense v/proj with uniform head mixing and a fresh
            BN, the original's way, §5.1) or a :class:`Supernet` (carry its searched weights: learned head_probs and
            BN statistics too).
        arch: the architecture (must belong to a model of the same signature).
        carry_weights: for a Supernet, carry head_probs and BN (default True); ignored for a timm model.
        alpha: head-mixing temperature (default: the supernet's, or 0.01).
        official_skip: skip layers return LN1(x) (original fine-tune semantics, quirk Q4) instead of 0.

    A timm Swin Transformer (or a Swin supernet) gives a :class:`~spvit.models.swin.SwinPrunedModel`.

    Raises:
        TypeError: ``model`` is not a module or ``arch`` not an :class:`~spvit.arch.Architecture`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune: model must be a timm ViT / Swin or a supernet (an nn.Module), got "
                        f"{type(model).__name__}")
    if not isinstance(arch, Architecture):
        raise TypeError(f"prune: arch must be an spvit.Architecture (e.g. spvit.Architecture.load(path)), got "
                        f"{type(arch).__name__}")
    return family_of(model).prune(model, arch, carry_weights=carry_weights, alpha=alpha, official_skip=official_skip)


def prune_vit(model: Union[nn.Module, Supernet], arch: Architecture, carry_weights: Optional[bool] = None,
              alpha: Optional[float] = None, official_skip: bool = False) -> PrunedModel:
    """The fine-tune model of a ViT/DeiT architecture (see :func:`prune`; the ViT family's ``prune``)."""
    sig = signature_of(model)
    arch.check_compatible(sig, model_name_of(getattr(model, "vit", model)))
    is_sn = isinstance(model, Supernet)
    alpha = alpha if alpha is not None else (model.alpha if is_sn else 1e-2)
    carry = True if carry_weights is None else carry_weights
    src = model.vit if is_sn else model
    vit = copy.deepcopy(src)
    for blk, b in zip(vit.blocks, arch.blocks):
        if b.attn == AttnChoice.MSA:
            blk.attn = _msa_from(blk.attn, sig)
        elif b.attn in CONV_CHOICES:
            blk.attn = _conv_from(blk.attn, b.attn, sig, alpha, carry and is_sn)
        else:
            blk.attn = SkipAttention(official=official_skip)
        blk.mlp = _compact_mlp(blk.mlp, b.ffn_keep)
    name = model.model_name if is_sn else model_name_of(model)
    pruned_arch = Architecture(name, sig, list(arch.blocks), meta=dict(arch.meta))
    if official_skip and AttnChoice.SKIP in arch.attn_choices:
        warnings.warn("skip layers use the original fine-tune semantics x + LN1(x) (quirk Q4), not the identity",
                      stacklevel=3)
    return PrunedModel(vit, pruned_arch, alpha=alpha)
