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
the model from it without timm's model registry.

    deployed = spvit.deploy(pruned)                  # or deploy(pruned, dtype=torch.bfloat16, device="cuda")
    deployed.save("spvit_deit_s.pt"); deployed = spvit.load_deployed("spvit_deit_s.pt")
    torch.export.export(deployed, (x,)); torch.compile(deployed)
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spvit_kernels import reference as R
from spvit_kernels.backend import preload as preload_kernels, resolve

from .arch import Architecture
from .checkpoints import model_from_checkpoint
from .choices import CONV_CHOICES, DEPLOY_KINDS, MSA, SKIP, SKIP_LN
from .families import family_of
from .models.convert import UnsupportedModelError, check_images, gelu_approximate
from .models.pruned import ConvAttention, ExplicitConvAttention, PrunedModel, SkipAttention
from .models.supernet import Supernet
from .models.timm_api import DeployedApi, data_cfg_of
from .runs import load_torch_file, save_torch

FORMAT = "spvit-deployed"
FORMAT_VERSION = 1

# Attention kinds of a deployed block (DEPLOY_KINDS): the choices, and SKIP_LN = the official fine-tune skip (the
# block adds LN1(x), quirk Q4).


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class _OpChoice:
    """Per-model choice of op implementations: the dispatcher, or the eager reference while tracing if asked.

    Every kernel provider is a ``torch.library`` op (``spvit::<op>``), so ``torch.compile`` / ``torch.export`` trace
    the kernels themselves; ``kernels_when_tracing = False`` makes a trace record the eager reference ops instead (e.g.
    for an exporter that does not know the ``spvit`` ops).
    """

    kernels_when_tracing = True

    def op(self, name: str, device: torch.device):
        if _tracing() and not self.kernels_when_tracing:
            return getattr(R, name)
        return resolve(name, device)


# ----------------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------------
def _layer_norm(dim: int, eps: float) -> nn.Module:
    from timm.layers import LayerNorm

    return LayerNorm(dim, eps=eps)


def _norm_desc(norm: nn.Module, where: str) -> Optional[Dict]:
    """Plain description of a trunk norm (None = identity)."""
    if isinstance(norm, nn.Identity):
        return None
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and len(norm.normalized_shape) == 1:
        return {"type": "layernorm", "dim": int(norm.normalized_shape[0]), "eps": float(norm.eps),
                "bias": norm.bias is not None}
    raise UnsupportedModelError(f"{where}: norm {type(norm).__name__} is not supported by deploy (affine LayerNorm "
                                "or identity only)")


def _norm_from(desc: Optional[Dict]) -> nn.Module:
    if desc is None:
        return nn.Identity()
    if desc.get("type") != "layernorm":
        raise ValueError(f"unknown norm description {desc!r}")
    m = _layer_norm(desc["dim"], desc["eps"])
    if not desc.get("bias", True):
        m.bias = None
    return m


