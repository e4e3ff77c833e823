"""SPViT for timm's Swin Transformer (docs/method.md §7): search mode and fine-tune (pruned) mode.

The Swin signature and its checks live in :mod:`spvit.models.convert` (:func:`swin_signature_of`); the Swin family
(:mod:`spvit.families.swin`) hands :func:`spvit.supernet` and :func:`spvit.prune` to :func:`supernet_swin` and
:func:`prune_swin`.

Search (:class:`SwinSupernet`): every block's ``attn`` becomes a :class:`SwinSearchAttention` that runs all
candidates per window (MSA with the relative position bias and, in shifted blocks, the shift mask; the 1x1 per token;
the 3x3 inside each window, zero-padded at the window border, on the rolled map) and every ``mlp`` a
:class:`~spvit.models.supernet.GatedMlp`; timm's block does the norm, roll, window partition and residuals as usual.

Fine-tune (:class:`SwinPrunedModel`): every block becomes a :class:`SwinPrunedBlock` whose ``attn`` is timm's
``WindowAttention`` (MSA through the shifted windows), a :class:`~spvit.models.pruned.ConvAttention` on the whole
stage map (the 3x3 zero-padded at the image border, as the original fine-tune code; docs/method.md §7.4, Q20) or a
:class:`~spvit.models.pruned.SkipAttention`; the FFN is compacted to the kept units.
"""
# No postponed annotations (``from __future__ import annotations``) here: torch.fx copies the root forward's
# annotations into the code it generates, and TorchScript cannot resolve them as strings (fx, then script).
import copy
import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

import spvit_kernels as K

