"""Search-mode SPViT: every attention layer a single-path MSA/3x3/1x1/skip layer, every FFN unit gated."""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import spvit_kernels as K
from spvit_kernels.reference import BNState

from .. import gates as G
from ..arch import Architecture, BlockArch
from ..choices import AttnChoice
from ..families import family_of
from ..flops import dense_macs, min_macs, model_macs
from .convert import gelu_approximate, model_name_of, signature_of
from .timm_api import WrappedVitApi


def _bn_state(bn: nn.BatchNorm2d) -> BNState:
    return BNState(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum if bn.momentum is not None else 0.1,
                   bn.eps)


class GatedChoice:
    """The gates of a single-path search layer from its logits ``kernel_thresholds`` (theta1, theta3, theta_m)."""

    def gates(self) -> torch.Tensor:
        """Cumulative gates (e1, e3, em): sampled in training, thresholded in eval."""
        theta = self.kernel_thresholds
        s = G.sample_gate(theta) if self.training else G.eval_gate(theta)
        return G.cumulative(s)

    def decision(self) -> str:
        """The attention choice the eval-mode gates pick."""
        return G.choice_of(G.cumulative(G.eval_gate(self.kernel_thresholds)))


def split_qkv(m: nn.Module, attn: nn.Module) -> None:
    """Copy a timm attention's fused ``qkv`` and ``proj`` into a search layer's ``qk`` / ``v`` / ``proj``
    (docs/method.md §1.1); a ``v`` bias the timm layer lacks is zero."""
    dim = attn.qkv.in_features
    with torch.no_grad():
        m.qk.weight.copy_(attn.qkv.weight[: 2 * dim])
        m.v.weight.copy_(attn.qkv.weight[2 * dim:])
        if attn.qkv.bias is not None:
            m.qk.bias.copy_(attn.qkv.bias[: 2 * dim])
            m.v.bias.copy_(attn.qkv.bias[2 * dim:])
        elif m.v.bias is not None:
            m.v.bias.zero_()
        m.proj.weight.copy_(attn.proj.weight)
        m.proj.bias.copy_(attn.proj.bias)


class SearchAttention(GatedChoice, nn.Module):
    """Single-path attention layer (docs/method.md §1): MSA, 3x3 conv, 1x1 conv and skip from one parameter set.

    Parameters (official names): ``qk`` (C -> 2C), ``v`` (C -> C), ``proj`` (C -> C), ``head_probs`` (h, 9),
    ``bn_1x1``/``bn_3x3`` (BatchNorm over d), ``kernel_thresholds`` (3,) gate logits (1x1, 3x3, MSA).

    forward(x_hat: (B, N, C)) -> (B, N, C).
    """

    spvit_kind = "search"

    def __init__(self, dim: int, num_heads: int, grid, qkv_bias: bool = True, theta: float = 1.5,
                 alpha: float = 1e-2, num_prefix_tokens: int = 1, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.grid = tuple(grid)
        self.alpha = alpha
        self.num_prefix_tokens = num_prefix_tokens
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.head_probs = nn.Parameter(torch.ones(num_heads, 9))
        self.bn_1x1 = nn.BatchNorm2d(self.head_dim)
        self.bn_3x3 = nn.BatchNorm2d(self.head_dim)
        self.kernel_thresholds = nn.Parameter(torch.full((3,), float(theta)))
        self.last_gates: Optional[torch.Tensor] = None  # (e1, e3, em) of the last forward, for logging

    @classmethod
    def from_timm(cls, attn: nn.Module, grid, theta: float, alpha: float) -> "SearchAttention":
        dim = attn.qkv.in_features
        m = cls(dim, attn.num_heads, grid, qkv_bias=attn.qkv.bias is not None, theta=theta, alpha=alpha,
                proj_drop=attn.proj_drop.p)
        m.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
        split_qkv(m, attn)
        return m

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                **kwargs) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("SPViT attention layers do not support attention masks")
        e, host = take_gates(self, x.device)
        self.last_gates = e.detach()
        out = K.ops.gated_attn_conv(
            x, self.qk.weight, self.qk.bias, self.v.weight, self.v.bias, self.proj.weight, self.proj.bias,
            self.head_probs, _bn_state(self.bn_1x1), _bn_state(self.bn_3x3), e,
            num_heads=self.num_heads, alpha=self.alpha, grid=self.grid, training=self.training,
            num_prefix_tokens=self.num_prefix_tokens, gate_values=host,
        )
        if self.training:
            self.bn_1x1.num_batches_tracked += 1
            self.bn_3x3.num_batches_tracked += 1
        return self.proj_drop(out)



