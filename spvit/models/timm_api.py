"""timm-ecosystem support shared by the SPViT model classes: TorchScript / torch.fx friendly forwards of the conv
layers, an input check that is skipped while tracing, ``features_only`` wrapping, and the parameter-group helpers
timm's optimizer factory reads (``no_weight_decay`` / ``group_matcher``).

The eager forward of a conv layer runs the reference ops of ``spvit_kernels.reference`` (the method's specification,
docs/method.md §1.4-1.6). Those use Python control flow on tensor shapes, which neither TorchScript nor symbolic
tracing (torch.fx) can follow, so while scripting or tracing the conv layers run :func:`graph_conv_attention`: the
same function written with ``conv2d`` / ``batch_norm`` and sizes taken from the module (not from tensor shapes).
tests/test_timm_api.py checks the two against each other (outputs and BatchNorm updates).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import Architecture
from .convert import check_images


def is_tracing() -> bool:
    """True while torch.fx symbolically traces (never called from TorchScript: callers test is_scripting first)."""
    import torch.fx._symbolic_trace as st

    fn = getattr(st, "is_fx_symbolic_tracing", None) or getattr(st, "is_fx_tracing_symbolic_tracing", None)
    if fn is None:  # older torch: only the combined flag
        fn = getattr(st, "is_fx_tracing", lambda: False)
    return bool(fn())


def check_images_scripted(x: torch.Tensor, in_chans: int, height: int, width: int) -> None:
    """TorchScript form of :func:`spvit.models.convert.check_images` (one clear error for a wrong image shape)."""
    if x.dim() != 4 or x.shape[1] != in_chans or x.shape[2] != height or x.shape[3] != width:
        raise ValueError("expected images of shape (batch, {}, {}, {}); got {}. SPViT's conv layers are built for a "
                         "fixed patch grid".format(in_chans, height, width, x.shape))


def refuse_attn_mask(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """Conv and skip layers have no attention to mask: refuse a mask instead of ignoring it (also for fx Proxies:
    only identity / bool tests on Python values are made)."""
    if attn_mask is not None or is_causal:
        raise ValueError("SPViT conv layers do not support attention masks")


def taps_to_weight(taps: torch.Tensor, kind: str) -> torch.Tensor:
    """Taps (T, d, C) in the reference's tap order (tap k reads offset (dy, dx), k = 3*(dx+1) + (dy+1)) -> conv2d
    weight (d, C, k, k)."""
    if kind == "3x3":
        return taps.reshape(3, 3, taps.shape[1], taps.shape[2]).permute(2, 3, 1, 0)  # (dx, dy, d, C) -> (d, C, dy, dx)
    return taps[0].unsqueeze(-1).unsqueeze(-1)


def mixed_conv_params_graph(w_v: torch.Tensor, b_v: Optional[torch.Tensor], w_o: torch.Tensor, m: torch.Tensor,
                            num_heads: int, head_dim: int,
                            kind: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``spvit_kernels.reference.mixed_conv_params`` with sizes given (no shape unpacking): taps (T, d, C),
    tap_bias (d,), out_map (C, d) of a conv layer with value / output projections ``w_v``, ``w_o`` and mixing m."""
    mm = m if kind == "3x3" else m[:, 4:5]  # all nine columns, or the centre tap's
    dim = num_heads * head_dim
    taps = torch.einsum("gt,gdc->tdc", mm, w_v.reshape(num_heads, head_dim, dim))
    if b_v is None:
        tap_bias = torch.zeros(head_dim, dtype=w_v.dtype, device=w_v.device)
    else:
        tap_bias = torch.einsum("gt,gd->d", mm, b_v.reshape(num_heads, head_dim))
    out_map = torch.einsum("gt,cgd->cd", mm, w_o.reshape(dim, num_heads, head_dim))
    return taps, tap_bias, out_map


def graph_conv_attention(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         out_map: torch.Tensor, b_o: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
                         bn_bias: Optional[torch.Tensor], bn_mean: Optional[torch.Tensor],
                         bn_var: Optional[torch.Tensor], training: bool, momentum: float, eps: float,
                         grid: Tuple[int, int], num_prefix_tokens: int, dim: int) -> torch.Tensor:
    """A conv layer's forward (``spvit_kernels.reference.conv_attention``) in conv2d form with sizes from the module.

    Args:
        x: (B, N, C) normalised tokens, prefix tokens first. weight: (d, C, k, k) conv, bias (d,) or None.
        out_map: (C, d), b_o: (C,) or None. bn_*: the BatchNorm over d (running statistics updated in training, as
            the reference's ``F.batch_norm``). grid: (H, W) patch grid; dim: C.
    Returns:
        (B, N, C): prefix tokens passed through, patch tokens ``ReLU(BN(conv(x))) @ out_map^T + b_o``.
    """
    h, w = grid
    img = x[:, num_prefix_tokens:].transpose(1, 2).reshape(-1, dim, h, w)
    y = F.conv2d(img, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), 1, weight.shape[-1] // 2)
    y = torch.relu(F.batch_norm(y, bn_mean, bn_var, bn_weight, bn_bias, training, momentum, eps))
    out = F.linear(y.flatten(2).transpose(1, 2), out_map.to(y.dtype), None if b_o is None else b_o.to(y.dtype))
    if num_prefix_tokens == 0:
        return out
    return torch.cat([x[:, :num_prefix_tokens].to(out.dtype), out], dim=1)