from ..arch import Architecture
from ..choices import CONV_CHOICES, AttnChoice
from .convert import SWIN_TO_DEIT, _pair, check_swin_images, is_swin, model_name_of, swin_signature_of
from . import timm_api as T
from .pruned import ConvAttention, PrunedApi, SkipAttention, _compact_mlp
from .supernet import GatedChoice, Supernet, _bn_state, split_qkv, take_gates

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
class SwinSearchAttention(GatedChoice, nn.Module):
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
        split_qkv(m, attn)
        with torch.no_grad():
            m.relative_position_bias_table.copy_(attn.relative_position_bias_table)
        return m

    def rel_pos_bias(self) -> torch.Tensor:
        """(1, h, N, N) relative position bias of the window."""
        n = self.window * self.window
        b = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(n, n, -1)
        return b.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = self.window * self.window
        if x.dim() != 3 or x.shape[1] != n or x.shape[2] != self.dim:
            raise ValueError(f"expected windows (batch*windows, {n}, {self.dim}); got {tuple(x.shape)}")
        bias = self.rel_pos_bias()
        if mask is not None:
            bias = bias + mask.to(bias.dtype).unsqueeze(1)  # (nW, h, N, N): window b % nW of every image
        e, host = take_gates(self, x.device)
        self.last_gates = e.detach()
        out = K.ops.gated_attn_conv(
            x, self.qk.weight, self.qk.bias, self.v.weight, self.v.bias, self.proj.weight, self.proj.bias,
            self.head_probs[:, list(SWIN_TO_DEIT)], _bn_state(self.bn_1x1), _bn_state(self.bn_3x3), e,
            num_heads=self.num_heads, alpha=self.alpha, grid=(self.window, self.window), training=self.training,
            num_prefix_tokens=0, center=4, attn_bias=bias, gate_values=host,
        )
        if self.training:
            self.bn_1x1.num_batches_tracked += 1
            self.bn_3x3.num_batches_tracked += 1
        return self.proj_drop(out)

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
    :class:`~spvit.models.supernet.Supernet`, timm's model API acting on ``swin`` (names prefixed ``swin.``).
    forward(images: (B, in_chans, H, W)) -> logits (B, num_classes).
    """

    timm_attr = "swin"  # WrappedVitApi: the timm model is ``self.swin``
    output_fmt = "NHWC"

    default_alpha = SWIN_ALPHA

    def _blocks_of(self, net: nn.Module) -> List[nn.Module]:
        return [blk for _, _, blk in _stage_blocks(net)]

    def _search_attention(self, attn: nn.Module, theta: float, alpha: float) -> nn.Module:
        return SwinSearchAttention.from_timm(attn, theta, alpha)

    def _check_input(self, x: torch.Tensor) -> None:
        check_swin_images(x, self.signature)

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
    __jit_unused_properties__ = ["kind"]

    def __init__(self, blk: nn.Module, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.dim = int(blk.dim)
        self.input_resolution = tuple(int(r) for r in blk.input_resolution)
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
        if getattr(self.attn, "kind", None):
            return self.attn.kind
        return (AttnChoice.SKIP if isinstance(self.attn, SkipAttention) else AttnChoice.MSA).value

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        """Window MSA of the normalised map x (B, H, W, C): roll, partition, attention, reverse, roll back. Sizes
        come from the module (not from tensor shapes), so TorchScript and torch.fx follow it."""
        h, w = self.input_resolution
        wh, ww = self.window_size
        sh, sw = self.shift_size
        c = self.dim
        shifted = sh > 0 or sw > 0
        if shifted:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        # timm's window partition order: windows row-major, those of one image consecutive
        win = x.reshape(-1, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)
        out = self.attn(win, mask=self.attn_mask)
        x = out.reshape(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)
        if shifted:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x

    def _check_map(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (*self.input_resolution, self.dim):
            raise ValueError(f"block built for (batch, {self.input_resolution[0]}, {self.input_resolution[1]}, "
                             f"{self.dim}) maps, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not T.is_tracing():  # fx: shapes are symbolic
                self._check_map(x)
        h, w = self.input_resolution
        c = self.dim
        y = self.norm1(x)
        if hasattr(self.attn, "relative_position_bias_table"):  # timm's WindowAttention (resolved when scripting)
            y = self._windowed(y)
        else:  # conv / skip layers: the whole stage map, per token or zero-padded at the image border
            y = self.attn(y.reshape(-1, h * w, c)).reshape(-1, h, w, c)
        x = x + self.drop_path1(y)
        x = x.reshape(-1, h * w, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(-1, h, w, c)


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


class SwinPrunedModel(PrunedApi, nn.Module):
    """A searched SPViT architecture of a Swin Transformer as a trainable model (fine-tune phase, §7.4), with timm's
    model API for a Swin.

    Attributes:
        swin: the timm SwinTransformer whose blocks are :class:`SwinPrunedBlock`.
        architecture / signature / model_name / alpha; pretrained_cfg / default_cfg (timm's, module names prefixed
            ``swin.``); feature_info (one entry per stage); output_fmt "NHWC" (the layout of ``forward_features``).
    forward(images: (B, in_chans, H, W)) -> logits (B, num_classes) (pooled features (B, C) when num_classes is 0).

    The timm methods act on the wrapped SwinTransformer as on timm's own Swin (shared code:
    :class:`spvit.models.timm_api.WrappedVitApi`, names prefixed ``swin.``): ``forward_features`` gives the
    normalised last-stage map (B, H/32, W/32, C), ``forward_intermediates`` the stage outputs (NCHW),
    ``reset_classifier`` replaces the head and keeps the pruned trunk, ``no_weight_decay`` lists the relative
    position bias tables. TorchScript and torch.fx symbolic tracing work: conv layers then run their graph-friendly
    form (spvit.models.timm_api), and the image check is skipped while fx traces.
    """

    __jit_unused_properties__ = ["default_cfg", "arch", "num_classes", "num_features", "head_hidden_size",
                                 "in_chans", "global_pool", "feature_info", "blocks"]
    timm_attr = "swin"
    classifier_name = "head.fc"
    output_fmt = "NHWC"

    def __init__(self, swin: nn.Module, architecture: Architecture, alpha: float = SWIN_ALPHA):
        super().__init__(swin, architecture, alpha)

    # timm attributes: PrunedApi and WrappedVitApi

    @property
    def blocks(self) -> List[SwinPrunedBlock]:
        return [blk for _, _, blk in _stage_blocks(self.swin)]

    # -- forward ---------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        check_swin_images(x, self.signature)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> the last stage's map (B, H/32, W/32, C) after the final norm (NHWC)."""
        self._check_images(x)
        return self.swin.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """features (B, H', W', C) -> logits (B, num_classes), or the pooled features (B, C) with ``pre_logits``."""
        return self.swin.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return self.swin(x)

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Stage outputs (timm's Swin ``forward_intermediates``): the last ``indices`` stages if an int, those listed
        if a sequence, all if None, as NCHW maps (B, C, H, W) (``norm``: the final norm on the last stage's).

        Returns:
            ``(final features (B, H', W', C), [intermediates])``, or the list alone with ``intermediates_only``.
        """
        self._check_images(x)
        return self.swin.forward_intermediates(x, indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                                               intermediates_only=intermediates_only)

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (and the final norm / head if asked), as timm's Swin; used
        by ``features_only=True``. The architecture record follows (its last stages' blocks and, without a head, its
        classes go). Returns the kept stage indices."""
        take = self.swin.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        n = len(self.swin.layers)
        sig = self.signature
        sig = dataclasses.replace(sig, depths=sig.depths[:n], num_heads=sig.num_heads[:n],
                                  mlp_hidden=sig.mlp_hidden[:n], num_classes=int(self.swin.num_classes))
        self.architecture = Architecture(self.model_name, sig, list(self.architecture.blocks)[:sig.depth],
                                         meta=dict(self.architecture.meta))
        self.signature = sig
        return take

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer decay (timm's Swin groups, prefixed): the stem, one group per block
        (a stage's PatchMerging with the stage's first), the final norm; head last."""
        return super().group_matcher(coarse=coarse)

    # get_classifier / set_grad_checkpointing / no_weight_decay (relative position bias tables): WrappedVitApi


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
            if b.attn == AttnChoice.MSA:
                attn = _window_msa_from(blk.attn, heads, sig.stage_window(s))
            elif b.attn in CONV_CHOICES:
                attn = _swin_conv_from(blk.attn, b.attn, dim, heads, grid, alpha, carry and is_sn)
            else:
                attn = SkipAttention(official=official_skip)
            stage.blocks[j] = SwinPrunedBlock(blk, attn, _compact_mlp(blk.mlp, b.ffn_keep))
    name = model.model_name if is_sn else model_name_of(model)
    pruned_arch = Architecture(name, sig, list(arch.blocks), meta=dict(arch.meta))
    if official_skip and AttnChoice.SKIP in arch.attn_choices:
        warnings.warn("skip layers use the original fine-tune semantics x + LN1(x) (docs/method.md Q4), not the "
                      "identity", stacklevel=3)
    return SwinPrunedModel(swin, pruned_arch, alpha=alpha)


__all__ = ["SWIN_ALPHA", "SWIN_TO_DEIT", "SwinSearchAttention", "SwinSupernet", "SwinPrunedBlock", "SwinPrunedModel",
           "swin_signature_of", "check_swin_images", "is_swin", "supernet_swin", "prune_swin"]
