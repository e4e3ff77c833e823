"""Fine-tune-mode SPViT: the searched architecture as a plain model (docs/method.md §5).

Attention layers are timm ``Attention`` (MSA), :class:`ConvAttention` (3x3/1x1 rebuilt from the shared value /
output projections and ``head_probs`` at every forward, as the original), :class:`ExplicitConvAttention` (the
parameter-optimised ``bconv`` form of the original's post-training script) or :class:`SkipAttention`; FFNs are
timm ``Mlp`` compacted to the kept units.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional, Union

import torch
import torch.nn as nn

from spvit_kernels import reference as R

from ..arch import Architecture
from .convert import check_images, model_name_of, signature_of
from .supernet import GatedMlp, SearchAttention, Supernet, _bn_state


class ConvAttention(nn.Module):
    """A 3x3 or 1x1 conv layer sharing the MSA value/output projections (docs/method.md §1.2-1.6, §5.3).

    Parameters: ``v`` (C -> C), ``proj`` (C -> C), ``head_probs`` (h, 9), ``bn_3x3`` or ``bn_1x1``.
    forward(x_hat: (B, N, C)) -> (B, N, C), prefix (class) token passed through.
    """

    spvit_kind = "conv"

    def __init__(self, kind: str, dim: int, num_heads: int, grid, alpha: float = 1e-2, qkv_bias: bool = True,
                 num_prefix_tokens: int = 1):
        super().__init__()
        R.tap_columns(kind)  # validates
        self.kind, self.dim, self.num_heads, self.head_dim = kind, dim, num_heads, dim // num_heads
        self.grid, self.alpha, self.num_prefix_tokens = tuple(grid), alpha, num_prefix_tokens
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.head_probs = nn.Parameter(torch.ones(num_heads, 9))
        setattr(self, self.bn_name, nn.BatchNorm2d(self.head_dim))

    @property
    def bn_name(self) -> str:
        return "bn_3x3" if self.kind == "3x3" else "bn_1x1"

    @property
    def bn(self) -> nn.BatchNorm2d:
        return getattr(self, self.bn_name)

    def conv_params(self):
        """(taps (T, d, C), tap_bias (d,), out_map (C, d)) of the current weights."""
        m = R.head_mix(self.head_probs, self.alpha)
        return R.mixed_conv_params(self.v.weight, self.v.bias, self.proj.weight, m, self.num_heads, self.kind)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, **kwargs) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("SPViT conv layers do not support attention masks")
        taps, tap_bias, out_map = self.conv_params()
        return R.conv_attention(x, taps, tap_bias, out_map, self.proj.bias, _bn_state(self.bn), self.grid,
                                self.training, self.num_prefix_tokens)


class ExplicitConvAttention(nn.Module):
    """A conv layer stored as the compact conv it computes (the original's ``bconv``: conv C->d, BN, ReLU, 1x1 conv
    d->C; docs/method.md §6). forward(x_hat: (B, N, C)) -> (B, N, C)."""

    spvit_kind = "conv"

    def __init__(self, kind: str, dim: int, head_dim: int, grid, num_prefix_tokens: int = 1):
        super().__init__()
        k = 3 if kind == "3x3" else 1
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

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, **kwargs) -> torch.Tensor:
        taps, tap_bias, out_map = self.conv_params()
        return R.conv_attention(x, taps, tap_bias, out_map, self.bconv[3].bias, _bn_state(self.bn), self.grid,
                                self.training, self.num_prefix_tokens)


class SkipAttention(nn.Module):
    """A pruned attention layer. ``official=False`` (default): outputs 0, so the block's residual is the identity (the
    method, docs/method.md §1.4). ``official=True``: returns its input, i.e. the block adds LN1(x), as the original fine-tune
    code does (§5.4, quirk Q4) — used only for original checkpoints trained that way."""

    spvit_kind = "skip"

    def __init__(self, official: bool = False):
        super().__init__()
        self.official = official

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, **kwargs) -> torch.Tensor:
        return x if self.official else torch.zeros_like(x)


def _compact_mlp(mlp: nn.Module, keep) -> nn.Module:
    """timm Mlp with fc1 rows / fc2 columns restricted to ``keep`` (docs/method.md §5.2)."""
    from timm.layers import Mlp

    if isinstance(mlp, GatedMlp):
        dim, act_approx, drop = mlp.fc1.in_features, mlp.approximate, mlp.drop
    else:
        dim, drop = mlp.fc1.in_features, mlp.drop1.p
        from .convert import gelu_approximate
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


class PrunedModel(nn.Module):
    """A searched SPViT architecture as a trainable model (fine-tune phase).

    Attributes:
        vit: the timm VisionTransformer with replaced attention / FFN modules.
        architecture: the :class:`Architecture` it realises.
    forward(images: (B, in_chans, H, W)) -> logits (B, num_classes).
    """

    def __init__(self, vit: nn.Module, architecture: Architecture, alpha: float = 1e-2):
        super().__init__()
        self.vit = vit
        self.architecture = architecture
        self.signature = architecture.signature
        self.model_name = architecture.model_name
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.signature)
        return self.vit(x)


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
    """
    sig = signature_of(model)
    arch.check_compatible(sig, model_name_of(getattr(model, "vit", model)))
    is_sn = isinstance(model, Supernet)
    alpha = alpha if alpha is not None else (model.alpha if is_sn else 1e-2)
    carry = True if carry_weights is None else carry_weights
    src = model.vit if is_sn else model
    vit = copy.deepcopy(src)
    for blk, b in zip(vit.blocks, arch.blocks):
        if b.attn == "msa":
            blk.attn = _msa_from(blk.attn, sig)
        elif b.attn in ("3x3", "1x1"):
            blk.attn = _conv_from(blk.attn, b.attn, sig, alpha, carry and is_sn)
        else:
            blk.attn = SkipAttention(official=official_skip)
        blk.mlp = _compact_mlp(blk.mlp, b.ffn_keep)
    name = model.model_name if is_sn else model_name_of(model)
    pruned_arch = Architecture(name, sig, list(arch.blocks), meta=dict(arch.meta))
    if official_skip and "skip" in arch.attn_choices:
        warnings.warn("skip layers use the original fine-tune semantics x + LN1(x) (quirk Q4), not the identity",
                      stacklevel=2)
    return PrunedModel(vit, pruned_arch, alpha=alpha)
