"""Hardware-aware SPViT (docs/method.md §11.4): latency tables of the deployed model, a differentiable latency model
for the search, and aligned FFN widths.

* :func:`profile` (``spvit profile``) measures, on one device / dtype / batch size, the latency of the pieces of the
  DEPLOYED model (:mod:`spvit.deploy`, the fused modules that actually run) at the model's real shapes: per block
  the attention residual for each choice (MSA, 3x3, 1x1, skip) and the FFN residual at widths on a grid, plus the
  fixed parts (patch embedding with class token and position embedding; final norm, pooling and head; for Swin also
  each stage's PatchMerging). Blocks of the same shape share one set of measurements (every ViT block has the same
  shapes: measured once; Swin: one set per stage and shift, :class:`SwinPieces`). The result is a
  :class:`LatencyTable` (JSON; written atomically, never over an existing file without ``force``).
* The prediction of a fixed architecture is the sum of its pieces: fixed parts + per block the attention choice's
  entry + the FFN entry, linearly interpolated between grid widths.
* :class:`LatencyObjective` is the search's complexity term when a table is given: the same complexity indicators
  as the FLOPs loss (docs/method.md §2.4) weight the attention entries (cumulative gates ê₁, ê₃, êₘ) and the FFN
  latency is the piecewise-linear interpolation at the expected kept width Σⱼ ĝⱼ, so the predicted latency is a
  differentiable function of the gate logits exactly as the FLOPs are, and equals the table's prediction of the
  read-out architecture at the current logits.
* :func:`aligned_keep` / :func:`align_architecture`: read-out of a multiple of N units per FFN (``--ffn-align``).

Families plug in through a small "pieces" interface (:class:`Pieces`): what to measure per shape group, and the
per-block indicators of a supernet (:func:`block_indicators`). ViT/DeiT (:class:`ViTPieces`) and Swin
(:class:`SwinPieces`; the supernet's blocks in block order, stage by stage) are implemented.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import gates as G
from .arch import Architecture, BlockArch, ModelSignature
from .flops import arch_macs, dense_macs

FORMAT = "spvit-latency-table"
FORMAT_VERSION = 1
ATTN_KINDS = ("msa", "3x3", "1x1", "skip")
STATS = {"median": "ms", "min": "ms_min"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LatencyTableError(ValueError):
    """A latency table that cannot be used here (wrong model, device class or dtype; malformed; impossible target)."""


# ----------------------------------------------------------------------------------------------------------------------
# Devices and timing
# ----------------------------------------------------------------------------------------------------------------------
def dtype_name(dtype: Union[str, torch.dtype]) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return dtype
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"dtype {dtype} is not one of {sorted(DTYPES)}")


def device_class(device: Union[str, torch.device]) -> str:
    """``"cpu"`` or ``"cuda sm_XY"`` (the compute capability): what a table may be reused across."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda sm_{major}{minor}"
    return device.type


def device_name(device: Union[str, torch.device]) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu")

# glibc malloc, by default, serves blocks above a *dynamic* threshold (128 KiB at start, raised to the size of the
# largest such block freed so far, up to 32 MiB) with fresh mmap()ed memory and gives it back on free, and trims the
# heap top past another dynamic threshold. Whether a batch's large activations then cost thousands of page faults
# depends on what the process allocated before: measured on a 2-core x86 CPU, the same dense deployed demo ViT ran
# in 42 ms or 59 ms per batch (one thread) depending on that history, with 10 ms of kernel time for page faults in
# the slow state. A latency table profiled in one state and a model measured in the other disagree by up to 30 %.
# Fixing both thresholds makes the allocator's behaviour independent of history (memory is kept for reuse instead).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
STEADY_MMAP_BYTES = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit
STEADY_TRIM_BYTES = 1 << 30
_malloc_state: Optional[str] = None