class GatedMlp(nn.Module):
    """FFN with one gate per hidden unit (docs/method.md §2.3): ``(GELU(x W1^T + b1) * m) W2^T + b2``.

    forward(x: (B, N, C)) -> (B, N, C).
    """

    spvit_kind = "search"

    def __init__(self, dim: int, hidden: int, bias: bool = True, theta: float = 1.5, approximate: str = "none",
                 drop: float = 0.0):
        super().__init__()
        self.full_hidden = hidden
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.approximate = approximate
        self.drop = drop
        self.ffn_thresholds = nn.Parameter(torch.full((hidden,), float(theta)))

    @classmethod
    def from_timm(cls, mlp: nn.Module, theta: float) -> "GatedMlp":
        drop = max(mlp.drop1.p, mlp.drop2.p) if hasattr(mlp, "drop1") else 0.0
        m = cls(mlp.fc1.in_features, mlp.fc1.out_features, bias=mlp.fc1.bias is not None, theta=theta,
                approximate=gelu_approximate(mlp.act), drop=drop)
        m.to(device=mlp.fc1.weight.device, dtype=mlp.fc1.weight.dtype)
        m.fc1.load_state_dict(mlp.fc1.state_dict())
        m.fc2.load_state_dict(mlp.fc2.state_dict())
        return m

    def mask(self) -> torch.Tensor:
        t = self.ffn_thresholds
        return G.sample_gate(t) if self.training else G.eval_gate(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending = getattr(self, "_pending", None)
        self._pending = None
        m = pending if pending is not None else self.mask()
        if self.training and self.drop > 0:  # dropout sits between mask and fc2: not in the fused op
            h = F.gelu(self.fc1(x), approximate=self.approximate) * m.to(x.dtype)
            return F.dropout(self.fc2(F.dropout(h, self.drop)), self.drop)
        return K.ops.masked_ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, m, self.approximate)

    def kept(self) -> torch.Tensor:
        return torch.nonzero(self.ffn_thresholds.detach() > 0).flatten()


def take_gates(attn: nn.Module, device: torch.device) -> Tuple[torch.Tensor, Optional[List[float]]]:
    """The gates (e1, e3, em) of a search attention layer for this forward, and their host copy when the fused
    kernel needs one (None otherwise).

    Inside :meth:`Supernet.sampled_gates` they were sampled for all layers together and are read to the host in
    one transfer; otherwise the layer samples its own (and the kernel reads them itself).
    """
    pending = getattr(attn, "_pending", None)
    attn._pending = None
    if pending is None:
        return attn.gates(), None
    e, batch, i = pending
    host = batch.values(i) if K.backend_of("gated_attn_conv", device) == "triton" else None
    return e, host


