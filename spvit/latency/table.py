"""The latency table: its file format, its checks against a model and a device, and the prediction of a fixed
architecture as the sum of its measured pieces (linear interpolation between FFN grid widths)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as tdist

from ..arch import Architecture, ModelSignature
from ..choices import ATTN_CHOICES
from ..families import family_named
from ..runs import write_json
from .timer import device_class, dtype_name

FORMAT = "spvit-latency-table"
FORMAT_VERSION = 1


class LatencyTableError(ValueError):
    """A latency table that cannot be used here (wrong model, device class or dtype; malformed; impossible target)."""



@dataclass
class BlockGroup:
    """Measurements shared by the blocks ``blocks`` (all of one shape).

    ``attn_ms[kind]``: the attention residual x + attn(LN1(x)) of each choice (skip: nothing runs);
    ``ffn_widths`` (ascending, from 0 to the full width) and ``ffn_ms``: the FFN residual x + FFN(LN2(x)) at those
    widths (width 0: x + fc2 bias). ``shape``: what the pieces were measured at.
    """

    blocks: List[int]
    attn_ms: Dict[str, float]
    ffn_widths: List[int]
    ffn_ms: List[float]
    shape: Dict[str, Any] = field(default_factory=dict)

    def ffn_at(self, width: float) -> float:
        return float(interp(self.ffn_widths, self.ffn_ms, float(width)))


def _depth_of(family: str, signature: Dict[str, Any]) -> int:
    """Number of blocks of the ``family`` model that ``signature`` describes (its signature class's ``depth``)."""
    try:
        signature_type = family_named(family).signature_type
    except KeyError as exc:
        raise LatencyTableError(f"latency table: {exc.args[0]}") from None
    try:
        return int(signature_type(**signature).depth)
    except (TypeError, ValueError) as exc:
        raise LatencyTableError(f"latency table: its signature is not that of a {family} model ({exc})") from None


def signature_lists(sig: Dict[str, Any]) -> Dict[str, Any]:
    """A signature dict with tuples as lists (as JSON reads them back), for comparison."""
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in sig.items()}


def block_list(blocks: Sequence[int]) -> str:
    """"0-11" for a contiguous run, else "1, 3, 5"."""
    b = list(blocks)
    if len(b) > 1 and b == list(range(b[0], b[-1] + 1)):
        return f"{b[0]}-{b[-1]}"
    return ", ".join(str(i) for i in b)