class FusedAttention(nn.Module):
    """Kept MSA layer: fused qkv GEMM, ``F.scaled_dot_product_attention``, output projection.

    forward(x_hat: (B, N, C)) -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return F.linear(o.transpose(1, 2).reshape(b, n, c), self.proj.weight, self.proj.bias)


class FoldedConv(nn.Module):
    """3x3 / 1x1 conv layer with head mixing and BatchNorm folded (docs/method.md §10.4), run by
    ``spvit_kernels.deploy_conv``.

    Parameters: ``w_planes`` (T*d, C) with T = 9 or 1, ``b_fold`` (d,), ``w_out`` (C, d), ``b_out`` (C,).
    forward(x_hat: (B, N, C)) -> (B, N, C), prefix (class) token passed through.
    """

    def __init__(self, kind: str, dim: int, head_dim: int, grid, num_prefix_tokens: int, ops: _OpChoice):
        super().__init__()
        taps = len(R.tap_columns(kind))
        self.kind, self.grid, self.num_prefix_tokens = kind, tuple(int(g) for g in grid), num_prefix_tokens
        self.w_planes = nn.Parameter(torch.zeros(taps * head_dim, dim), requires_grad=False)
        self.b_fold = nn.Parameter(torch.zeros(head_dim), requires_grad=False)
        self.w_out = nn.Parameter(torch.zeros(dim, head_dim), requires_grad=False)
        self.b_out = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self._ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.op("deploy_conv", x.device)(x, self.w_planes, self.b_fold, self.w_out, self.b_out, self.grid,
                                           self.num_prefix_tokens)


class CompactFFN(nn.Module):
    """Pruned FFN at its kept width: ``fc1`` (F, C), ``fc2`` (C, F), run by ``spvit_kernels.pruned_ffn``.

    :meth:`pad_width` may give it extra all-zero hidden units (fc1 rows and bias 0, fc2 columns 0: GELU(0) = 0, so
    the output is unchanged), so that the GEMMs run on aligned widths; ``width`` stays the kept width, and
    ``state_dict()`` holds (and ``load_state_dict`` takes) the weights at that width.

    forward(x_hat: (B, N, C)) -> (B, N, C).
    """

    def __init__(self, dim: int, width: int, approximate: str, ops: _OpChoice):
        super().__init__()
        self.approximate = approximate
        self.width = int(width)
        self.fc1 = nn.Linear(dim, width)
        self.fc2 = nn.Linear(width, dim)
        self._ops = ops
        self._register_state_dict_hook(_ffn_unpadded_state)
        self._register_load_state_dict_pre_hook(_ffn_padded_load, with_module=True)

    @property
    def padded_width(self) -> int:
        """The width the GEMMs run at (``width`` unless padded)."""
        return self.fc1.out_features

    @torch.no_grad()
    def pad_width(self, multiple: int) -> None:
        """Run at the kept width rounded up to a multiple of ``multiple`` (1: the kept width), with zero units."""
        if multiple < 1:
            raise ValueError(f"pad_width: multiple must be >= 1, got {multiple}")
        target = -(-self.width // multiple) * multiple
        if target == self.padded_width:
            return
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        k = self.width
        nw1, nb1, nw2 = w1.new_zeros(target, w1.shape[1]), b1.new_zeros(target), w2.new_zeros(w2.shape[0], target)
        nw1[:k], nb1[:k], nw2[:, :k] = w1[:k], b1[:k], w2[:, :k]
        self.fc1.weight = nn.Parameter(nw1, requires_grad=False)
        self.fc1.bias = nn.Parameter(nb1, requires_grad=False)
        self.fc2.weight = nn.Parameter(nw2, requires_grad=False)
        self.fc1.out_features = self.fc2.in_features = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.op("pruned_ffn", x.device)(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                   self.approximate)


def _ffn_unpadded_state(module: CompactFFN, state: Dict[str, torch.Tensor], prefix: str, local_metadata) -> None:
    k = module.width
    if module.padded_width != k:
        state[prefix + "fc1.weight"] = state[prefix + "fc1.weight"][:k]
        state[prefix + "fc1.bias"] = state[prefix + "fc1.bias"][:k]
        state[prefix + "fc2.weight"] = state[prefix + "fc2.weight"][:, :k]


def _ffn_padded_load(module: CompactFFN, state: Dict[str, torch.Tensor], prefix: str, *args) -> None:
    k, target = module.width, module.padded_width
    if target == k:
        return
    for name, dim in (("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)):
        t = state.get(prefix + name)
        if t is not None and t.dim() > dim and t.shape[dim] == k:
            pad = list(t.shape)
            pad[dim] = target - k
            state[prefix + name] = torch.cat([t, t.new_zeros(pad)], dim=dim)


FFN_PAD_MULTIPLE = 64  # hidden width of the deployed FFNs on CUDA (tensor-core tiles, aligned fc2 rows)


def pad_ffns(model: nn.Module, multiple: int = FFN_PAD_MULTIPLE) -> nn.Module:
    """Pad every :class:`CompactFFN` of ``model`` to a hidden width that is a multiple of ``multiple`` with zero units
    (exact: the outputs do not change); ``multiple = 1`` removes the padding. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, CompactFFN):
            m.pad_width(multiple)
    return model


def _pad_default(model: nn.Module, pad_ffn: Optional[bool]) -> nn.Module:
    """``pad_ffn`` None: pad on CUDA only."""
    if pad_ffn is None:
        pad_ffn = model.device.type == "cuda"
    return pad_ffns(model, FFN_PAD_MULTIPLE if pad_ffn else 1)


