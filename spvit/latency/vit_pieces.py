"""The latency pieces of a deployed ViT / DeiT (:class:`ViTPieces`): every block has the same shapes, so one group
of pieces serves all blocks."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..arch import Architecture, BlockArch
from ..choices import ATTN_CHOICES
from ..deploy import DeployedBlock, deploy
from ..models.convert import model_name_of, signature_of
from ..models.pruned import prune
from .pieces import PieceGroup, Pieces, randomised, run_in_context
from .timer import sync


class ViTPieces(Pieces):
    """Pieces of a deployed ViT / DeiT (:class:`spvit.deploy.DeployedModel`): every block has the same shapes."""

    family = "vit"

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, batch: int,
                 model_name: Optional[str] = None, context: int = 4):
        vit = model
        if hasattr(model, "vit"):
            raise TypeError("profile takes the dense timm model (or its name), not a Supernet / PrunedModel")
        self.signature = signature_of(vit)
        self.model_name = model_name or model_name_of(vit)
        sig = self.signature
        dense = Architecture(self.model_name, sig,
                             [BlockArch("msa", tuple(range(sig.mlp_hidden)))] * sig.depth)
        with torch.no_grad():
            self.deployed = deploy(prune(vit, dense), dtype=dtype, device=device)
        self.device, self.dtype, self.batch = device, dtype, batch
        self.images = torch.randn(batch, sig.in_chans, *sig.img_size, device=device, dtype=dtype)
        n = sig.grid[0] * sig.grid[1] + sig.num_prefix_tokens
        self.tokens = torch.randn(batch, n, sig.embed_dim, device=device, dtype=dtype)
        b0 = self.deployed.config["blocks"][0]
        self._block_args = dict(dim=sig.embed_dim, num_heads=sig.num_heads, grid=sig.grid,
                                approximate=b0["approximate"], eps1=b0["eps1"], eps2=b0["eps2"],
                                num_prefix_tokens=sig.num_prefix_tokens, ops=self.deployed._ops)
        self.context = min(int(context), sig.depth)

    def _block(self, kind: str, width: int, seed: int = 0) -> nn.Module:
        a = self._block_args
        blk = DeployedBlock(kind, a["dim"], a["num_heads"], width, a["grid"], a["approximate"], a["eps1"], a["eps2"],
                            a["num_prefix_tokens"], a["ops"])
        return randomised(blk, self.device, self.dtype, seed)

    def _in_context(self, kind: str, width: int, timed: str) -> Callable:
        """A self-timed thunk: runs ``context`` distinct blocks (attention ``kind``, FFN ``width``) in sequence as the
        model does, each output feeding the next block, and returns the mean seconds of the ``timed`` part
        ("attn": x + attn(LN1(x)); "ffn": x + FFN(LN2(x))) per block. Timing a piece between its real neighbours
        keeps the cache and memory traffic of the model (a piece repeated alone on one input runs from warm
        caches; measured: the demo ViT's MSA 40 % faster alone than in the model on a 2-core x86 CPU)."""
        blocks = [self._block(kind, width, seed=i) for i in range(self.context)]
        return run_in_context(blocks, self.tokens, self.device, timed)

    def _fixed_in_context(self, part: str) -> Callable:
        """Self-timed thunk of a fixed part after (embed) or before (head) one dense block, as in the model."""
        d, x, dev = self.deployed, self.images, self.device
        blk = self._block("msa", self.signature.mlp_hidden)

        def run(now):
            if part == "embed":
                blk(self.tokens)
                sync(dev)
                t0 = now()
                d.embed(x)
                sync(dev)
                return now() - t0
            h = blk(self.tokens)
            sync(dev)
            t0 = now()
            d.forward_head(d.norm(h))
            sync(dev)
            return now() - t0

        run.self_timed = True
        return run

    def fixed(self) -> Dict[str, Callable[[], Callable]]:
        if self.context:
            return {k: (lambda k_: (lambda: self._fixed_in_context(k_)))(k) for k in ("embed", "head")}
        d, x, t = self.deployed, self.images, self.tokens
        return {"embed": lambda: (lambda: d.embed(x)), "head": lambda: (lambda: d.forward_head(d.norm(t)))}

    def groups(self, ffn_step: int) -> List[PieceGroup]:
        sig, x = self.signature, self.tokens
        full = sig.mlp_hidden
        attn: Dict[str, Callable[[], Callable]] = {}
        for kind in ATTN_CHOICES:
            if self.context:
                attn[kind] = (lambda k: (lambda: self._in_context(k, full, "attn")))(kind)
            else:
                attn[kind] = (lambda k: (lambda: (lambda b: (lambda: b.attn_residual(x)))(self._block(k, 0))))(kind)

        def ffn(width: int) -> Callable:
            if self.context:
                return self._in_context("msa", width, "ffn")
            blk = self._block("skip", width)
            return lambda: blk.ffn_residual(x)

        how = (f"timed inside a run of {self.context} dense-model blocks (attention pieces with full FFNs, FFN pieces "
               f"after MSA)" if self.context else "each piece timed alone on one input")
        shape = {"tokens": int(x.shape[1]), "dim": sig.embed_dim, "heads": sig.num_heads, "grid": list(sig.grid),
                 "ffn_hidden": full, "context": how,
                 "note": f"all {sig.depth} blocks have the same shapes: measured once, shared by every block"}
        return [PieceGroup(list(range(sig.depth)), full, attn, ffn, shape)]

    def dense(self) -> Callable[[], object]:
        return lambda: self.deployed(self.images)

    def description(self, context: int) -> str:
        return ("attention: x + attn(LN1(x)) per choice; FFN: x + FFN(LN2(x)) per width (deployed fused modules); "
                "embed: patch embedding + class token + position embedding; head: final norm, pooling, classifier" +
                (f"; each timed inside a run of {context} blocks" if context else "; each timed alone"))