def set_steady_malloc() -> str:
    """Fix glibc malloc's mmap and trim thresholds for this process (idempotent) and say what the CPU allocator
    now is; used by :func:`profile` and :func:`compare` on CPU (``steady_malloc=True``, the default) and recorded in
    the table. Tables are only comparable with measurements made in the same allocator regime: run the deployed
    model the same way (call this at start-up, or set ``MALLOC_MMAP_THRESHOLD_=33554432`` and
    ``MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment, or preload jemalloc / tcmalloc). Leaves the allocator
    alone where the environment already configures it (those variables, or a preloaded allocator) or where the C
    library is not glibc. The price: freed memory stays in the process for reuse (peak RSS is not given back)."""
    global _malloc_state
    if _malloc_state is not None:
        return _malloc_state
    preload = os.environ.get("LD_PRELOAD", "")
    for lib in ("jemalloc", "tcmalloc", "mimalloc"):
        if lib in preload:
            _malloc_state = f"{lib} (preloaded)"
            return _malloc_state
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        _malloc_state = ("glibc, thresholds from the environment: mmap "
                         f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'default')}, trim "
                         f"{os.environ.get('MALLOC_TRIM_THRESHOLD_', 'default')}")
        return _malloc_state
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        glibc = version().decode()
        ok = libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_BYTES) == 1 and \
            libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_BYTES) == 1
    except (OSError, AttributeError, TypeError):  # no C library handle (Windows) or not glibc (musl, macOS)
        _malloc_state = "system default (not glibc: left alone)"
        return _malloc_state
    _malloc_state = (f"glibc {glibc}, steady: mmap threshold {STEADY_MMAP_BYTES >> 20} MiB, trim threshold "
                     f"{STEADY_TRIM_BYTES >> 20} MiB" if ok else f"glibc {glibc}, default (mallopt refused)")
    return _malloc_state


def malloc_state() -> str:
    """What :func:`set_steady_malloc` found or set in this process ("not set" if it was not called)."""
    return _malloc_state or "not set (the C library's defaults)"