class ResidualBlock(nn.Module):
    """What the deployed blocks of every family share: the FFN residual (``ffn_width`` set before ``_init_ffn``) and
    ``forward = ffn_residual(attn_residual(x))``; a family's block adds ``attn_residual``."""

    def _init_ffn(self, dim: int, approximate: str, eps2: float, ops: _OpChoice) -> None:
        """``norm2`` and a :class:`CompactFFN`, or for width 0 the constant residual ``ffn_bias``."""
        if self.ffn_width > 0:
            self.norm2 = _layer_norm(dim, eps2)
            self.mlp = CompactFFN(dim, self.ffn_width, approximate, ops)
        else:
            self.ffn_bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x + FFN(LN2(x))."""
        if self.ffn_width == 0:
            return x + self.ffn_bias
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_residual(self.attn_residual(x))


class DeployedBlock(ResidualBlock):
    """One transformer block of a deployed model.

    ``kind`` in DEPLOY_KINDS. ``attn`` is a :class:`FusedAttention`, a :class:`FoldedConv`, ``nn.Identity`` (official
    skip: the block adds LN1(x)) or absent (skip: no attention residual at all). ``mlp`` is a :class:`CompactFFN`,
    or absent for width 0, where the FFN residual is the constant ``ffn_bias``.
    forward(x: (B, N, C)) -> (B, N, C).
    """

    def __init__(self, kind: str, dim: int, num_heads: int, ffn_width: int, grid, approximate: str, eps1: float,
                 eps2: float, num_prefix_tokens: int, ops: _OpChoice, layer_scale: bool = False):
        super().__init__()
        if kind not in DEPLOY_KINDS:
            raise ValueError(f"unknown deployed attention kind {kind!r}; expected one of {DEPLOY_KINDS}")
        self.kind, self.ffn_width = kind, int(ffn_width)
        if kind != SKIP:
            self.norm1 = _layer_norm(dim, eps1)
        if kind == MSA:
            self.attn = FusedAttention(dim, num_heads)
        elif kind in CONV_CHOICES:
            self.attn = FoldedConv(kind, dim, dim // num_heads, grid, num_prefix_tokens, ops)
        elif kind == SKIP_LN:
            self.attn = nn.Identity()
        # LayerScale of a conv layer (folded everywhere else; a conv passes its class token through unscaled)
        self.ls1 = nn.Parameter(torch.ones(dim), requires_grad=False) if layer_scale else None
        self._init_ffn(dim, approximate, eps2, ops)

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x + attention(LN1(x)) (x itself for a skip layer)."""
        if self.kind == SKIP:
            return x
        a = self.attn(self.norm1(x))
        return x + (a * self.ls1 if self.ls1 is not None else a)