def features_only_model(model: nn.Module, kwargs: Dict[str, Any], name: str,
                        out_indices: Union[int, Tuple[int, ...]] = 3) -> nn.Module:
    """timm's ``features_only=True``: wrap the model in timm's FeatureGetterNet (block outputs of a ViT, stage
    outputs of a Swin, via ``forward_intermediates``, as timm does for its own ViTs). ``kwargs`` holds the
    ``out_indices`` (default ``out_indices``) / ``output_fmt`` / ``feature_cls`` / ``norm`` / ``prune`` creation
    arguments (popped)."""
    from timm.models._features import FeatureGetterNet  # timm >= 1.0 (its ViTs use it the same way)

    feature_cls = kwargs.pop("feature_cls", "getter")
    if feature_cls not in ("getter", None):
        raise ValueError(f"{name}: features_only supports feature_cls='getter' (block outputs through "
                         f"forward_intermediates); got feature_cls={feature_cls!r}")
    net = FeatureGetterNet(model, out_indices=kwargs.pop("out_indices", out_indices),
                           output_fmt=kwargs.pop("output_fmt", "NCHW"), norm=kwargs.pop("norm", False),
                           prune=kwargs.pop("prune", True))
    net.pretrained_cfg = net.default_cfg = model.pretrained_cfg  # as timm's builder does for its wrappers
    return net


FEATURE_KWARGS = ("out_indices", "output_fmt", "feature_cls", "norm", "prune", "feature_cfg", "output_stride")


def split_feature_kwargs(kwargs: Dict[str, Any], stride: int = 16) -> Dict[str, Any]:
    """Pop the features_only creation arguments out of model kwargs (an ``output_stride`` other than the model's
    ``stride`` is refused: fixed grid)."""
    out = {k: kwargs.pop(k) for k in FEATURE_KWARGS if k in kwargs}
    if out.pop("output_stride", None) not in (None, stride):
        raise ValueError(f"output_stride: SPViT models have a fixed stride (only output_stride={stride} is possible)")
    out.pop("feature_cfg", None)
    return out


def gate_logit_names(model: nn.Module) -> Set[str]:
    """Names of the gate logits among ``named_parameters`` (every name containing "thresholds"): kept out of weight
    decay, as the method's architecture optimiser does (docs/method.md §4.3)."""
    return {n for n, _ in model.named_parameters() if "thresholds" in n}


def prefixed(names: List[str], prefix: str) -> Set[str]:
    return {prefix + n for n in names}


# ----------------------------------------------------------------------------------------------------------------------
# timm's model API for models wrapping a timm VisionTransformer as ``self.vit`` (the supernet)
# ----------------------------------------------------------------------------------------------------------------------
def prefix_pattern(pattern: str, prefix: str) -> str:
    """A timm group-matcher regex (matched with ``re.match`` against parameter names) for the same parameters named
    ``prefix + name``: the prefix is required up front and the alternatives' own ``^`` anchors move after it."""
    import re

    body = re.sub(r"(^|\|)\^", r"\1", pattern)  # timm's matchers anchor alternatives only at their start
    return "^" + re.escape(prefix) + "(?:" + body + ")"


