"""The searched architecture: per block, the attention choice and the kept FFN hidden units (JSON round trip)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .gates import ATTN_CHOICES

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelSignature:
    """What an architecture must agree with to be applied to a model."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    grid: Tuple[int, int]
    patch_size: int
    in_chans: int
    num_prefix_tokens: int
    num_classes: int

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def img_size(self) -> Tuple[int, int]:
        return (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)

    def describe(self) -> str:
        return (f"dim {self.embed_dim}, depth {self.depth}, heads {self.num_heads}, mlp {self.mlp_hidden}, "
                f"grid {self.grid[0]}x{self.grid[1]} (patch {self.patch_size}), {self.num_classes} classes")


@dataclass(frozen=True)
class BlockArch:
    """One block: ``attn`` in {"msa", "3x3", "1x1", "skip"}; ``ffn_keep`` the sorted kept hidden-unit indices."""

    attn: str
    ffn_keep: Tuple[int, ...]

    def __post_init__(self):
        if self.attn not in ATTN_CHOICES:
            raise ValueError(f"attention choice {self.attn!r} is not one of {ATTN_CHOICES}")
        keep = tuple(int(i) for i in self.ffn_keep)
        if list(keep) != sorted(set(keep)):
            raise ValueError("ffn_keep must be sorted, without repeats")
        object.__setattr__(self, "ffn_keep", keep)

    @property
    def ffn_width(self) -> int:
        return len(self.ffn_keep)


@dataclass
class Architecture:
    """An SPViT architecture for one model (``model_name`` and its :class:`ModelSignature`)."""

    model_name: str
    signature: ModelSignature
    blocks: List[BlockArch]
    meta: Dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if len(self.blocks) != self.signature.depth:
            raise ValueError(f"architecture has {len(self.blocks)} blocks but the model has depth {self.signature.depth}")
        for i, b in enumerate(self.blocks):
            if b.ffn_keep and (b.ffn_keep[0] < 0 or b.ffn_keep[-1] >= self.signature.mlp_hidden):
                raise ValueError(f"block {i}: kept FFN unit index out of range [0, {self.signature.mlp_hidden})")

    # ----------------------------------------------------------------------------------------------------------
    @property
    def attn_choices(self) -> List[str]:
        return [b.attn for b in self.blocks]

    @property
    def ffn_widths(self) -> List[int]:
        return [b.ffn_width for b in self.blocks]

    def check_compatible(self, signature: ModelSignature, model_name: Optional[str] = None) -> None:
        """Raise ValueError naming the mismatch if this architecture does not belong to a model of ``signature``."""
        if signature != self.signature:
            diffs = [f"{k}: architecture {getattr(self.signature, k)!r} vs model {getattr(signature, k)!r}"
                     for k in asdict(self.signature) if getattr(signature, k) != getattr(self.signature, k)]
            raise ValueError(
                f"architecture is for model {self.model_name!r} ({self.signature.describe()}), not for "
                f"{model_name or 'this model'} ({signature.describe()}); differs in " + "; ".join(diffs)
            )

    def summary(self) -> str:
        """One line per block: index, attention choice, kept FFN units."""
        lines = [f"Architecture of {self.model_name} ({self.signature.describe()})"]
        for i, b in enumerate(self.blocks):
            lines.append(f"  block {i:2d}: {b.attn:>4s}  FFN {b.ffn_width:5d}/{self.signature.mlp_hidden}")
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict:
        sig = asdict(self.signature)
        sig["grid"] = list(self.signature.grid)
        return {
            "format": "spvit-architecture",
            "version": FORMAT_VERSION,
            "model_name": self.model_name,
            "signature": sig,
            "blocks": [{"attn": b.attn, "ffn_keep": list(b.ffn_keep)} for b in self.blocks],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Dict) -> "Architecture":
        if not isinstance(d, dict) or d.get("format") != "spvit-architecture":
            raise ValueError("not an spvit architecture (missing 'format': 'spvit-architecture')")
        if d.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"architecture format version {d.get('version')} is newer than this spvit "
                             f"understands ({FORMAT_VERSION}); upgrade spvit")
        try:
            sig = dict(d["signature"])
            sig["grid"] = tuple(sig["grid"])
            return cls(
                model_name=d["model_name"], signature=ModelSignature(**sig),
                blocks=[BlockArch(b["attn"], tuple(b["ffn_keep"])) for b in d["blocks"]], meta=d.get("meta", {}),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed architecture: {exc!r}") from exc

    def save(self, path: str) -> None:
        """Write JSON atomically (a temporary file, then rename)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Architecture":
        if not os.path.exists(path):
            raise FileNotFoundError(f"architecture file not found: {path}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(d)

    @classmethod
    def from_choices(cls, model_name: str, signature: ModelSignature, attn: Sequence[str],
                     ffn_keep: Sequence[Sequence[int]]) -> "Architecture":
        return cls(model_name, signature, [BlockArch(a, tuple(k)) for a, k in zip(attn, ffn_keep)])