# ----------------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------------
class DeployedModel(DeployedApi, nn.Module):
    """An SPViT model for inference only: BatchNorm folded, FFNs compact, fused kernels, skip layers removed.

    Built by :func:`deploy` (from a :class:`PrunedModel`) or :func:`load_deployed`. Eval-only: ``train(True)`` raises
    a RuntimeError (``eval()`` is accepted). Parameters do not require grad.

    Attributes:
        architecture: the :class:`Architecture` (so ``spvit.gflops(deployed)`` works).
        signature: its model signature; the input must be ``(B, in_chans, *signature.img_size)``.
        config: the plain trunk description saved with the model.
        kernels_when_tracing: use the fused-op dispatcher under torch.compile / torch.export (default True); False
            traces the eager reference ops instead.
    forward(images: (B, in_chans, H, W)) -> logits (B, num_classes). Images are cast to the model's dtype.
    """

    def __init__(self, config: Dict[str, Any], architecture: Architecture):
        super().__init__()
        preload_kernels()  # providers imported now, not inside a first traced call
        self.config = copy.deepcopy(config)
        self.architecture = architecture
        self.signature = architecture.signature
        self.model_name = architecture.model_name
        self._ops = _OpChoice()
        self._build_trunk(self.config)
        self.requires_grad_(False)
        super().train(False)

    def _build_trunk(self, c: Dict[str, Any]) -> None:
        """The family's modules from the saved trunk description ``c`` (overridden by other families)."""
        dim, heads = c["embed_dim"], c["num_heads"]
        grid = tuple(c["grid"])
        self.num_prefix_tokens = 1
        self.no_embed_class = bool(c["no_embed_class"])
        self.global_pool, self.pool_include_prefix = c["global_pool"], bool(c["pool_include_prefix"])
        from timm.layers import PatchEmbed

        pe_norm = c.get("patch_norm")
        self.patch_embed = PatchEmbed(
            img_size=tuple(c["img_size"]), patch_size=c["patch_size"], in_chans=c["in_chans"], embed_dim=dim,
            bias=c["patch_bias"],
            norm_layer=(lambda d: _norm_from(pe_norm)) if pe_norm is not None else None)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim), requires_grad=False)
        n_pos = grid[0] * grid[1] + (0 if self.no_embed_class else 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim), requires_grad=False) if c["pos_embed"] else None
        self.norm_pre = _norm_from(c["norm_pre"])
        self.blocks = nn.ModuleList([
            DeployedBlock(b["kind"], dim, heads, b["ffn_width"], grid, b["approximate"], b["eps1"], b["eps2"],
                          self.num_prefix_tokens, self._ops, layer_scale=b.get("ls1", False))
            for b in c["blocks"]])
        self.norm = _norm_from(c["norm"])
        self.fc_norm = _norm_from(c["fc_norm"])
        self.head = nn.Linear(dim, c["num_classes"]) if c["num_classes"] > 0 else nn.Identity()

    # -- eval only -------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "DeployedModel":
        if mode:
            raise RuntimeError("a DeployedModel is inference-only (BatchNorm folded, no dropout); fine-tune the "
                               "PrunedModel instead and deploy it again")
        return super().train(False)

    @property
    def kernels_when_tracing(self) -> bool:
        return self._ops.kernels_when_tracing

    @kernels_when_tracing.setter
    def kernels_when_tracing(self, value: bool) -> None:
        self._ops.kernels_when_tracing = bool(value)

    @property
    def dtype(self) -> torch.dtype:
        return self.cls_token.dtype

    @property
    def device(self) -> torch.device:
        return self.cls_token.device

    # -- forward ---------------------------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.pos_embed is None:
            return torch.cat([cls, x], dim=1)
        if self.no_embed_class:
            return torch.cat([cls, x + self.pos_embed], dim=1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, in_chans, H, W) -> tokens (B, N, C) entering the first block."""
        check_images(x, self.signature)
        x = self.patch_embed(x.to(self.dtype))
        return self.norm_pre(self._pos_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pool = self.global_pool
        if pool == "token":
            x = x[:, 0]
        elif pool:
            x = x if self.pool_include_prefix else x[:, self.num_prefix_tokens:]
            if pool == "avg":
                x = x.mean(dim=1)
            elif pool == "max":
                x = x.amax(dim=1)
            else:  # avgmax
                x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- files -----------------------------------------------------------------------------------------------------
    def to_file_dict(self) -> Dict[str, Any]:
        """The content :meth:`save` writes (plain dicts, lists, numbers, strings and CPU tensors)."""
        from ._version import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spvit_version": __version__,
            "torch_version": str(torch.__version__),
            "dtype": str(self.dtype).replace("torch.", ""),
            "architecture": self.architecture.to_dict(),
            "config": copy.deepcopy(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }

    def save(self, path: str) -> None:
        """Write the model to ``path`` (atomically: a unique temporary file, fsync, then rename; a failed write leaves
        an existing file untouched). Load with :func:`load_deployed`. ONNX: :func:`spvit.export_onnx`."""
        save_torch(self.to_file_dict(), path)

    def __prepare_scriptable__(self):
        """TorchScript cannot compile the per-call kernel dispatch (``spvit_kernels.ops``): refuse clearly."""
        raise RuntimeError("a DeployedModel cannot be compiled with TorchScript (torch.jit.script): its layers choose "
                           "their kernels per call. Use torch.export.export(deployed, (x,)), "
                           "torch.compile(deployed) or spvit.export_onnx(deployed, path) instead, or script the "
                           "PrunedModel it was deployed from (torch.jit.script(pruned) works)")

    def extra_repr(self) -> str:
        return f"{self.model_name}: " + " ".join(b["kind"] for b in self.config["blocks"])


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
    from ._version import __version__

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
        from .models.official import load_official

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