class Supernet(WrappedVitApi, nn.Module):
    """SPViT supernet over a timm VisionTransformer (search phase, docs/method.md §4).

    The timm model is copied and each block's ``attn`` / ``mlp`` replaced by :class:`SearchAttention` /
    :class:`GatedMlp` sharing the pre-trained weights; everything else keeps its timm state-dict key under
    ``vit.``. forward(images: (B, in_chans, H, W)) -> logits (B, num_classes).

    timm's model API (forward_features / forward_head / reset_classifier / no_weight_decay / group_matcher ...):
    :class:`spvit.models.timm_api.WrappedVitApi`; gate logits are kept out of weight decay.
    """

    default_alpha = 1e-2  # head-mixing temperature of the original DeiT code

    def __init__(self, model: nn.Module, theta: float = 1.5, alpha: Optional[float] = None,
                 model_name: Optional[str] = None):
        super().__init__()
        self.signature = signature_of(model)
        self.model_name = model_name or model_name_of(model)
        self.theta0 = float(theta)
        self.alpha = float(self.default_alpha if alpha is None else alpha)
        net = copy.deepcopy(model)
        for blk in self._blocks_of(net):
            blk.attn = self._search_attention(blk.attn, theta, self.alpha)
            blk.mlp = GatedMlp.from_timm(blk.mlp, theta)
        setattr(self, self.timm_attr, net)

    # -- the family's parts (overridden by the Swin supernet) ------------------------------------------------------
    def _blocks_of(self, net: nn.Module) -> List[nn.Module]:
        """The transformer blocks of the wrapped timm model, in block order."""
        return list(net.blocks)

    def _search_attention(self, attn: nn.Module, theta: float, alpha: float) -> nn.Module:
        """The single-path search layer replacing a block's timm attention (weights shared)."""
        return SearchAttention.from_timm(attn, self.signature.grid, theta, alpha)

    # -- modules -------------------------------------------------------------------------------------------------
    @property
    def attns(self) -> List[SearchAttention]:
        return [b.attn for b in self._blocks_of(self._timm())]

    @property
    def mlps(self) -> List[GatedMlp]:
        return [b.mlp for b in self._blocks_of(self._timm())]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        with self.sampled_gates():
            return self._timm()(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with self.sampled_gates():
            return super().forward_features(x)

    @contextlib.contextmanager
    def sampled_gates(self):
        """Sample the gates of every layer for one forward pass before it starts, so that the fused attention
        kernels get all their host-side gate values from one transfer (one host synchronisation per step on a GPU,
        whatever the depth) instead of one per layer.

        The samples are drawn block by block (attention gates, then FFN mask), the order and the calls in which
        the layers themselves draw them, so that without other random operations between them (drop path, dropout)
        they are the same numbers. Skipped under gradient checkpointing, whose recomputation redraws each block's
        samples from its saved random state.
        """
        attns, mlps = self.attns, self.mlps
        if any(getattr(m, "grad_checkpointing", False) for m in self._timm().modules()):
            yield
            return
        es = []
        for a, m in zip(attns, mlps):
            es.append(a.gates())
            m._pending = m.mask()
        batch = G.HostGates(es)
        for i, (a, e) in enumerate(zip(attns, es)):
            a._pending = (e, batch, i)
        try:
            yield
        finally:
            for a, m in zip(attns, mlps):
                a._pending = None
                m._pending = None

    def arch_parameters(self) -> List[nn.Parameter]:
        """The gate logits (every parameter whose name contains "thresholds", optimiser 2 of §4.3)."""
        return [p for n, p in self.named_parameters() if "thresholds" in n]

    def weight_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if "thresholds" not in n]

    # -- FLOPs ---------------------------------------------------------------------------------------------------
    def macs_tensor(self) -> torch.Tensor:
        """Differentiable MACs per image through the complexity indicators (§2.4, §3)."""
        e = [G.cumulative(G.complexity_indicator(a.kernel_thresholds)) for a in self.attns]
        k = [G.complexity_indicator(m.ffn_thresholds).sum() for m in self.mlps]
        return model_macs(self.signature, e, k)

    def gflops(self) -> float:
        """GFLOPs of the current eval-mode decisions."""
        return float(self.macs_tensor().detach()) / 1e9

    def dense_gflops(self) -> float:
        return dense_macs(self.signature) / 1e9

    def min_gflops(self) -> float:
        return min_macs(self.signature) / 1e9

    def check_target(self, target_gflops: float) -> None:
        lo, hi = self.min_gflops(), self.dense_gflops()
        if not (lo <= target_gflops <= hi):
            raise ValueError(f"FLOPs target {target_gflops:.4g} GFLOPs cannot be met by {self.model_name}: it must lie "
                             f"between {lo:.4g} (everything pruned) and {hi:.4g} (the dense model)")

    def flops_loss(self, target_gflops: float, loss_lambda: float) -> torch.Tensor:
        """The complexity loss of §3.2: ``lambda * (T - F / 1e9)^2`` (two-sided)."""
        self.check_target(target_gflops)
        return loss_lambda * (target_gflops - self.macs_tensor() / 1e9) ** 2

    # -- read-out ------------------------------------------------------------------------------------------------
    def architecture(self) -> Architecture:
        """The architecture the gates currently pick (θ > 0), §4.8."""
        blocks = [BlockArch(a.decision(), tuple(m.kept().tolist())) for a, m in zip(self.attns, self.mlps)]
        return Architecture(self.model_name, self.signature, blocks,
                            meta={"gflops": self.gflops(), "dense_gflops": self.dense_gflops()})

    @torch.no_grad()
    def fix_architecture(self, arch: Architecture, magnitude: Optional[float] = None) -> None:
        """Set every gate logit to ±magnitude so that the eval decisions equal ``arch``."""
        arch.check_compatible(self.signature, self.model_name)
        mag = abs(magnitude if magnitude is not None else self.theta0) or 1.0
        for a, m, b in zip(self.attns, self.mlps, arch.blocks):
            a.kernel_thresholds.copy_(G.logits_for_choice(b.attn, mag))
            t = torch.full_like(m.ffn_thresholds, -mag)
            t[list(b.ffn_keep)] = mag
            m.ffn_thresholds.copy_(t)

    def gate_summary(self) -> List[Dict]:
        """Per block: eval decision, sigmoid of the three gate logits, P(each choice), FFN units kept."""
        rows = []
        for i, (a, m) in enumerate(zip(self.attns, self.mlps)):
            p = torch.sigmoid(a.kernel_thresholds.detach().float()).tolist()
            probs = {AttnChoice.MSA.value: p[0] * p[1] * p[2], AttnChoice.CONV3.value: p[0] * p[1] * (1 - p[2]),
                     AttnChoice.CONV1.value: p[0] * (1 - p[1]), AttnChoice.SKIP.value: 1 - p[0]}
            rows.append({"block": i, "attn": a.decision(), "sigmoid": p, "p_choice": probs,
                         "ffn_kept": int(m.kept().numel()), "ffn_total": m.full_hidden,
                         "ffn_mean_p": float(torch.sigmoid(m.ffn_thresholds.detach().float()).mean())})
        return rows


