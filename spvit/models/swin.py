"""SPViT for timm's Swin Transformer (docs/method.md §7): search mode and fine-tune (pruned) mode.

The Swin signature and its checks live in :mod:`spvit.models.convert` (:func:`swin_signature_of`); this module
registers the Swin builders with :func:`spvit.supernet` and :func:`spvit.prune`.

Search (:class:`SwinSupernet`): every block's ``attn`` becomes a :class:`SwinSearchAttention` that runs all
candidates per window (MSA with the relative position bias and, in shifted blocks, the shift mask; the 1x1 per token;
the 3x3 inside each window, zero-padded at the window border, on the rolled map) and every ``mlp`` a
:class:`~spvit.models.supernet.GatedMlp`; timm's block does the norm, roll, window partition and residuals as usual.

Fine-tune (:class:`SwinPrunedModel`): every block becomes a :class:`SwinPrunedBlock` whose ``attn`` is timm's
``WindowAttention`` (MSA through the shifted windows), a :class:`~spvit.models.pruned.ConvAttention` on the whole
stage map (the 3x3 zero-padded at the image border, as the original fine-tune code; docs/method.md §7.4, Q20) or a
:class:`~spvit.models.pruned.SkipAttention`; the FFN is compacted to the kept units.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Set

import torch
import torch.nn as nn

import spvit_kernels as K

from .. import gates as G
from ..arch import Architecture, SwinSignature
from ..flops import swin_macs
from .convert import SWIN_TO_DEIT, _pair, check_swin_images, is_swin, model_name_of, swin_signature_of
from .pruned import PRUNE_BUILDERS, ConvAttention, SkipAttention, _compact_mlp, _prefixed_cfg
from .supernet import SUPERNET_BUILDERS, GatedMlp, Supernet, _bn_state

SWIN_ALPHA = 100.0  # head-mixing temperature of every original Swin config (EXTRA.alpha, docs/method.md §7.3)


def _timm_swin():
    from timm.models import swin_transformer as S
    return S


def _stage_blocks(swin: nn.Module):
    """(stage index, block index in stage, block) of every block, block order."""
    for s, stage in enumerate(swin.layers):
        for j, blk in enumerate(stage.blocks):
            yield s, j, blk


# ----------------------------------------------------------------------------------------------------------------------
# Search mode
# ----------------------------------------------------------------------------------------------------------------------
class SwinSearchAttention(nn.Module):
    """Single-path window attention of a Swin block (docs/method.md §7.2): MSA, 3x3, 1x1 and skip per window.

    Parameters (the original's names): ``qk`` (C -> 2C), ``v`` (C -> C, with bias), ``proj`` (C -> C),
    ``relative_position_bias_table`` ((2w-1)^2, h) with the buffer ``relative_position_index`` (N, N),
    ``head_probs`` (h, 9) in the Swin tap order (column 0 = centre, docs/method.md §1.3), ``bn_1x1`` / ``bn_3x3``
    (BatchNorm over d), ``kernel_thresholds_full`` (3,) gate logits (1x1, 3x3, MSA).

    forward(x: (B*nW, N, C) windows of the normalised (and, in shifted blocks, rolled) map, mask: (nW, N, N) or
    None) -> (B*nW, N, C). Windows of one image are consecutive (timm's partition order).
    """

    spvit_kind = "search"

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True, theta: float = 1.5,
                 alpha: float = SWIN_ALPHA, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window = int(window)
        self.alpha = alpha
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=True)  # the original always gives v a bias
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        self.head_probs = nn.Parameter(torch.ones(num_heads, 9))
        self.bn_1x1 = nn.BatchNorm2d(self.head_dim)
        self.bn_3x3 = nn.BatchNorm2d(self.head_dim)
        self.kernel_thresholds_full = nn.Parameter(torch.full((3,), float(theta)))
        self.last_gates: Optional[torch.Tensor] = None

    @classmethod
    def from_timm(cls, attn: nn.Module, theta: float, alpha: float) -> "SwinSearchAttention":
        """From timm's WindowAttention (qkv split into qk / v, docs/method.md §1.1)."""
        dim = attn.qkv.in_features
        window = _pair(attn.window_size)[0]
        m = cls(dim, attn.num_heads, window, qkv_bias=attn.qkv.bias is not None, theta=theta, alpha=alpha,
                proj_drop=attn.proj_drop.p)
        m.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        with torch.no_grad():
            m.qk.weight.copy_(attn.qkv.weight[: 2 * dim])
            m.v.weight.copy_(attn.qkv.weight[2 * dim:])
            if attn.qkv.bias is not None:
                m.qk.bias.copy_(attn.qkv.bias[: 2 * dim])
                m.v.bias.copy_(attn.qkv.bias[2 * dim:])
            else:
                m.v.bias.zero_()
            m.proj.weight.copy_(attn.proj.weight)
            m.proj.bias.copy_(attn.proj.bias)
            m.relative_position_bias_table.copy_(attn.relative_position_bias_table)
        return m

    def rel_pos_bias(self) -> torch.Tensor:
        """(1, h, N, N) relative position bias of the window."""
        n = self.window * self.window
        b = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(n, n, -1)
        return b.permute(2, 0, 1).unsqueeze(0)

    def gates(self) -> torch.Tensor:
        theta = self.kernel_thresholds_full
        s = G.sample_gate(theta) if self.training else G.eval_gate(theta)
        return G.cumulative(s)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = self.window * self.window
        if x.dim() != 3 or x.shape[1] != n or x.shape[2] != self.dim:
            raise ValueError(f"expected windows (batch*windows, {n}, {self.dim}); got {tuple(x.shape)}")
        bias = self.rel_pos_bias()
        if mask is not None:
            bias = bias + mask.to(bias.dtype).unsqueeze(1)  # (nW, h, N, N): window b % nW of every image
        e = self.gates()
        self.last_gates = e.detach()
        out = K.ops.gated_attn_conv(
            x, self.qk.weight, self.qk.bias, self.v.weight, self.v.bias, self.proj.weight, self.proj.bias,
            self.head_probs[:, list(SWIN_TO_DEIT)], _bn_state(self.bn_1x1), _bn_state(self.bn_3x3), e,
            num_heads=self.num_heads, alpha=self.alpha, grid=(self.window, self.window), training=self.training,
            num_prefix_tokens=0, center=4, attn_bias=bias,
        )
        if self.training:
            self.bn_1x1.num_batches_tracked += 1
            self.bn_3x3.num_batches_tracked += 1
        return self.proj_drop(out)

    def decision(self) -> str:
        return G.choice_of(G.cumulative(G.eval_gate(self.kernel_thresholds_full)))

    @property
    def kernel_thresholds(self) -> nn.Parameter:
        """The gate logits under DeiT's name (shared code reads this)."""
        return self.kernel_thresholds_full


def _relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the ((2w-1)^2, h) table: (drow + w - 1) * (2w - 1) + (dcol + w - 1) (docs/method.md §7.1)."""
    r = torch.arange(window)
    rows = r.repeat_interleave(window)
    cols = r.repeat(window)
    dr = rows[:, None] - rows[None, :] + window - 1
    dc = cols[:, None] - cols[None, :] + window - 1
    return dr * (2 * window - 1) + dc


class SwinSupernet(Supernet):
    """SPViT supernet over a timm SwinTransformer (search phase, docs/method.md §7.2).

    ``swin``: a copy of the timm model whose blocks' ``attn`` / ``mlp`` are :class:`SwinSearchAttention` /
    :class:`GatedMlp`; every other module keeps its timm key under ``swin.``. The public API is that of
    :class:`~spvit.models.supernet.Supernet`. forward(images: (B, in_chans, H, W)) -> logits (B, num_classes).
    """

    def __init__(self, model: nn.Module, theta: float = 1.5, alpha: float = SWIN_ALPHA,
                 model_name: Optional[str] = None):
        nn.Module.__init__(self)
        self.signature: SwinSignature = swin_signature_of(model)
        self.model_name = model_name or model_name_of(model)
        self.theta0 = float(theta)
        self.alpha = float(alpha)
        swin = copy.deepcopy(model)
        for _, _, blk in _stage_blocks(swin):
            blk.attn = SwinSearchAttention.from_timm(blk.attn, theta, alpha)
            blk.mlp = GatedMlp.from_timm(blk.mlp, theta)
        self.swin = swin

    @property
    def attns(self) -> List[SwinSearchAttention]:
        return [blk.attn for _, _, blk in _stage_blocks(self.swin)]

    @property
    def mlps(self) -> List[GatedMlp]:
        return [blk.mlp for _, _, blk in _stage_blocks(self.swin)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_swin_images(x, self.signature)
        return self.swin(x)

    def macs_tensor(self) -> torch.Tensor:
        """Differentiable MACs per image through the complexity indicators (§2.4, §7.5)."""
        e = [G.cumulative(G.complexity_indicator(a.kernel_thresholds_full)) for a in self.attns]
        k = [G.complexity_indicator(m.ffn_thresholds).sum() for m in self.mlps]
        return swin_macs(self.signature, e, k)

    def gate_summary(self) -> List[Dict]:
        rows = super().gate_summary()
        for r, s in zip(rows, self.signature.block_stage):
            r["stage"] = s
        return rows


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tune (pruned) mode
# ----------------------------------------------------------------------------------------------------------------------
class SwinPrunedBlock(nn.Module):
    """A Swin block of a pruned model (docs/method.md §7.4); children named as timm's block.

    ``attn`` is timm's WindowAttention (MSA over the (shifted) windows with the relative position bias and mask),
    a :class:`ConvAttention` or a :class:`SkipAttention`. Conv and skip layers run on the whole stage map
    (B, H*W, C): the 3x3 is zero-padded at the image border (the original fine-tune semantics, not the window
    border of search mode: docs/method.md §11.2, Q20); the 1x1 and skip are per token, for which the window
    partition and roll are a mere permutation. forward(x: (B, H, W, C)) -> (B, H, W, C).
    """

    spvit_block = "swin"  # recognised by swin_signature_of (spvit/models/convert.py)

    def __init__(self, blk: nn.Module, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.dim = blk.dim
        self.input_resolution = tuple(blk.input_resolution)
        self.window_size = _pair(blk.window_size)
        self.shift_size = _pair(blk.shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.norm1 = blk.norm1
        self.attn = attn
        self.drop_path1 = blk.drop_path1
        self.norm2 = blk.norm2
        self.mlp = mlp
        self.drop_path2 = blk.drop_path2
        mask = getattr(blk, "attn_mask", None)
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)

    @property
    def kind(self) -> str:
        return getattr(self.attn, "kind", None) or ("skip" if isinstance(self.attn, SkipAttention) else "msa")

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        from timm.models.swin_transformer import window_partition, window_reverse

        b, h, w, c = x.shape
        sh, sw = self.shift_size
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        win = window_partition(x, self.window_size).reshape(-1, self.window_area, c)
        out = self.attn(win, mask=self.attn_mask).reshape(-1, *self.window_size, c)
        x = window_reverse(out, self.window_size, h, w)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if (h, w) != self.input_resolution:
            raise ValueError(f"block built for a {self.input_resolution} map, got {(h, w)}")
        y = self.norm1(x)
        if isinstance(self.attn, (ConvAttention, SkipAttention)):
            y = self.attn(y.reshape(b, h * w, c)).reshape(b, h, w, c)
        else:
            y = self._windowed(y)
        x = x + self.drop_path1(y)
        x = x.reshape(b, h * w, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


def _window_msa_from(attn: nn.Module, heads: int, window: int) -> nn.Module:
    """timm WindowAttention with the weights of a WindowAttention or a SwinSearchAttention (qkv = [qk; v])."""
    S = _timm_swin()
    if not isinstance(attn, SwinSearchAttention):
        return copy.deepcopy(attn)
    dim = attn.dim
    dev, dt = attn.qk.weight.device, attn.qk.weight.dtype
    new = S.WindowAttention(dim, num_heads=heads, window_size=window, qkv_bias=True, proj_drop=attn.proj_drop.p,
                            device=dev, dtype=dt)
    with torch.no_grad():
        new.qkv.weight.copy_(torch.cat([attn.qk.weight, attn.v.weight]))
        qk_b = attn.qk.bias if attn.qk.bias is not None else torch.zeros_like(attn.v.bias)
        new.qkv.bias.copy_(torch.cat([qk_b, attn.v.bias]))
        new.proj.load_state_dict(attn.proj.state_dict())
        new.relative_position_bias_table.copy_(attn.relative_position_bias_table)
    return new


def _swin_conv_from(attn: nn.Module, kind: str, dim: int, heads: int, grid, alpha: float,
                    carry: bool) -> ConvAttention:
    if isinstance(attn, SwinSearchAttention):
        w_v, b_v = attn.v.weight, attn.v.bias
    else:
        w_v = attn.qkv.weight[2 * dim:]
        b_v = attn.qkv.bias[2 * dim:] if attn.qkv.bias is not None else None
    new = ConvAttention(kind, dim, heads, grid, alpha=alpha, qkv_bias=True, num_prefix_tokens=0, tap_order="swin")
    new.to(device=w_v.device, dtype=w_v.dtype)
    with torch.no_grad():
        new.v.weight.copy_(w_v)
        if b_v is not None:
            new.v.bias.copy_(b_v)
        else:
            new.v.bias.zero_()
        new.proj.load_state_dict(attn.proj.state_dict())
        if carry and isinstance(attn, SwinSearchAttention):
            new.head_probs.copy_(attn.head_probs)  # both in the Swin tap order
            new.bn.load_state_dict(getattr(attn, new.bn_name).state_dict())
    return new


class SwinPrunedModel(nn.Module):
    """A searched SPViT architecture of a Swin Transformer as a trainable model (fine-tune phase, §7.4).

    Attributes:
        swin: the timm SwinTransformer whose blocks are :class:`SwinPrunedBlock`.
        architecture / signature / model_name / alpha; pretrained_cfg (timm's, module names prefixed ``swin.``).
    forward(images: (B, in_chans, H, W)) -> logits (B, num_classes).
    """

    def __init__(self, swin: nn.Module, architecture: Architecture, alpha: float = SWIN_ALPHA):
        super().__init__()
        self.swin = swin
        self.architecture = architecture
        self.signature: SwinSignature = architecture.signature
        self.model_name = architecture.model_name
        self.alpha = alpha
        cfg = _prefixed_cfg(getattr(swin, "pretrained_cfg", None), "swin.")
        cfg.update(input_size=(self.signature.in_chans, *self.signature.img_size), fixed_input_size=True,
                   num_classes=self.signature.num_classes)
        cfg.setdefault("first_conv", "swin.patch_embed.proj")
        cfg.setdefault("classifier", "swin.head.fc")
        self.pretrained_cfg = cfg

    @property
    def default_cfg(self) -> Dict[str, Any]:
        return self.pretrained_cfg

    @property
    def arch(self) -> Architecture:
        """The same as ``architecture``."""
        return self.architecture

    @property
    def num_classes(self) -> int:
        return int(self.swin.num_classes)

    @property
    def num_features(self) -> int:
        return int(self.swin.num_features)

    @property
    def blocks(self) -> List[SwinPrunedBlock]:
        return [blk for _, _, blk in _stage_blocks(self.swin)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images -> (B, H, W, C) features of the last stage after the final norm."""
        check_swin_images(x, self.signature)
        return self.swin.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.swin.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_swin_images(x, self.signature)
        return self.swin(x)

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, **kwargs):
        """Stage outputs (timm's Swin ``forward_intermediates``): ``(final features, [intermediates])``, or the list
        alone with ``intermediates_only``; NCHW (B, C, H, W) or NHWC."""
        check_swin_images(x, self.signature)
        return self.swin.forward_intermediates(x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                               intermediates_only=intermediates_only, **kwargs)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.swin.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh head for ``num_classes``; the signature follows the new class count."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        self.swin.reset_classifier(num_classes, global_pool)
        sig = dataclasses.replace(self.signature, num_classes=num_classes)
        self.architecture = Architecture(self.model_name, sig, list(self.architecture.blocks),
                                         meta=dict(self.architecture.meta))
        self.signature = sig
        if isinstance(self.pretrained_cfg, dict):
            self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.swin.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Relative position bias tables (and an absolute position embedding): no weight decay (§7.6)."""
        return {n for n, _ in self.named_parameters()
                if n.endswith(("relative_position_bias_table", "absolute_pos_embed"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^swin\.patch_embed",
                    blocks=r"^swin\.layers\.(\d+)" if coarse else [
                        (r"^swin\.layers\.(\d+)\.downsample", (0,)), (r"^swin\.layers\.(\d+)\.\w+\.(\d+)", None),
                        (r"^swin\.norm", (99999,))])


def supernet_swin(model: nn.Module, theta: float = 1.5, alpha: Optional[float] = None,
                  model_name: Optional[str] = None) -> SwinSupernet:
    return SwinSupernet(model, theta=theta, alpha=SWIN_ALPHA if alpha is None else alpha, model_name=model_name)


def prune_swin(model: nn.Module, arch: Architecture, carry_weights: Optional[bool] = None,
               alpha: Optional[float] = None, official_skip: bool = False) -> SwinPrunedModel:
    """The fine-tune model of a Swin architecture (see :func:`spvit.prune`)."""
    sig = swin_signature_of(model)
    arch.check_compatible(sig, model_name_of(getattr(model, "swin", model)))
    is_sn = isinstance(model, SwinSupernet)
    alpha = alpha if alpha is not None else (model.alpha if is_sn else SWIN_ALPHA)
    carry = True if carry_weights is None else carry_weights
    swin = copy.deepcopy(model.swin if is_sn else model)
    i = 0
    for s, stage in enumerate(swin.layers):
        dim, heads, grid = sig.stage_dims[s], sig.num_heads[s], sig.stage_grid(s)
        stage.spvit_num_heads = heads
        for j, blk in enumerate(list(stage.blocks)):
            b = arch.blocks[i]
            i += 1
            if b.attn == "msa":
                attn = _window_msa_from(blk.attn, heads, sig.stage_window(s))
            elif b.attn in ("3x3", "1x1"):
                attn = _swin_conv_from(blk.attn, b.attn, dim, heads, grid, alpha, carry and is_sn)
            else:
                attn = SkipAttention(official=official_skip)
            stage.blocks[j] = SwinPrunedBlock(blk, attn, _compact_mlp(blk.mlp, b.ffn_keep))
    name = model.model_name if is_sn else model_name_of(model)
    pruned_arch = Architecture(name, sig, list(arch.blocks), meta=dict(arch.meta))
    if official_skip and "skip" in arch.attn_choices:
        warnings.warn("skip layers use the original fine-tune semantics x + LN1(x) (docs/method.md Q4), not the "
                      "identity", stacklevel=2)
    return SwinPrunedModel(swin, pruned_arch, alpha=alpha)


# spvit.supernet / spvit.prune dispatch Swin models here
SUPERNET_BUILDERS.append((is_swin, supernet_swin))
PRUNE_BUILDERS.append((is_swin, prune_swin))

__all__ = ["SWIN_ALPHA", "SWIN_TO_DEIT", "SwinSearchAttention", "SwinSupernet", "SwinPrunedBlock", "SwinPrunedModel",
           "swin_signature_of", "check_swin_images", "is_swin", "supernet_swin", "prune_swin"]
