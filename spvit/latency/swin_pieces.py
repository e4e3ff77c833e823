"""The latency pieces of a deployed Swin Transformer (:class:`SwinPieces`): one group of pieces per (stage, shift),
plus each stage's PatchMerging as a fixed part."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..arch import Architecture, BlockArch
from ..choices import ATTN_CHOICES
from ..deploy_swin import DeployedSwinBlock, deploy_swin
from ..models.convert import model_name_of, swin_signature_of
from ..models.swin import prune_swin
from .pieces import PieceGroup, Pieces, randomised, run_in_context
from .table import block_list


class SwinPieces(Pieces):
    """Pieces of a deployed Swin Transformer (:class:`spvit.deploy_swin.DeployedSwin`).

    Blocks differ per stage (width, resolution, heads, FFN width) and, within a stage, by the cyclic shift (a shifted
    MSA adds the roll and a per-window mask); the deployed 3x3 / 1x1 run over the full stage map and the FFN per
    token, which do not depend on the shift. One group per (stage, shift): its blocks share every measurement. Fixed
    parts: ``embed`` (patch embedding), ``merge{s}`` (PatchMerging before stage s >= 1) and ``head`` (final norm,
    average pooling, classifier), each timed alone on a map of its input shape.
    """

    family = "swin"

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, batch: int,
                 model_name: Optional[str] = None, context: int = 4):
        if hasattr(model, "swin"):
            raise TypeError("profile takes the dense timm model (or its name), not a Supernet / PrunedModel")
        self.signature = sig = swin_signature_of(model)
        self.model_name = model_name or model_name_of(model)
        dense = Architecture(self.model_name, sig, [BlockArch("msa", tuple(range(h))) for h in sig.block_mlp_hidden])
        with torch.no_grad():
            self.deployed = deploy_swin(prune_swin(model, dense), dtype=dtype, device=device)
        self.device, self.dtype, self.batch = device, dtype, batch
        self.images = torch.randn(batch, sig.in_chans, *sig.img_size, device=device, dtype=dtype)
        self.context = int(context)
        c = self.deployed.config
        # (stage, shift) -> block indices, in block order
        self._groups: Dict[Tuple[int, Tuple[int, int]], List[int]] = {}
        for i, (s, b) in enumerate(zip(sig.block_stage, c["blocks"])):
            self._groups.setdefault((s, tuple(b["shift"])), []).append(i)

    def _map(self, s: int) -> torch.Tensor:
        """Random stage-``s`` tokens (B, H*W, C)."""
        h, w = self.deployed.config["resolutions"][s]
        dim = self.deployed.config["stage_dims"][s]
        return torch.randn(self.batch, h * w, dim, device=self.device, dtype=self.dtype)

    def _block(self, i: int, kind: str, width: int, seed: int = 0) -> nn.Module:
        """A deployed block shaped as block ``i`` with attention ``kind`` and FFN ``width`` (random weights)."""
        c, s = self.deployed.config, self.signature.block_stage[i]
        b = c["blocks"][i]
        blk = DeployedSwinBlock(kind, c["stage_dims"][s], c["num_heads"][s], c["resolutions"][s], b["window"],
                                b["shift"], width, b["approximate"], b["eps1"], b["eps2"], self.deployed._ops)
        return randomised(blk, self.device, self.dtype, seed)

    def _piece(self, i: int, kind: str, width: int, timed: str) -> Callable:
        s = self.signature.block_stage[i]
        x = self._map(s)
        if self.context:
            blocks = [self._block(i, kind, width, seed=j) for j in range(self.context)]
            return run_in_context(blocks, x, self.device, timed)
        blk = self._block(i, kind, width)
        return (lambda: blk.attn_residual(x)) if timed == "attn" else (lambda: blk.ffn_residual(x))

    def fixed(self) -> Dict[str, Callable[[], Callable]]:
        d, c = self.deployed, self.deployed.config
        out: Dict[str, Callable[[], Callable]] = {"embed": lambda: (lambda: d.embed(self.images))}
        for s, stage in enumerate(d.layers):
            if c["downsample"][s] is None:
                continue
            h, w = c["resolutions"][s - 1]
            x = torch.randn(self.batch, h, w, c["stage_dims"][s - 1], device=self.device, dtype=self.dtype)
            out[f"merge{s}"] = (lambda m, x_: (lambda: (lambda: m(x_))))(stage.downsample, x)
        h, w = c["resolutions"][-1]
        last = torch.randn(self.batch, h, w, c["stage_dims"][-1], device=self.device, dtype=self.dtype)
        out["head"] = lambda: (lambda: d.forward_head(d.norm(last)))
        return out

    def groups(self, ffn_step: int) -> List[PieceGroup]:
        sig, c = self.signature, self.deployed.config
        out = []
        for (s, shift), blocks in self._groups.items():
            i, full = blocks[0], sig.mlp_hidden[s]
            attn = {k: (lambda k_, i_, f_: (lambda: self._piece(i_, k_, f_, "attn")))(k, i, full) for k in ATTN_CHOICES}
            ffn = (lambda i_: (lambda w: self._piece(i_, "msa" if self.context else "skip", w, "ffn")))(i)
            label = f"stage {s}, " + (f"shift {shift[0]}x{shift[1]}" if any(shift) else "no shift")
            h, w = c["resolutions"][s]
            shape = {"label": label, "stage": s, "shift": list(shift), "window": list(c["blocks"][i]["window"]),
                     "resolution": [h, w], "tokens": h * w, "dim": c["stage_dims"][s], "heads": c["num_heads"][s],
                     "ffn_hidden": full,
                     "context": (f"timed inside a run of {self.context} blocks of this shape (attention pieces with "
                                 f"full FFNs, FFN pieces after MSA)" if self.context
                                 else "each piece timed alone on one input"),
                     "note": f"blocks {block_list(blocks)} ({label}) have the same shapes: measured once, shared"}
            out.append(PieceGroup(list(blocks), full, attn, ffn, shape))
        return out

    def dense(self) -> Callable[[], object]:
        return lambda: self.deployed(self.images)

    def description(self, context: int) -> str:
        return ("attention: x + attn(LN1(x)) per choice (MSA in shifted windows with bias / mask; 3x3 / 1x1 over the "
                "full stage map); FFN: x + FFN(LN2(x)) per width (deployed fused modules), one set per (stage, shift); "
                "embed: patch embedding; merge{s}: PatchMerging before stage s; head: final norm, pooling, classifier"
                + (f"; block pieces timed inside a run of {context} blocks, fixed parts alone" if context
                   else "; each timed alone"))