MAX_THETA = 50.0  # |initial gate logit|: sigmoid(50) is 1 to double precision; beyond, the gates cannot learn


def check_theta_alpha(theta: float, alpha: Optional[float]) -> None:
    """Raise ValueError unless ``theta`` is a finite gate logit (``|theta| <= MAX_THETA``) and ``alpha`` (when
    given) a finite temperature > 0 (the head mixing divides by it)."""
    if not isinstance(theta, (int, float)) or not math.isfinite(theta) or abs(theta) > MAX_THETA:
        raise ValueError(f"theta (the initial gate logit) must be a finite number in [-{MAX_THETA:g}, {MAX_THETA:g}], "
                         f"got {theta!r}")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha (the head-mixing temperature) must be a finite number > 0, got {alpha!r}")


def supernet(model: nn.Module, theta: float = 1.5, alpha: Optional[float] = None,
             model_name: Optional[str] = None) -> Supernet:
    """Build an SPViT supernet from a timm ViT/DeiT or Swin Transformer (weights shared; gates, head_probs and BNs
    added).

    Args:
        model: a timm ``VisionTransformer`` with a class token (e.g. ``deit_small_patch16_224``), or a timm
            ``SwinTransformer`` (e.g. ``swin_tiny_patch4_window7_224``: a :class:`~spvit.models.swin.SwinSupernet`).
        theta: initial gate logit θ0 (1.5 in every official config).
        alpha: head-mixing temperature; default the family's (0.01 for DeiT, 100 for Swin, docs/method.md §1.2).
    """
    check_theta_alpha(theta, alpha)
    return family_of(model).supernet(model, theta=theta, alpha=alpha, model_name=model_name)
