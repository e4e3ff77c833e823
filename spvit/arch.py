"""The searched architecture: per block, the attention choice and the kept FFN hidden units (JSON round trip).

Two model families: ViT/DeiT (:class:`ModelSignature`, one stage of equal blocks) and Swin (:class:`SwinSignature`,
stages of blocks at decreasing resolution). ``Architecture.blocks`` is always the flat list of blocks in block order
(stage by stage for Swin); ``Architecture.stages`` nests it per stage.
"""
from __future__ import annotations

import json
import operator
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .choices import ATTN_CHOICES, AttnChoice
from .families import family_named
from .runs import write_json

FORMAT_VERSION = 1


class Signature:
    """What an architecture must agree with to be applied to a model: the model's shape. One frozen dataclass per
    family (:class:`ModelSignature`, :class:`SwinSignature`; the family module names it as ``signature_type``).

    Every signature has the fields ``embed_dim``, ``grid`` (the patch grid, of the first stage), ``patch_size``,
    ``in_chans``, ``mlp_hidden`` and ``num_classes``, and answers ``depth`` (blocks in all), ``stage_depths``,
    ``block_mlp_hidden`` (the dense FFN width of every block, block order), ``head_dim`` (of the first stage),
    ``img_size`` and ``describe()``. ``family`` is a class attribute (written into files), not a field.
    """

    family = ""

    @property
    def img_size(self) -> Tuple[int, int]:
        return (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)

    @property
    def stage_depths(self) -> Tuple[int, ...]:
        raise NotImplementedError

    @property
    def block_mlp_hidden(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class ModelSignature(Signature):
    """What an architecture must agree with to be applied to a ViT/DeiT model."""

    family = "vit"  # class attribute, not a field

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
    def stage_depths(self) -> Tuple[int, ...]:
        return (self.depth,)

    @property
    def block_mlp_hidden(self) -> Tuple[int, ...]:
        """Dense FFN width of every block."""
        return (self.mlp_hidden,) * self.depth

    def describe(self) -> str:
        return (f"dim {self.embed_dim}, depth {self.depth}, heads {self.num_heads}, mlp {self.mlp_hidden}, "
                f"grid {self.grid[0]}x{self.grid[1]} (patch {self.patch_size}), {self.num_classes} classes")


@dataclass(frozen=True)
class SwinSignature(Signature):
    """What an architecture must agree with to be applied to a Swin Transformer (docs/method.md §7).

    ``grid`` is the stage-1 patch grid (56x56 at 224 px, patch 4); stage ``s`` has ``embed_dim * 2**s`` channels on a
    ``grid // 2**s`` grid; ``mlp_hidden[s]`` is the dense FFN width of the blocks of stage ``s``.
    """

    family = "swin"  # class attribute, not a field

    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: int
    grid: Tuple[int, int]
    patch_size: int
    in_chans: int
    mlp_hidden: Tuple[int, ...]
    num_classes: int

    def __post_init__(self):
        for name in ("depths", "num_heads", "mlp_hidden", "grid"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.depths)
        if len(self.num_heads) != n or len(self.mlp_hidden) != n:
            raise ValueError(f"Swin signature: depths {self.depths}, num_heads {self.num_heads} and mlp_hidden "
                             f"{self.mlp_hidden} must have one entry per stage")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        return sum(self.depths)

    @property
    def stage_depths(self) -> Tuple[int, ...]:
        return self.depths

    @property
    def stage_dims(self) -> Tuple[int, ...]:
        return tuple(self.embed_dim * 2 ** s for s in range(self.num_stages))

    def stage_grid(self, s: int) -> Tuple[int, int]:
        return (self.grid[0] // 2 ** s, self.grid[1] // 2 ** s)

    def stage_window(self, s: int) -> int:
        """Window side of stage ``s``: the window size, or the stage's grid when that is smaller (one window)."""
        return min(self.window_size, self.stage_grid(s)[0])

    def stage_shift(self, s: int) -> int:
        """Cyclic shift of the odd blocks of stage ``s`` (0 when the stage is a single window)."""
        return 0 if self.stage_grid(s)[0] <= self.window_size else self.window_size // 2

    @property
    def head_dim(self) -> int:
        return self.stage_dims[0] // self.num_heads[0]

    @property
    def block_stage(self) -> Tuple[int, ...]:
        """Stage index of every block (block order)."""
        return tuple(s for s, n in enumerate(self.depths) for _ in range(n))

    @property
    def block_mlp_hidden(self) -> Tuple[int, ...]:
        return tuple(self.mlp_hidden[s] for s in self.block_stage)

    def describe(self) -> str:
        return (f"Swin dim {self.embed_dim}, depths {list(self.depths)}, heads {list(self.num_heads)}, window "
                f"{self.window_size}, grid {self.grid[0]}x{self.grid[1]} (patch {self.patch_size}), "
                f"{self.num_classes} classes")


@dataclass(frozen=True)
class BlockArch:
    """One block: ``attn`` in {"msa", "3x3", "1x1", "skip"}; ``ffn_keep`` the sorted kept hidden-unit indices."""

    attn: str
    ffn_keep: Tuple[int, ...]

    def __post_init__(self):
        if self.attn not in ATTN_CHOICES:
            raise ValueError(f"attention choice {self.attn!r} is not one of {ATTN_CHOICES}")
        object.__setattr__(self, "attn", AttnChoice(self.attn).value)  # the plain string, whatever was given
        keep = []
        for i in self.ffn_keep:
            try:
                if isinstance(i, bool):
                    raise TypeError
                keep.append(operator.index(i))  # integers only: 1.5 or 0.5 is not silently truncated
            except TypeError:
                raise ValueError(f"ffn_keep holds hidden-unit indices (integers), got {i!r}") from None
        keep = tuple(keep)
        if list(keep) != sorted(set(keep)):
            raise ValueError("ffn_keep must be sorted, without repeats")
        object.__setattr__(self, "ffn_keep", keep)

    @property
    def ffn_width(self) -> int:
        return len(self.ffn_keep)


@dataclass
class Architecture:
    """An SPViT architecture for one model (``model_name`` and its :class:`ModelSignature` or
    :class:`SwinSignature`)."""

    model_name: str
    signature: Signature
    blocks: List[BlockArch]
    meta: Dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if len(self.blocks) != self.signature.depth:
            raise ValueError(f"architecture has {len(self.blocks)} blocks but the model has depth "
                             f"{self.signature.depth}")
        for i, (b, hidden) in enumerate(zip(self.blocks, self.signature.block_mlp_hidden)):
            if b.ffn_keep and (b.ffn_keep[0] < 0 or b.ffn_keep[-1] >= hidden):
                raise ValueError(f"block {i}: kept FFN unit index out of range [0, {hidden})")

    # ----------------------------------------------------------------------------------------------------------
    @property
    def attn_choices(self) -> List[str]:
        return [b.attn for b in self.blocks]

    @property
    def ffn_widths(self) -> List[int]:
        return [b.ffn_width for b in self.blocks]

    @property
    def family(self) -> str:
        return self.signature.family

    @property
    def stages(self) -> List[List[BlockArch]]:
        """The blocks nested per stage (one stage for ViT/DeiT)."""
        out, i = [], 0
        for n in self.signature.stage_depths:
            out.append(list(self.blocks[i:i + n]))
            i += n
        return out

    def check_compatible(self, signature: Signature, model_name: Optional[str] = None) -> None:
        """Raise ValueError naming the mismatch if this architecture does not belong to a model of ``signature``."""
        if type(signature) is not type(self.signature):
            raise ValueError(
                f"architecture is for the {family_named(self.signature.family).display_name} model "
                f"{self.model_name!r}, not for {model_name or 'this model'}, a "
                f"{family_named(signature.family).display_name} model: an architecture applies "
                f"only to a model of its own family and size")
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
        stage = getattr(self.signature, "block_stage", None)
        for i, (b, hidden) in enumerate(zip(self.blocks, self.signature.block_mlp_hidden)):
            where = f"stage {stage[i] + 1} " if stage is not None else ""
            lines.append(f"  {where}block {i:2d}: {b.attn:>4s}  FFN {b.ffn_width:5d}/{hidden}")
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict:
        """JSON-able dict. A Swin architecture carries ``signature.family = "swin"`` and its blocks nested per stage
        (``"stages"``); a ViT/DeiT one the flat ``"blocks"`` list (no family key: the original format)."""
        sig = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.signature).items()}
        d = {"format": "spvit-architecture", "version": FORMAT_VERSION, "model_name": self.model_name,
             "signature": sig}
        if self.signature.family == "vit":
            d["blocks"] = [_block_dict(b) for b in self.blocks]
        else:
            sig["family"] = self.signature.family
            d["stages"] = [[_block_dict(b) for b in stage] for stage in self.stages]
        d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "Architecture":
        if not isinstance(d, dict) or d.get("format") != "spvit-architecture":
            raise ValueError("not an spvit architecture (missing 'format': 'spvit-architecture')")
        if d.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"architecture format version {d.get('version')} is newer than this spvit "
                             f"understands ({FORMAT_VERSION}); upgrade spvit")
        try:
            sig = dict(d["signature"])
            try:
                signature_type = family_named(sig.pop("family", "vit")).signature_type
            except KeyError as exc:
                raise ValueError(f"{exc.args[0]} (in the architecture)") from None
            sig = {k: tuple(v) if isinstance(v, list) else v for k, v in sig.items()}
            blocks = d["blocks"] if "blocks" in d else [b for stage in d["stages"] for b in stage]
            if "stages" in d and [len(s) for s in d["stages"]] != list(sig.get("depths", [len(blocks)])):
                raise ValueError(f"the architecture's stages have {[len(s) for s in d['stages']]} blocks, its "
                                 f"signature depths {sig.get('depths')}")
            return cls(
                model_name=d["model_name"], signature=signature_type(**sig),
                blocks=[BlockArch(b["attn"], tuple(b["ffn_keep"])) for b in blocks], meta=d.get("meta", {}),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed architecture: {exc!r}") from exc

    def save(self, path: str) -> None:
        """Write JSON atomically (a unique temporary file, fsynced, then renamed; nothing is left on failure)."""
        write_json(self.to_dict(), os.fspath(path))

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
    def from_choices(cls, model_name: str, signature: Signature, attn: Sequence[str],
                     ffn_keep: Sequence[Sequence[int]]) -> "Architecture":
        return cls(model_name, signature, [BlockArch(a, tuple(k)) for a, k in zip(attn, ffn_keep)])


def _block_dict(b: BlockArch) -> Dict:
    return {"attn": b.attn, "ffn_keep": list(b.ffn_keep)}
