"""The deployed model's modules: :class:`DeployedModel` and its blocks (fused attention, folded conv, compact FFN),
eval-only, with the file format they save (:data:`FORMAT`). :mod:`spvit.deploy` builds them from a pruned model
(docs/method.md §6, §10.4) and loads them from files.

The ops go through the :mod:`spvit_kernels` dispatcher, so the backend (Triton / extension / eager) is chosen per
call (``SPVIT_BACKEND``, ``spvit_kernels.use_backend``). Under ``torch.compile`` / ``torch.export`` the same
dispatcher is used (the choice is made at trace time): every kernel provider is a ``torch.library`` op, so traces see
the kernels; ``DeployedModel.kernels_when_tracing = False`` traces every op as the eager reference instead.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from spvit_kernels import reference as R
from spvit_kernels.backend import preload as preload_kernels, resolve

from ._version import __version__
from .arch import Architecture
from .choices import CONV_CHOICES, DEPLOY_KINDS, MSA, SKIP, SKIP_LN
from .models.convert import UnsupportedModelError, check_images
from .models.timm_api import DeployedApi
from .runs import save_torch

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
