"""Deployment of fine-tuned SPViT Swin models (docs/method.md §7.4, §10.4): :class:`DeployedSwin`.

``spvit.deploy(swin_pruned)`` returns a :class:`DeployedSwin`, an eval-only copy of a ``SwinPrunedModel`` in which

* kept (shifted-)window MSA layers are one fused qkv GEMM + ``F.scaled_dot_product_attention`` with the relative
  position bias gathered once into a constant additive bias (plus the shift mask of each window in shifted blocks,
  shape (windows, heads, N, N)), then the output projection;
* 3x3 / 1x1 conv layers have head mixing (Swin tap order, alpha 100) and BatchNorm folded into constant weights
  (``reference.fold_bn``) and run ``spvit_kernels.ops.deploy_conv`` over the FULL stage map (no windows, no shift,
  zero padding at the image border: the original fine-tune semantics, §7.4), without prefix tokens;
* skip layers are gone; original fine-tune checkpoints with skip layers keep ``x + LN1(x)`` (quirk Q4);
* FFNs run ``spvit_kernels.ops.pruned_ffn`` on the compacted weights (a width-0 FFN is its output bias);
* the patch embedding, PatchMerging, the norms and the head are timm's (global average pooling + linear head).

A :class:`DeployedSwin` is a :class:`~spvit.deploy.DeployedModel` (eval-only, ``kernels_when_tracing``, the same file
format written by ``save`` and read by :func:`spvit.load_deployed`, ``spvit.export_onnx``), with a Swin trunk.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


from .choices import CONV_CHOICES, DEPLOY_KINDS, MSA, SKIP, SKIP_LN
from .deploy import _f64, _ffn_state, _folded_conv_state, _norm_state, assemble, check_ffn_width, deploy_target
from .deployed import DeployedModel, FoldedConv, ResidualBlock, _layer_norm, _norm_desc, _norm_from, _OpChoice
from .models.convert import UnsupportedModelError, check_images, gelu_approximate
from .models.swin import SwinPrunedModel
from .models.timm_api import data_cfg_of


# ----------------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------------
class WindowFusedAttention(nn.Module):
    """Kept window MSA layer: fused qkv GEMM, SDPA with a constant additive bias, output projection.

    Buffer ``attn_bias`` (G, h, N, N): the relative position bias (G = 1), or bias + shift mask of window w at
    ``attn_bias[w]`` (G = windows per image) in shifted blocks. forward(windows: (B*G', N, C)) -> (B*G', N, C),
    windows of one image consecutive (timm's window_partition order).
    """

    def __init__(self, dim: int, num_heads: int, tokens: int, groups: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("attn_bias", torch.zeros(groups, num_heads, tokens, tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(bw, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B*G', h, N, d)
        g = self.attn_bias.shape[0]
        bias = self.attn_bias.to(q.dtype)
        if g == 1:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:  # (B*G, h) -> (B, G*h): the windows of one image are consecutive; 4-D SDPA (ONNX exporters need it)
            shape = (bw // g, g * self.num_heads, n, self.head_dim)
            o = F.scaled_dot_product_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                               attn_mask=bias.reshape(1, g * self.num_heads, n, n))
            o = o.reshape(bw, self.num_heads, n, self.head_dim)
        return F.linear(o.transpose(1, 2).reshape(bw, n, c), self.proj.weight, self.proj.bias)


class DeployedSwinBlock(ResidualBlock):
    """One Swin block of a deployed model on row-major tokens (B, H*W, C) of an (H, W) stage map.

    ``kind``: msa (window attention with ``window`` / ``shift``), 3x3 / 1x1 (:class:`~spvit.deploy.FoldedConv` over
    the full map), skip (no attention residual) or skip_ln (the block adds LN1(x), quirk Q4).
    forward(x: (B, H*W, C)) -> (B, H*W, C).
    """

    def __init__(self, kind: str, dim: int, num_heads: int, resolution, window, shift, ffn_width: int,
                 approximate: str, eps1: float, eps2: float, ops: _OpChoice):
        super().__init__()
        if kind not in DEPLOY_KINDS:
            raise ValueError(f"unknown deployed attention kind {kind!r}; expected one of {DEPLOY_KINDS}")
        self.kind, self.ffn_width = kind, int(ffn_width)
        self.resolution = tuple(int(r) for r in resolution)
        self.window, self.shift = tuple(int(w) for w in window), tuple(int(s) for s in shift)
        hh, ww = self.resolution
        if kind == MSA and (hh % self.window[0] or ww % self.window[1]):
            raise UnsupportedModelError(f"stage map {hh}x{ww} is not a multiple of the window {self.window}")
        if kind != SKIP:
            self.norm1 = _layer_norm(dim, eps1)
        if kind == MSA:
            n_win = (hh // self.window[0]) * (ww // self.window[1]) if any(self.shift) else 1
            self.attn = WindowFusedAttention(dim, num_heads, self.window[0] * self.window[1], n_win)
        elif kind in CONV_CHOICES:
            self.attn = FoldedConv(kind, dim, dim // num_heads, self.resolution, 0, ops)
        self._init_ffn(dim, approximate, eps2, ops)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        (hh, ww), (wh, wwin), (sh, sw) = self.resolution, self.window, self.shift
        x = x.reshape(b, hh, ww, c)
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        win = x.reshape(b, hh // wh, wh, ww // wwin, wwin, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * wwin, c)
        out = self.attn(win)
        out = out.reshape(b, hh // wh, ww // wwin, wh, wwin, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out.reshape(b, hh * ww, c)

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x + attention(LN1(x)) (x itself for a skip layer)."""
        if self.kind == SKIP:
            return x
        xn = self.norm1(x)
        if self.kind == SKIP_LN:
            return x + xn
        if self.kind == MSA:
            return x + self._window_attention(xn)
        return x + self.attn(xn)



class DeployedSwinStage(nn.Module):
    """PatchMerging (stages after the first; timm's module), then the blocks.

    forward(x: (B, H, W, C)) -> (B, H', W', C').
    """

    def __init__(self, downsample: Optional[Dict], blocks: List[DeployedSwinBlock]):
        super().__init__()
        if downsample is not None:
            from timm.models.swin_transformer import PatchMerging

            self.downsample = PatchMerging(downsample["dim"], downsample["out_dim"],
                                           norm_layer=lambda d, **kw: _norm_from(downsample["norm"]))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        for blk in self.blocks:
            x = blk(x)
        return x.reshape(b, h, w, c)


# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------
class DeployedSwin(DeployedModel):
    """An SPViT Swin model for inference only (BatchNorm folded, FFNs compact, fused kernels, skip layers removed).

    Built by :func:`deploy_swin` (``spvit.deploy``) or :func:`spvit.load_deployed`. Eval-only, parameters frozen, the
    file format, ``kernels_when_tracing`` and ``save`` of :class:`~spvit.deploy.DeployedModel`.
    forward(images: (B, in_chans, H, W)) -> logits (B, num_classes). Images are cast to the model's dtype.
    """

    global_pools = ("avg",)  # reset_classifier: the deployed Swin head pools by the mean
    output_fmt = "NHWC"  # forward_features: (B, H', W', C')

    def _build_trunk(self, c: Dict[str, Any]) -> None:
        """Patch embedding, stages (PatchMerging + blocks), final norm and head from the trunk description."""
        from timm.layers import PatchEmbed

        pe_norm = c.get("patch_norm")
        self.patch_embed = PatchEmbed(
            img_size=tuple(c["img_size"]), patch_size=c["patch_size"], in_chans=c["in_chans"],
            embed_dim=c["stage_dims"][0], bias=c["patch_bias"], flatten=False, output_fmt="NHWC",
            norm_layer=(lambda d, **kw: _norm_from(pe_norm)) if pe_norm is not None else None)
        stages, i = [], 0
        for s, depth in enumerate(c["depths"]):
            dim = c["stage_dims"][s]
            blocks = []
            for _ in range(depth):
                b = c["blocks"][i]
                blocks.append(DeployedSwinBlock(b["kind"], dim, c["num_heads"][s], c["resolutions"][s], b["window"],
                                                b["shift"], b["ffn_width"], b["approximate"], b["eps1"], b["eps2"],
                                                self._ops))
                i += 1
            stages.append(DeployedSwinStage(c["downsample"][s], blocks))
        self.layers = nn.ModuleList(stages)
        self.norm = _norm_from(c["norm"])
        self.head = nn.Linear(c["stage_dims"][-1], c["num_classes"]) if c["num_classes"] > 0 else nn.Identity()

    @property
    def num_features(self) -> int:
        return int(self.config["stage_dims"][-1])

    @property
    def head_hidden_size(self) -> int:
        return int(self.config["stage_dims"][-1])

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        """timm's data / model config (see DeployedModel), with the final map's size as ``pool_size``."""
        cfg = super().pretrained_cfg
        stride = int(self.config["patch_size"]) * 2 ** (len(self.config["depths"]) - 1)
        cfg["pool_size"] = tuple(int(s) // stride for s in self.config["img_size"])
        return cfg

    @property
    def blocks(self) -> List[DeployedSwinBlock]:
        """All blocks, stage by stage (the architecture's block order)."""
        return [blk for stage in self.layers for blk in stage.blocks]

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> the stage-1 map (B, H/p, W/p, C)."""
        check_images(x, self.signature)
        return self.patch_embed(x.to(self.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images -> the final normalised map (B, H', W', C')."""
        x = self.embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def extra_repr(self) -> str:
        return f"{self.model_name}: " + " | ".join(
            " ".join(blk.kind for blk in stage.blocks) for stage in self.layers)


# ----------------------------------------------------------------------------------------------------------------------
# deploy_swin(): SwinPrunedModel -> DeployedSwin
# ----------------------------------------------------------------------------------------------------------------------
def _rel_pos_bias(attn: nn.Module, tokens: int) -> torch.Tensor:
    """(h, N, N) float64 relative position bias of a timm WindowAttention."""
    table = _f64(attn.relative_position_bias_table)
    idx = attn.relative_position_index.reshape(-1)
    return table[idx].reshape(tokens, tokens, -1).permute(2, 0, 1).contiguous()


def _swin_block(i: int, blk: nn.Module, kind: str, dim: int) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """Deployed description and float64 state (keys relative to the block) of one pruned Swin block."""
    attn, mlp = blk.attn, blk.mlp
    sd: Dict[str, torch.Tensor] = {}
    ref = blk.norm2.weight
    window = tuple(int(w) for w in blk.window_size)
    shift = tuple(int(s) for s in blk.shift_size)
    kind, eps1, eps2 = _norm_state(i, blk, kind, sd, skip_eps=1e-5)
    if kind == MSA:
        if not hasattr(attn, "qkv") or not hasattr(attn, "relative_position_bias_table"):
            raise UnsupportedModelError(f"block {i}: MSA layer {type(attn).__name__} is not timm's WindowAttention")
        head_dim = dim // attn.num_heads
        if abs(float(attn.scale) - head_dim ** -0.5) > 1e-12:
            raise UnsupportedModelError(f"block {i}: attention scale other than head_dim**-0.5")
        n = window[0] * window[1]
        bias = _rel_pos_bias(attn, n)[None]  # (1, h, N, N)
        if any(shift):
            mask = getattr(blk, "attn_mask", None)
            if mask is None:
                raise UnsupportedModelError(f"block {i}: shifted block without a precomputed attn_mask")
            bias = bias + _f64(mask)[:, None]  # (windows, h, N, N)
        sd.update({"attn.qkv.weight": _f64(attn.qkv.weight), "attn.qkv.bias": _f64(attn.qkv.bias, ref, 3 * dim),
                   "attn.proj.weight": _f64(attn.proj.weight), "attn.proj.bias": _f64(attn.proj.bias, ref, dim),
                   "attn.attn_bias": bias})
    elif kind in CONV_CHOICES:
        _folded_conv_state(i, attn, kind, ref, dim, sd)
    elif kind not in (SKIP, SKIP_LN):
        raise ValueError(f"block {i}: unknown attention choice {kind!r}")
    width = _ffn_state(blk, ref, dim, sd)
    cfg = {"kind": kind, "ffn_width": width, "approximate": gelu_approximate(mlp.act), "eps1": eps1, "eps2": eps2,
           "window": list(window), "shift": list(shift)}
    return cfg, sd


def _swin_trunk_config(swin: nn.Module, sig) -> Dict[str, Any]:
    pe = swin.patch_embed
    head = swin.head
    pool = getattr(head, "pool_type", getattr(swin, "global_pool", "avg"))
    if pool != "avg":
        raise UnsupportedModelError(f"global_pool={pool!r} is not supported by deploy (Swin: 'avg' only)")
    if not isinstance(getattr(head, "fc", nn.Identity()), (nn.Linear, nn.Identity)):
        raise UnsupportedModelError("only a linear classifier head is supported")
    downsample = []
    for s, stage in enumerate(swin.layers):
        ds = stage.downsample
        if isinstance(ds, nn.Identity):
            downsample.append(None)
        else:
            downsample.append({"dim": int(ds.dim), "out_dim": int(ds.out_dim),
                               "norm": _norm_desc(ds.norm, f"layers.{s}.downsample.norm")})
    stage_dims = [int(stage.blocks[0].norm1.normalized_shape[0]) for stage in swin.layers]
    return {
        "family": "swin", "img_size": list(sig.img_size), "patch_size": sig.patch_size, "in_chans": sig.in_chans,
        "stage_dims": stage_dims, "depths": [len(stage.blocks) for stage in swin.layers],
        "num_heads": [int(h) for h in sig.num_heads],
        "resolutions": [list(stage.blocks[0].input_resolution) for stage in swin.layers],
        "num_classes": int(swin.num_classes), "patch_bias": pe.proj.bias is not None,
        "patch_norm": _norm_desc(pe.norm, "patch_embed.norm"), "downsample": downsample,
        "norm": _norm_desc(swin.norm, "norm"),
    }


def deploy_swin(model: SwinPrunedModel, dtype: Optional[torch.dtype] = None,
                device: Optional[Union[str, torch.device]] = None) -> DeployedSwin:
    """The inference model of a fine-tuned SPViT Swin (``spvit.deploy`` dispatches here; the input is not modified).

    Folding is done in float64 from the model's weights, then cast to ``dtype``; a model in training mode is read as in
    eval mode (BatchNorm running statistics, no dropout / drop path).

    Args:
        model: a ``SwinPrunedModel`` (``spvit.prune`` of a Swin, fine-tuning, or ``spvit.load_official``).
        dtype / device: of the result (default: the model's).
    Returns:
        a :class:`DeployedSwin` equal to ``model.eval()`` up to rounding.
    """
    swin, arch, sig = model.swin, model.architecture, model.signature
    dtype, device = deploy_target(model, dtype, device)
    config = _swin_trunk_config(swin, sig)
    state: Dict[str, torch.Tensor] = {}
    blocks: List[Dict] = []
    i = 0
    with torch.no_grad():
        for s, stage in enumerate(swin.layers):
            dim = config["stage_dims"][s]
            for j, blk in enumerate(stage.blocks):
                b = arch.blocks[i]
                cfg, sd = _swin_block(i, blk, b.attn, dim)
                check_ffn_width(i, cfg, b)
                blocks.append(cfg)
                state.update({f"layers.{s}.blocks.{j}.{k}": v for k, v in sd.items()})
                i += 1
            if not isinstance(stage.downsample, nn.Identity):
                state.update({f"layers.{s}.downsample.{k}": v.detach()
                              for k, v in stage.downsample.state_dict().items()})
        config["blocks"] = blocks
        state.update({f"patch_embed.{k}": v.detach() for k, v in swin.patch_embed.state_dict().items()})
        state.update({f"norm.{k}": v.detach() for k, v in swin.norm.state_dict().items()})
        state.update({f"head.{k}": v.detach() for k, v in swin.head.fc.state_dict().items()})
        config["data_cfg"] = data_cfg_of(model)  # timm's data settings (resolve_data_config(model=deployed))
        return assemble(DeployedSwin, config, arch, state, dtype, device)


__all__ = ["DeployedSwin", "DeployedSwinBlock", "DeployedSwinStage", "WindowFusedAttention", "deploy_swin"]