def interp(xs: Sequence[float], ys: Sequence[float], k: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Piecewise-linear interpolation of (xs, ys) at ``k`` (clamped to [xs[0], xs[-1]]).

    For a tensor ``k`` (0-d) the result carries the gradient of the segment's slope; on a knot the segment to its
    right is used (the last segment at the right end).
    """
    n = len(xs)
    if n == 1:
        return ys[0] + 0 * k if isinstance(k, torch.Tensor) else float(ys[0])
    if isinstance(k, torch.Tensor):
        x = torch.as_tensor(xs, dtype=k.dtype, device=k.device)
        y = torch.as_tensor(ys, dtype=k.dtype, device=k.device)
        kd = k.detach().clamp(x[0], x[-1]).reshape(1)
        i = (torch.searchsorted(x, kd, right=True).clamp(1, n - 1) - 1).reshape(())
        x0, x1, y0, y1 = x[i], x[i + 1], y[i], y[i + 1]
        return y0 + (y1 - y0) / (x1 - x0) * (k - x0)
    kf = min(max(float(k), xs[0]), xs[-1])
    i = max(j for j in range(n - 1) if xs[j] <= kf) if kf < xs[-1] else n - 2
    return ys[i] + (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) * (kf - xs[i])


@dataclass
class LatencyTable:
    """Measured latencies (ms per batch of ``batch`` images) of a deployed model's pieces on one device and dtype.

    ``signature``: the model's :class:`~spvit.arch.ModelSignature` as a dict; ``device``: name, class (``cpu`` or
    ``cuda sm_XY``), threads and the kernel backends used; ``fixed_ms``: ``embed`` and ``head``; ``groups``: the
    :class:`BlockGroup` of each set of same-shape blocks; ``meta``: versions, the dense model measured whole, etc.
    """

    model_name: str
    family: str
    signature: Dict[str, Any]
    device: Dict[str, Any]
    dtype: str
    batch: int
    fixed_ms: Dict[str, float]
    groups: List[BlockGroup]
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        depth = self._depth = _depth_of(self.family, self.signature)
        self._group_of: Dict[int, BlockGroup] = {}
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise LatencyTableError(f"latency table: batch must be an integer >= 1, got {self.batch!r}")
        times = [("fixed " + k, v) for k, v in self.fixed_ms.items()]
        for g in self.groups:
            times += [(f"attention {k} of blocks {list(g.blocks)}", v) for k, v in g.attn_ms.items()]
            times += [(f"FFN width {w} of blocks {list(g.blocks)}", v) for w, v in zip(g.ffn_widths, g.ffn_ms)]
        bad = [(k, v) for k, v in times if not math.isfinite(v) or v < 0]
        if bad:
            raise LatencyTableError(f"latency table: every time must be a finite number of ms >= 0, got {bad[0][1]} "
                                    f"for {bad[0][0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        for g in self.groups:
            if list(g.ffn_widths) != sorted(set(g.ffn_widths)) or len(g.ffn_widths) != len(g.ffn_ms) or \
                    len(g.ffn_widths) < 1 or g.ffn_widths[0] != 0:
                raise LatencyTableError("latency table: FFN widths must be ascending, start at 0 and have one "
                                        "time each")
            missing = [k for k in ATTN_CHOICES if k not in g.attn_ms]
            if missing:
                raise LatencyTableError(f"latency table: no attention entry for {missing}")
            for b in g.blocks:
                self._group_of[int(b)] = g
        if sorted(self._group_of) != list(range(depth)):
            raise LatencyTableError(f"latency table: its groups do not cover blocks 0..{depth - 1} exactly once")
        if not self.dense_ms() > 0:
            raise LatencyTableError("latency table: the predicted dense latency is 0 ms (every time is 0); profile "
                                    "again with `spvit profile`")

    # -- lookup -----------------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self._depth

    def group(self, block: int) -> BlockGroup:
        return self._group_of[block]

    @property
    def fixed_total(self) -> float:
        return float(sum(self.fixed_ms.values()))

    def predict(self, arch: Architecture) -> Dict[str, Any]:
        """Predicted latency of ``arch`` (ms per batch): ``ms`` and per block ``blocks`` [(attn_ms, ffn_ms)]."""
        self.check_model(arch.signature, arch.model_name)
        rows = []
        for i, b in enumerate(arch.blocks):
            g = self.group(i)
            rows.append((g.attn_ms[b.attn], g.ffn_at(b.ffn_width)))
        return {"ms": self.fixed_total + sum(a + f for a, f in rows), "blocks": rows, "fixed_ms": self.fixed_total}

    def predict_choices(self, attn: Sequence[str], widths: Sequence[float]) -> float:
        return self.fixed_total + sum(self.group(i).attn_ms[a] + self.group(i).ffn_at(w)
                                      for i, (a, w) in enumerate(zip(attn, widths)))

    def dense_ms(self) -> float:
        return self.predict_choices(["msa"] * self.depth, [self.group(i).ffn_widths[-1] for i in range(self.depth)])

    def min_ms(self) -> float:
        """Every attention skipped and every FFN pruned: what no search can go below (the fastest entries)."""
        return self.fixed_total + sum(min(self.group(i).attn_ms.values()) + min(self.group(i).ffn_ms)
                                      for i in range(self.depth))

    # -- checks -----------------------------------------------------------------------------------------------------
    def check_model(self, signature: ModelSignature, model_name: Optional[str] = None) -> None:
        """LatencyTableError naming the difference if the table was not made for a model of ``signature``."""
        if signature.family != self.family:
            raise LatencyTableError(f"latency table was made for the {self.family} model {self.model_name!r}, not "
                                    f"for {model_name or 'this model'}, a {signature.family} model: profile this model "
                                    "with `spvit profile`")
        sig = signature_lists(asdict(signature))
        mine = signature_lists(self.signature)
        if sig != mine:
            diffs = [f"{k}: table {mine.get(k)!r} vs model {sig[k]!r}" for k in sig if mine.get(k) != sig[k]]
            raise LatencyTableError(f"latency table was made for {self.model_name!r}, not for "
                                    f"{model_name or 'this model'}; differs in " + "; ".join(diffs))

    def check_device(self, device: Union[str, torch.device], dtype: Union[str, torch.dtype],
                     batch: Optional[int] = None) -> None:
        """LatencyTableError if the table was measured on another device class, dtype (or batch size)."""
        cls, dt = device_class(device), dtype_name(dtype)
        problems = []
        if cls != self.device.get("class"):
            problems.append(f"device class {self.device.get('class')!r} (this device: {cls!r})")
        if dt != self.dtype:
            problems.append(f"dtype {self.dtype} (asked: {dt})")
        if batch is not None and int(batch) != self.batch:
            problems.append(f"batch {self.batch} (asked: {batch})")
        if problems:
            raise LatencyTableError("latency table was measured for " + ", ".join(problems) +
                                    "; profile again with `spvit profile` for this setting")

    # -- files ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "model_name": self.model_name, "family": self.family,
                "signature": self.signature, "device": self.device, "dtype": self.dtype, "batch": self.batch,
                "fixed_ms": self.fixed_ms, "groups": [asdict(g) for g in self.groups], "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any, source: str = "latency table") -> "LatencyTable":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise LatencyTableError(f"{source} is not an spvit latency table (no 'format': {FORMAT!r}); make one with "
                                    "`spvit profile`")
        if d.get("version") != FORMAT_VERSION:
            raise LatencyTableError(f"{source} has latency-table version {d.get('version')}; this spvit reads "
                                    f"version {FORMAT_VERSION}")
        try:
            groups = [BlockGroup([int(b) for b in g["blocks"]], {k: float(v) for k, v in g["attn_ms"].items()},
                                 [int(w) for w in g["ffn_widths"]], [float(t) for t in g["ffn_ms"]],
                                 dict(g.get("shape", {}))) for g in d["groups"]]
            return cls(str(d["model_name"]), str(d.get("family", "vit")), dict(d["signature"]), dict(d["device"]),
                       dtype_name(d["dtype"]), int(d["batch"]), {k: float(v) for k, v in d["fixed_ms"].items()},
                       groups, dict(d.get("meta", {})))
        except (KeyError, TypeError, AttributeError) as exc:
            raise LatencyTableError(f"{source}: malformed latency table ({type(exc).__name__}: {exc})") from None
        except ValueError as exc:
            raise LatencyTableError(f"{source}: {exc}") from None

    def save(self, path: str, force: bool = False) -> None:
        """Write JSON atomically; an existing file is replaced only with ``force``."""
        if os.path.exists(path) and not force:
            raise FileExistsError(f"{path} exists; pass --force (force=True) to replace it")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder")
        write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"latency table not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LatencyTableError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(d, path)

    def summary(self) -> str:
        lines = [f"latency table of {self.model_name} on {self.device.get('name')} ({self.device.get('class')}), "
                 f"{self.dtype}, batch {self.batch}, {self.device.get('threads')} thread(s)",
                 "  fixed: " + ", ".join(f"{k} {v:.3f} ms" for k, v in self.fixed_ms.items())]
        for g in self.groups:
            where = f" [{g.shape['label']}]" if g.shape.get("label") else ""
            lines.append(f"  blocks {block_list(g.blocks)}{where} (measured once, shared): " +
                         ", ".join(f"{k} {g.attn_ms[k]:.3f}" for k in ATTN_CHOICES) +
                         f" ms; FFN {g.ffn_ms[0]:.3f} ms at width 0 .. {g.ffn_ms[-1]:.3f} ms at "
                         f"{g.ffn_widths[-1]} ({len(g.ffn_widths)} widths)")
        lines.append(f"  predicted dense {self.dense_ms():.3f} ms, everything pruned {self.min_ms():.3f} ms")
        if "dense_measured_ms" in self.meta:
            lines.append(f"  dense model measured whole: {self.meta['dense_measured_ms']:.3f} ms")
        if "cpu_malloc" in self.meta:
            lines.append(f"  CPU allocator: {self.meta['cpu_malloc']}")
        return "\n".join(lines)


def load_table(path: str, dist=None) -> LatencyTable:
    """:meth:`LatencyTable.load`; under DDP rank 0 reads the file and broadcasts it (an error reaches every rank)."""
    if dist is None or not dist.enabled:
        return LatencyTable.load(path)
    box: List[Any] = [None]
    if dist.main:
        try:
            box[0] = ("ok", LatencyTable.load(path).to_dict())
        except (OSError, ValueError) as exc:
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
    tdist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if kind != "ok":
        raise LatencyTableError(payload.split(": ", 1)[-1])
    return LatencyTable.from_dict(payload, path)