def time_ms(fn: Callable[[], object], device: torch.device, min_reps: int = 5, max_reps: int = 100,
            budget_s: float = 0.3, warmup: int = 2, clock: str = "wall") -> Dict[str, float]:
    """Milliseconds per call of ``fn`` with an adaptive number of repeats.

    ``warmup`` untimed calls, then timed calls until at least ``min_reps`` were made and ``budget_s`` seconds were
    spent (at most ``max_reps``). CUDA is synchronised around every call. ``clock``: "wall" (latency) or "cpu" (the
    process's CPU time: on a CPU shared with other work, the time the call would take on an idle core; meaningful
    for one thread only). A ``fn`` with ``fn.self_timed = True`` is called as ``fn(clock_function)`` and returns the
    seconds to count (a piece timed inside a longer run, see :class:`ViTPieces`); the budget counts the whole calls.
    Returns ``ms`` (median), ``ms_min``, ``reps``.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "cpu" and device.type != "cpu":
        raise ValueError("clock='cpu' (process CPU time) measures CPU work only; use clock='wall' on a GPU")
    now = time.perf_counter if clock == "wall" else time.process_time
    self_timed = getattr(fn, "self_timed", False)
    for _ in range(warmup):
        fn(now) if self_timed else fn()
    _sync(device)
    times: List[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < budget_s):
        t0 = now()
        if self_timed:  # a piece timed inside its context: fn returns the seconds of the piece alone
            dt = fn(now)
        else:
            fn()
            _sync(device)
            dt = now() - t0
        spent += now() - t0  # the budget counts all the work done, context included
        times.append(dt * 1e3)
    times.sort()
    n = len(times)
    med = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    return {"ms": med, "ms_min": times[0], "reps": n}


# ----------------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------------
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


def _sig_depth(sig: Dict[str, Any]) -> int:
    """Number of blocks of a signature dict (ViT: ``depth``; Swin: the sum of ``depths``)."""
    if "depths" in sig:
        return int(sum(int(d) for d in sig["depths"]))
    return int(sig.get("depth", 0))


def _sig_lists(sig: Dict[str, Any]) -> Dict[str, Any]:
    """A signature dict with tuples as lists (as JSON reads them back), for comparison."""
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in sig.items()}


def _block_list(blocks: Sequence[int]) -> str:
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
        depth = _sig_depth(self.signature)
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
            missing = [k for k in ATTN_KINDS if k not in g.attn_ms]
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
        return _sig_depth(self.signature)

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
        sig = _sig_lists(asdict(signature))
        mine = _sig_lists(self.signature)
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
        from .runs import write_json

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
            lines.append(f"  blocks {_block_list(g.blocks)}{where} (measured once, shared): " +
                         ", ".join(f"{k} {g.attn_ms[k]:.3f}" for k in ATTN_KINDS) +
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
    import torch.distributed as tdist

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


# ----------------------------------------------------------------------------------------------------------------------
# Pieces: what to measure, per model family
# ----------------------------------------------------------------------------------------------------------------------
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


def _run_in_context(blocks: Sequence[nn.Module], x: torch.Tensor, dev: torch.device, timed: str) -> Callable:
    """A self-timed thunk (see :func:`time_ms`): runs ``blocks`` in sequence on ``x`` (each output feeding the next
    block) and returns the mean seconds per block of the ``timed`` part ("attn": ``attn_residual``; "ffn":
    ``ffn_residual``)."""

    def run(now):
        h, spent = x, 0.0
        for b in blocks:
            if timed == "attn":
                _sync(dev)
                t0 = now()
                h = b.attn_residual(h)
                _sync(dev)
                spent += now() - t0
                h = b.ffn_residual(h)
            else:
                h = b.attn_residual(h)
                _sync(dev)
                t0 = now()
                h = b.ffn_residual(h)
                _sync(dev)
                spent += now() - t0
        return spent / len(blocks)

    run.self_timed = True
    return run


def _randomised(blk: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """``blk`` on ``device`` / ``dtype`` with small random parameters and buffers (only shapes matter), eval mode."""
    blk.to(device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in list(blk.parameters()) + [b for b in blk.buffers() if b.is_floating_point()]:
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return blk.eval()


def _grid(hidden: int, step: int) -> List[int]:
    ws = list(range(0, hidden, step)) + [hidden]
    return sorted(set(ws))


class ViTPieces(Pieces):
    """Pieces of a deployed ViT / DeiT (:class:`spvit.deploy.DeployedModel`): every block has the same shapes."""

    family = "vit"

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, batch: int,
                 model_name: Optional[str] = None, context: int = 4):
        from .deploy import DeployedBlock, deploy
        from .models.convert import model_name_of, signature_of
        from .models.pruned import prune

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
        self._DeployedBlock = DeployedBlock
        self.context = min(int(context), sig.depth)

    def _block(self, kind: str, width: int, seed: int = 0) -> nn.Module:
        a = self._block_args
        blk = self._DeployedBlock(kind, a["dim"], a["num_heads"], width, a["grid"], a["approximate"], a["eps1"],
                                  a["eps2"], a["num_prefix_tokens"], a["ops"])
        blk.to(device=self.device, dtype=self.dtype)
        g = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for p in blk.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        return blk.eval()

    def _in_context(self, kind: str, width: int, timed: str) -> Callable:
        """A self-timed thunk: runs ``context`` distinct blocks (attention ``kind``, FFN ``width``) in sequence as the
        model does, each output feeding the next block, and returns the mean seconds of the ``timed`` part
        ("attn": x + attn(LN1(x)); "ffn": x + FFN(LN2(x))) per block. Timing a piece between its real neighbours
        keeps the cache and memory traffic of the model (a piece repeated alone on one input runs from warm
        caches; measured: the demo ViT's MSA 40 % faster alone than in the model on a 2-core x86 CPU)."""
        blocks = [self._block(kind, width, seed=i) for i in range(self.context)]
        return _run_in_context(blocks, self.tokens, self.device, timed)

    def _fixed_in_context(self, part: str) -> Callable:
        """Self-timed thunk of a fixed part after (embed) or before (head) one dense block, as in the model."""
        d, x, dev = self.deployed, self.images, self.device
        blk = self._block("msa", self.signature.mlp_hidden)

        def run(now):
            if part == "embed":
                blk(self.tokens)
                _sync(dev)
                t0 = now()
                d.embed(x)
                _sync(dev)
                return now() - t0
            h = blk(self.tokens)
            _sync(dev)
            t0 = now()
            d.forward_head(d.norm(h))
            _sync(dev)
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
        for kind in ATTN_KINDS:
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
        from .deploy_swin import DeployedSwinBlock, deploy_swin
        from .models.convert import model_name_of, swin_signature_of
        from .models.swin import prune_swin

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
        self._Block = DeployedSwinBlock
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
        blk = self._Block(kind, c["stage_dims"][s], c["num_heads"][s], c["resolutions"][s], b["window"], b["shift"],
                          width, b["approximate"], b["eps1"], b["eps2"], self.deployed._ops)
        return _randomised(blk, self.device, self.dtype, seed)

    def _piece(self, i: int, kind: str, width: int, timed: str) -> Callable:
        s = self.signature.block_stage[i]
        x = self._map(s)
        if self.context:
            blocks = [self._block(i, kind, width, seed=j) for j in range(self.context)]
            return _run_in_context(blocks, x, self.device, timed)
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
            attn = {k: (lambda k_, i_, f_: (lambda: self._piece(i_, k_, f_, "attn")))(k, i, full) for k in ATTN_KINDS}
            ffn = (lambda i_: (lambda w: self._piece(i_, "msa" if self.context else "skip", w, "ffn")))(i)
            label = f"stage {s}, " + (f"shift {shift[0]}x{shift[1]}" if any(shift) else "no shift")
            h, w = c["resolutions"][s]
            shape = {"label": label, "stage": s, "shift": list(shift), "window": list(c["blocks"][i]["window"]),
                     "resolution": [h, w], "tokens": h * w, "dim": c["stage_dims"][s], "heads": c["num_heads"][s],
                     "ffn_hidden": full,
                     "context": (f"timed inside a run of {self.context} blocks of this shape (attention pieces with "
                                 f"full FFNs, FFN pieces after MSA)" if self.context
                                 else "each piece timed alone on one input"),
                     "note": f"blocks {_block_list(blocks)} ({label}) have the same shapes: measured once, shared"}
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


PIECES: Dict[str, Callable[..., Pieces]] = {"vit": ViTPieces, "swin": SwinPieces}


def pieces_for(model: nn.Module, device, dtype, batch, model_name=None, context: int = 4) -> Pieces:
    """The :class:`Pieces` of ``model`` (a timm ViT / DeiT, or a Supernet / PrunedModel wrapping one)."""
    from .models.convert import UnsupportedModelError, is_swin

    family = getattr(model, "spvit_family", None) or ("swin" if is_swin(model) else "vit")
    if family not in PIECES:
        raise UnsupportedModelError(f"latency tables are not implemented for the {family} family")
    return PIECES[family](model, device, dtype, batch, model_name=model_name, context=context)


# ----------------------------------------------------------------------------------------------------------------------
# Profiling
# ----------------------------------------------------------------------------------------------------------------------
def default_ffn_step(hidden: int, device: torch.device) -> int:
    """64 (a tensor-core-friendly multiple) when the FFN is wide enough, else about hidden / 16."""
    if hidden >= 16 * 64:
        return 64
    return max(1, hidden // 16)


def _versions() -> Dict[str, str]:
    from ._version import __version__

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return {"torch": str(torch.__version__), "triton": tv, "spvit": __version__}


def profile(model: Union[nn.Module, str], device: Union[str, torch.device] = "cpu",
            dtype: Union[str, torch.dtype] = "fp32",
            batch: int = 1, threads: Optional[int] = None, ffn_step: Optional[int] = None, min_reps: int = 5,
            max_reps: int = 100, budget_s: float = 0.3, model_kwargs: Optional[Dict] = None,
            model_name: Optional[str] = None, show: bool = True, stat: str = "median",
            clock: str = "wall", rounds: int = 1, context: int = 4, steady_malloc: bool = True) -> LatencyTable:
    """Measure the latency table of ``model``'s deployed pieces (see the module doc).

    Args:
        model: a timm ViT / DeiT instance, or a timm model name (built with random weights: only shapes matter).
        device / dtype / batch: what the table is for (``dtype`` "fp32", "bf16", "fp16" or a torch dtype).
        threads: torch CPU threads while measuring (default: as set); recorded in the table.
        ffn_step: FFN width grid step (default :func:`default_ffn_step`); the full width is always measured.
        min_reps / max_reps / budget_s: adaptive repeats per piece (see :func:`time_ms`).
        model_kwargs: extra ``timm.create_model`` arguments for a model name.
        show: progress bar.
        stat: "median" (default) or "min" of the repeats (the least disturbed estimate on a shared, loaded machine);
            recorded in the table, and :func:`compare` measures models with the same statistic.
        clock: "wall" (default) or "cpu" (process CPU time, one thread, see :func:`time_ms`); recorded likewise.
        context: time each block piece inside a run of this many blocks as in the model (0: each piece alone on
            one input, which runs from warm caches and under-predicts); see :meth:`ViTPieces._in_context`.
        rounds: pass over every piece this many times (each with budget_s / rounds) and keep the median over the
            passes, so that a burst of other work on the machine disturbs every piece alike.
        steady_malloc: on CPU, fix the C allocator's thresholds first (:func:`set_steady_malloc`; recorded in the
            table's meta as ``cpu_malloc``) so that page faults do not depend on what the process ran before.
    """
    from spvit_kernels.backend import backend_of

    from .engine import progress

    if isinstance(model, str):
        import timm

        model_name = model_name or model
        try:
            model = timm.create_model(model, pretrained=False, **(model_kwargs or {}))
        except RuntimeError as exc:
            raise ValueError(f"cannot build timm model {model_name!r}: {exc}") from None
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
    dt_name = dtype_name(dtype)
    if stat not in STATS:
        raise ValueError(f"stat must be one of {tuple(STATS)}, got {stat!r}")
    if clock == "cpu" and (device.type != "cpu" or (threads or torch.get_num_threads()) != 1):
        raise ValueError("clock 'cpu' (process CPU time) needs a CPU device and one thread (--threads 1)")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
    if device.type == "cpu" and steady_malloc:
        set_steady_malloc()
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        pieces = pieces_for(model, device, DTYPES[dt_name], batch, model_name, context=context)
        sig = pieces.signature
        if ffn_step is not None and int(ffn_step) < 1:
            raise ValueError(f"ffn_step must be >= 1, got {ffn_step}")
        fixed = pieces.fixed()
        pgroups = pieces.groups(int(ffn_step or 0))
        # one step for every group, or by default per group (Swin stages have different FFN widths)
        steps = [int(ffn_step) if ffn_step else default_ffn_step(pg.hidden, device) for pg in pgroups]
        jobs: List[Tuple[str, Any, Callable[[], Callable]]] = []
        for k, make in fixed.items():
            jobs.append(("fixed", k, make))
        for gi, pg in enumerate(pgroups):
            for kind in ATTN_KINDS:
                jobs.append((f"attn{gi}", kind, pg.attn[kind]))
            for w in _grid(pg.hidden, steps[gi]):
                jobs.append((f"ffn{gi}", w, (lambda p, w_: (lambda: p.ffn(w_)))(pg, w)))
        jobs.append(("dense", "whole", (lambda f: (lambda: f))(pieces.dense())))
        samples: Dict[Tuple[str, Any], List[float]] = {}
        t_start = time.perf_counter()
        order = [j for _ in range(rounds) for j in jobs]
        with torch.inference_mode():
            for where, key, make in progress(order, len(order), "profile", show):
                fn = make()  # built per pass and dropped: only one piece's blocks live at a time
                t = time_ms(fn, device, min_reps, max_reps, budget_s / rounds, clock=clock)
                del fn
                samples.setdefault((where, key), []).append(t[STATS[stat]])
        res = {k: _median(v) for k, v in samples.items()}
        groups = []
        for gi, pg in enumerate(pgroups):
            widths = _grid(pg.hidden, steps[gi])
            groups.append(BlockGroup(pg.blocks, {k: res[(f"attn{gi}", k)] for k in ATTN_KINDS}, widths,
                                     [res[(f"ffn{gi}", w)] for w in widths], pg.shape))
        sig_d = _sig_lists(asdict(sig))
        dev = {"name": device_name(device), "class": device_class(device), "threads": torch.get_num_threads(),
               "backends": {op: backend_of(op, device) for op in ("deploy_conv", "pruned_ffn")}}
        meta = {**_versions(), "stat": stat, "clock": clock, "rounds": rounds, "context": context,
                "ffn_step": steps[0] if len(set(steps)) == 1 else steps,
                "min_reps": min_reps, "max_reps": max_reps, "budget_s": budget_s,
                "dense_measured_ms": res[("dense", "whole")], "profile_s": round(time.perf_counter() - t_start, 1),
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "dense_gflops": dense_macs(sig) / 1e9,
                "pieces": pieces.description(context)}
        if device.type == "cpu":
            meta["cpu_malloc"] = malloc_state()
        return LatencyTable(pieces.model_name, pieces.family, sig_d, dev, dt_name, int(batch),
                            {k: res[("fixed", k)] for k in fixed}, groups, meta)
    finally:
        torch.set_num_threads(threads_before)


# ----------------------------------------------------------------------------------------------------------------------
# The differentiable latency model of the search
# ----------------------------------------------------------------------------------------------------------------------
def block_indicators(sn: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per block of a supernet: the cumulative attention indicators (ê₁, ê₃, êₘ) (3,) and the expected kept FFN
    width Σⱼ ĝⱼ (0-d), both differentiable (docs/method.md §2.4). A family's supernet may provide its own
    ``latency_indicators()``."""
    own = getattr(sn, "latency_indicators", None)
    if callable(own):
        return own()
    return [(G.cumulative(G.complexity_indicator(a.kernel_thresholds)), G.complexity_indicator(m.ffn_thresholds).sum())
            for a, m in zip(sn.attns, sn.mlps)]


def predicted_ms_tensor(table: LatencyTable, indicators: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Predicted latency (ms, 0-d tensor) from per-block indicators.

    Per block: t_skip + ê₁(t_1x1 − t_skip) + ê₃(t_3x3 − t_1x1) + êₘ(t_MSA − t_3x3) + FFN(Σⱼĝⱼ), the FFN latency
    linearly interpolated in the width. With 0/1 indicators this is exactly the table's prediction.
    """
    total = None
    for i, (e, k) in enumerate(indicators):
        a = table.group(i).attn_ms
        g = table.group(i)
        t = (a["skip"] + e[0] * (a["1x1"] - a["skip"]) + e[1] * (a["3x3"] - a["1x1"]) + e[2] * (a["msa"] - a["3x3"])
             + interp(g.ffn_widths, g.ffn_ms, k))
        total = t if total is None else total + t
    return total + table.fixed_total


def resolve_target(table: LatencyTable, speedup: Optional[float] = None, latency_ms: Optional[float] = None) -> float:
    """Target latency (ms per batch) from ``speedup`` (dense / S) or ``latency_ms``; LatencyTableError if it cannot be
    met (outside [everything pruned, dense])."""
    if (speedup is None) == (latency_ms is None):
        raise LatencyTableError("give exactly one of --target-speedup and --target-latency-ms with a latency table")
    dense, lo = table.dense_ms(), table.min_ms()
    if speedup is not None:
        if not (math.isfinite(speedup) and speedup > 0):
            raise LatencyTableError(f"--target-speedup must be a positive number, got {speedup}")
        target = dense / speedup
        if not (lo <= target <= dense):
            raise LatencyTableError(f"--target-speedup {speedup:g} cannot be met by {table.model_name} on "
                                    f"{table.device.get('class')}: the predicted speedup lies between 1 (dense, "
                                    f"{dense:.4g} ms) and {dense / lo:.3g} (everything pruned, {lo:.4g} ms)")
        return target
    if not (math.isfinite(latency_ms) and lo <= latency_ms <= dense):
        raise LatencyTableError(f"--target-latency-ms {latency_ms:g} cannot be met by {table.model_name}: it must lie "
                                f"between {lo:.4g} (everything pruned) and {dense:.4g} (dense) ms per batch of "
                                f"{table.batch}")
    return float(latency_ms)


class LatencyObjective:
    """The search's latency loss: ``lambda * (F_dense * (T - P) / D)^2``.

    P is the predicted latency (:func:`predicted_ms_tensor`), T the target and D the predicted dense latency (ms);
    F_dense is the dense model's GFLOPs. The latency gap is thereby expressed in "dense-GFLOPs equivalents": if
    latency were proportional to FLOPs, this loss would equal the FLOPs loss λ(T − F/10⁹)² of docs/method.md §3.2 at
    the same λ, so the λ of a configuration keeps its meaning (DeiT-S: λ = 3).
    """

    def __init__(self, table: LatencyTable, sn: nn.Module, target_ms: float):
        table.check_model(sn.signature, getattr(sn, "model_name", None))
        self.table, self.sn, self.target_ms = table, sn, float(target_ms)
        self.dense_ms = table.dense_ms()
        self.dense_gflops = dense_macs(sn.signature) / 1e9

    def predicted_ms(self) -> torch.Tensor:
        return predicted_ms_tensor(self.table, block_indicators(self.sn))

    def loss(self, loss_lambda: float) -> torch.Tensor:
        gap = (self.target_ms - self.predicted_ms()) / self.dense_ms
        return loss_lambda * (self.dense_gflops * gap) ** 2

    def describe(self) -> str:
        return (f"latency target {self.target_ms:.4g} ms/batch of {self.table.batch} (predicted dense "
                f"{self.dense_ms:.4g} ms, speedup {self.dense_ms / self.target_ms:.3g}) on "
                f"{self.table.device.get('name')} [{self.table.device.get('class')}, {self.table.dtype}]")


# ----------------------------------------------------------------------------------------------------------------------
# Aligned FFN widths
# ----------------------------------------------------------------------------------------------------------------------
def aligned_count(kept: int, full: int, align: int) -> int:
    """The number of FFN units the aligned read-out keeps (docs/method.md §11.4).

    0 stays 0 (the search removed the whole FFN). Otherwise the nearest of the allowed widths: the positive
    multiples of ``align`` up to ``full``, and ``full`` itself (always allowed, even when it is not a multiple); a
    tie goes to the larger width. So an FFN in use is never rounded away (1 .. align-1 units -> align). ``align`` <= 1
    changes nothing.
    """
    if kept < 0 or kept > full:
        raise ValueError(f"kept count {kept} outside [0, {full}]")
    if align <= 1 or kept == 0:
        return kept
    lo = (kept // align) * align
    cands = [c for c in (lo, lo + align) if 0 < c <= full] + [full]
    return min(cands, key=lambda c: (abs(c - kept), -c))


def aligned_keep(logits: torch.Tensor, align: int) -> Tuple[int, ...]:
    """Kept unit indices (sorted) after alignment: the ``aligned_count`` units with the largest gate logits (ties:
    lower index first); with ``align`` <= 1 exactly the units with logit > 0."""
    logits = logits.detach().float().cpu()
    kept = int((logits > 0).sum())
    n = aligned_count(kept, logits.numel(), align)
    if n == kept:
        return tuple(torch.nonzero(logits > 0).flatten().tolist())
    order = sorted(range(logits.numel()), key=lambda j: (-float(logits[j]), j))
    return tuple(sorted(order[:n]))


def align_architecture(sn: nn.Module, align: int, table: Optional[LatencyTable] = None) -> Architecture:
    """The supernet's architecture read-out with ``align``-aligned FFN widths (meta: GFLOPs and, with a table, the
    predicted latency of the aligned widths)."""
    arch = sn.architecture()
    if align and align > 1:
        blocks = [BlockArch(b.attn, aligned_keep(m.ffn_thresholds, align)) for b, m in zip(arch.blocks, sn.mlps)]
        arch = Architecture(arch.model_name, arch.signature, blocks, meta=dict(arch.meta))
        arch.meta["unaligned_ffn_widths"] = [len(m.kept()) for m in sn.mlps]
        arch.meta["gflops"] = arch_macs(arch) / 1e9
    arch.meta["ffn_align"] = int(align or 0)
    if table is not None:
        arch.meta["predicted_ms"] = table.predict(arch)["ms"]
        arch.meta["predicted_speedup"] = table.dense_ms() / arch.meta["predicted_ms"]
        arch.meta["latency_table"] = {"device": table.device.get("name"), "class": table.device.get("class"),
                                      "dtype": table.dtype, "batch": table.batch}
    return arch


# ----------------------------------------------------------------------------------------------------------------------
# Validation: predicted vs measured
# ----------------------------------------------------------------------------------------------------------------------
def measure_model(model: nn.Module, table: LatencyTable, min_reps: int = 5, max_reps: int = 50,
                  budget_s: float = 1.0) -> float:
    """ms per batch of a deployed model at the table's batch size, on the model's device (the table's statistic:
    median or minimum of the repeats)."""
    sig = model.signature
    dev = model.device
    x = torch.randn(table.batch, sig.in_chans, *sig.img_size, device=dev, dtype=model.dtype)
    stat = STATS.get(table.meta.get("stat", "median"), "ms")
    with torch.inference_mode():
        return time_ms(lambda: model(x), dev, min_reps, max_reps, budget_s, clock=table.meta.get("clock", "wall"))[stat]


def dense_deployed(model_name: str, signature: ModelSignature, device, dtype, model_kwargs: Optional[Dict] = None,
                   num_classes: Optional[int] = None) -> nn.Module:
    """The dense deployed model (random weights) of a timm model name: what the speedups are measured against."""
    import timm

    from .deploy import deploy
    from .models.pruned import prune

    kw = dict(model_kwargs or {})
    kw.setdefault("num_classes", num_classes if num_classes is not None else signature.num_classes)
    vit = timm.create_model(model_name, pretrained=False, **kw)
    arch = Architecture(model_name, signature, [BlockArch("msa", tuple(range(h))) for h in signature.block_mlp_hidden])
    return deploy(prune(vit, arch), dtype=dtype, device=device)


def timm_kwargs(signature: ModelSignature) -> Dict[str, Any]:
    """``timm.create_model`` kwargs that rebuild a ViT of ``signature`` (for a deployed file, which has no record of
    its timm kwargs)."""
    s = signature
    if s.family == "swin":
        return {"img_size": s.img_size[0] if s.img_size[0] == s.img_size[1] else tuple(s.img_size),
                "patch_size": s.patch_size, "in_chans": s.in_chans, "embed_dim": s.embed_dim,
                "depths": tuple(s.depths), "num_heads": tuple(s.num_heads), "window_size": s.window_size,
                "mlp_ratio": s.mlp_hidden[0] / s.embed_dim, "num_classes": s.num_classes}
    return {"img_size": s.img_size[0] if s.img_size[0] == s.img_size[1] else tuple(s.img_size),
            "patch_size": s.patch_size, "in_chans": s.in_chans, "embed_dim": s.embed_dim, "depth": s.depth,
            "num_heads": s.num_heads, "mlp_ratio": s.mlp_hidden / s.embed_dim, "num_classes": s.num_classes}


def _median(v: Sequence[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def compare(table: LatencyTable, deployed: nn.Module, dense: Optional[nn.Module] = None, rounds: int = 1,
            steady_malloc: bool = True, **timing) -> Dict[str, float]:
    """Predicted vs measured latency of ``deployed`` (and of the dense model, for the speedup).

    ``rounds`` passes measure the models alternately (median over passes), so that a change of load on the machine
    affects both alike; ``steady_malloc``: on CPU, fix the allocator's thresholds as :func:`profile` does (a warning
    if the table was measured under another allocator setting); ``timing``: :func:`measure_model` arguments.
    """
    table.check_model(deployed.signature, deployed.model_name)
    table.check_device(deployed.device, deployed.dtype)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if deployed.device.type == "cpu":
        if steady_malloc:
            set_steady_malloc()
        made = table.meta.get("cpu_malloc")
        if made is not None and ("steady" in made) != ("steady" in malloc_state()):
            warnings.warn(f"the latency table was measured with the CPU allocator '{made}', this process runs "
                          f"'{malloc_state()}': page-fault costs differ and so may the latencies", stacklevel=2)
    mine, dense_t = [], []
    for _ in range(rounds):
        mine.append(measure_model(deployed, table, **timing))
        if dense is not None:
            dense_t.append(measure_model(dense, table, **timing))
    out = {"predicted_ms": table.predict(deployed.architecture)["ms"], "measured_ms": _median(mine)}
    out["error"] = out["predicted_ms"] / out["measured_ms"] - 1
    if dense is not None:
        out["dense_predicted_ms"] = table.dense_ms()
        out["dense_measured_ms"] = _median(dense_t)
        out["predicted_speedup"] = out["dense_predicted_ms"] / out["predicted_ms"]
        out["measured_speedup"] = out["dense_measured_ms"] / out["measured_ms"]
    return out


__all__ = ["LatencyTable", "BlockGroup", "LatencyTableError", "LatencyObjective", "Pieces", "ViTPieces",
           "SwinPieces",
           "profile", "load_table", "predicted_ms_tensor", "block_indicators", "resolve_target", "aligned_count",
           "aligned_keep", "align_architecture", "compare", "measure_model", "dense_deployed", "device_class",
           "time_ms", "interp", "set_steady_malloc", "malloc_state"]