def prefix_group_matcher(matcher: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """A timm ``group_matcher()`` dict (regex strings, or lists of ``(regex, suffix)``) for a wrapped model whose
    parameter names carry ``prefix``."""
    out: Dict[str, Any] = {}
    for key, value in matcher.items():
        if isinstance(value, str):
            out[key] = prefix_pattern(value, prefix)
        else:
            out[key] = [(prefix_pattern(p, prefix), suffix) for p, suffix in value]
    return out


class WrappedVitApi:
    """timm's model API (``forward_features`` / ``forward_head`` / ``num_classes`` / ``reset_classifier`` /
    ``get_classifier`` / ``set_grad_checkpointing`` / ``no_weight_decay`` / ``group_matcher``) for an ``nn.Module``
    that wraps a timm model as the submodule named by ``timm_attr`` (default ``vit``) and keeps its
    :class:`~spvit.arch.ModelSignature` as ``self.signature``. The wrapped model's own methods do the work; names are
    given the ``<timm_attr>.`` prefix, as in ``named_parameters()``, and gate logits (names containing "thresholds")
    are kept out of weight decay, as the method's architecture optimiser (docs/method.md §4.3). Subclasses may
    override ``_check_input``."""

    __jit_unused_properties__ = ["num_classes", "num_features", "head_hidden_size", "in_chans", "feature_info"]
    timm_attr = "vit"

    def _timm(self) -> nn.Module:
        return getattr(self, self.timm_attr)

    @property
    def num_classes(self) -> int:
        return int(self._timm().num_classes)

    @property
    def num_features(self) -> int:
        return int(self._timm().num_features)

    @property
    def head_hidden_size(self) -> int:
        inner = self._timm()
        return int(getattr(inner, "head_hidden_size", inner.num_features))

    @property
    def in_chans(self) -> int:
        return int(self.signature.in_chans)

    @property
    def feature_info(self) -> List[Dict[str, Any]]:
        """timm's feature info of the wrapped model (blocks of a ViT, stages of a Swin; ``module`` names prefixed
        ``<timm_attr>.``)."""
        prefix = self.timm_attr + "."
        return [dict(f, module=prefix + f["module"]) for f in getattr(self._timm(), "feature_info", [])]

    def _check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.signature)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> the wrapped model's unpooled features (tokens (B, N, C) for a ViT)."""
        if not is_tracing():
            self._check_input(x)
        return self._timm().forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features -> logits (B, num_classes), or the pooled features (B, C) with ``pre_logits``."""
        return self._timm().forward_head(x, pre_logits=pre_logits)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self._timm().get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head for ``num_classes`` (0: none, forward returns pooled features); the signature follows."""
        import dataclasses

        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        self._timm().reset_classifier(num_classes, global_pool)
        self.signature = dataclasses.replace(self.signature, num_classes=num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self._timm().set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The wrapped model's (position embedding, tokens, ...), prefixed, and every gate logit."""
        inner = self._timm()
        own = list(inner.no_weight_decay()) if hasattr(inner, "no_weight_decay") else []
        return prefixed(own, self.timm_attr + ".") | gate_logit_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Layer-decay groups: the wrapped model's (stem, one group per block with its gates, final norm; head last),
        prefixed."""
        return prefix_group_matcher(self._timm().group_matcher(coarse=coarse), self.timm_attr + ".")


DATA_CFG_KEYS = ("mean", "std", "crop_pct", "crop_mode", "interpolation")


def data_cfg_of(model: nn.Module) -> Dict[str, Any]:
    """The data-pipeline entries of a model's timm pretrained cfg (plain lists / numbers / strings, for files)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in DATA_CFG_KEYS if cfg.get(k) is not None}


# ----------------------------------------------------------------------------------------------------------------------
# timm's inference-side API for the deployed model
# ----------------------------------------------------------------------------------------------------------------------
class DeployedApi:
    """``num_classes`` / ``num_features`` / ``head_hidden_size`` / ``get_classifier`` / ``reset_classifier`` /
    ``pretrained_cfg`` for :class:`spvit.deploy.DeployedModel` (``forward_features`` / ``forward_head`` are its own).
    It is inference-only (frozen, ``train(True)`` refused), so the optimizer hooks (``no_weight_decay``,
    ``group_matcher``, ``set_grad_checkpointing``) are deliberately absent."""

    global_pools: Tuple[str, ...] = ("token", "avg", "max", "avgmax", "")  # what reset_classifier accepts

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    @property
    def num_features(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def head_hidden_size(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def in_chans(self) -> int:
        return int(self.config["in_chans"])

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """timm's data / model config: the source model's data settings (kept by ``deploy``) with this model's
        input size, class count and module names."""
        cfg = dict(self.config.get("data_cfg") or {})
        cfg.update({k: tuple(v) for k, v in cfg.items() if isinstance(v, list)})
        cfg.update(architecture=self.model_name, input_size=(self.in_chans, *map(int, self.config["img_size"])),
                   fixed_input_size=True, num_classes=self.num_classes, first_conv="patch_embed.proj",
                   classifier="head")
        return cfg

    @property
    def default_cfg(self) -> Dict[str, Any]:
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh (frozen, zero-initialised) head for ``num_classes`` — 0 (no head: forward returns the pooled
        features) is the useful case for inference; load head weights into ``get_classifier()`` for a new one.
        ``global_pool`` ('token', 'avg', 'max', 'avgmax' or '') changes the pooling. The saved file follows."""
        import dataclasses

        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in self.global_pools:
                raise ValueError(f"global_pool must be one of {self.global_pools}, got {global_pool!r}")
            self.global_pool = global_pool
            self.config["global_pool"] = global_pool
        ref = self.patch_embed.proj.weight
        if num_classes > 0:
            head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            head.requires_grad_(False)
        else:
            head = nn.Identity()
        self.head = head.train(False)
        self.config["num_classes"] = num_classes
        sig = dataclasses.replace(self.signature, num_classes=num_classes)
        self.architecture = Architecture(self.architecture.model_name, sig, list(self.architecture.blocks),
                                         meta=dict(self.architecture.meta))
        self.signature = sig
