"""The interface through which a model family says what to measure for its latency table (:class:`Pieces`, one
:class:`PieceGroup` per set of same-shape blocks), and the helpers the families share: timing a piece inside a run
of blocks as in the model, random weights of a measured block, the FFN width grid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import torch
import torch.nn as nn

from ..arch import ModelSignature
from .timer import sync


@dataclass
class PieceGroup:
    """Blocks of one shape: ``attn[kind]()`` and ``ffn(width)`` build the thunk that times one piece (a plain thunk
    timed whole, or a self-timed one, see :func:`time_ms`)."""

    blocks: List[int]
    hidden: int
    attn: Dict[str, Callable[[], Callable]]
    ffn: Callable[[int], Callable]
    shape: Dict[str, Any]


class Pieces:
    """Family interface: the model name / signature, the fixed-part thunks, the same-shape block groups and a
    thunk running the whole dense deployed model (for the record)."""

    family = "base"
    model_name: str
    signature: ModelSignature

    def fixed(self) -> Dict[str, Callable[[], object]]:
        raise NotImplementedError

    def groups(self, ffn_step: int) -> List[PieceGroup]:
        raise NotImplementedError

    def dense(self) -> Callable[[], object]:
        raise NotImplementedError

    def description(self, context: int) -> str:
        """What the pieces are (recorded in the table's meta)."""
        raise NotImplementedError


def run_in_context(blocks: Sequence[nn.Module], x: torch.Tensor, dev: torch.device, timed: str) -> Callable:
    """A self-timed thunk (see :func:`time_ms`): runs ``blocks`` in sequence on ``x`` (each output feeding the next
    block) and returns the mean seconds per block of the ``timed`` part ("attn": ``attn_residual``; "ffn":
    ``ffn_residual``)."""

    def run(now):
        h, spent = x, 0.0
        for b in blocks:
            if timed == "attn":
                sync(dev)
                t0 = now()
                h = b.attn_residual(h)
                sync(dev)
                spent += now() - t0
                h = b.ffn_residual(h)
            else:
                h = b.attn_residual(h)
                sync(dev)
                t0 = now()
                h = b.ffn_residual(h)
                sync(dev)
                spent += now() - t0
        return spent / len(blocks)

    run.self_timed = True
    return run


def randomised(blk: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """``blk`` on ``device`` / ``dtype`` with small random parameters and buffers (only shapes matter), eval mode."""
    blk.to(device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in list(blk.parameters()) + [b for b in blk.buffers() if b.is_floating_point()]:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return blk.eval()




def ffn_grid(hidden: int, step: int) -> List[int]:
    """The FFN widths measured: 0, step, 2 step, ... below ``hidden``, and ``hidden`` itself."""
    ws = list(range(0, hidden, step)) + [hidden]
    return sorted(set(ws))
