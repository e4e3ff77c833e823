"""Profiling: measure the latency table of a model's deployed pieces on one device, dtype and batch size
(:func:`profile`, ``spvit profile``), and build the dense deployed model that speedups are measured against
(:func:`dense_deployed`)."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn

from spvit_kernels.backend import backend_of

from .._version import __version__
from ..arch import Architecture, BlockArch, ModelSignature
from ..choices import ATTN_CHOICES
from ..deploy import deploy
from ..engine import progress
from ..flops import dense_macs
from ..models.pruned import prune
from .family import pieces_for
from .pieces import ffn_grid
from .table import BlockGroup, LatencyTable, signature_lists
from .timer import (DTYPES, STATS, device_class, device_name, dtype_name, malloc_state, median, set_steady_malloc,
                    time_ms)


def default_ffn_step(hidden: int, device: torch.device) -> int:
    """64 (a tensor-core-friendly multiple) when the FFN is wide enough, else about hidden / 16."""
    if hidden >= 16 * 64:
        return 64
    return max(1, hidden // 16)



def _versions() -> Dict[str, str]:
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
            one input, which runs from warm caches and under-predicts); see
            :meth:`~spvit.latency.vit_pieces.ViTPieces._in_context`.
        rounds: pass over every piece this many times (each with budget_s / rounds) and keep the median over the
            passes, so that a burst of other work on the machine disturbs every piece alike.
        steady_malloc: on CPU, fix the C allocator's thresholds first (:func:`set_steady_malloc`; recorded in the
            table's meta as ``cpu_malloc``) so that page faults do not depend on what the process ran before.
    """
    if isinstance(model, str):
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
            for kind in ATTN_CHOICES:
                jobs.append((f"attn{gi}", kind, pg.attn[kind]))
            for w in ffn_grid(pg.hidden, steps[gi]):
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
        res = {k: median(v) for k, v in samples.items()}
        groups = []
        for gi, pg in enumerate(pgroups):
            widths = ffn_grid(pg.hidden, steps[gi])
            groups.append(BlockGroup(pg.blocks, {k: res[(f"attn{gi}", k)] for k in ATTN_CHOICES}, widths,
                                     [res[(f"ffn{gi}", w)] for w in widths], pg.shape))
        sig_d = signature_lists(asdict(sig))
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

def dense_deployed(model_name: str, signature: ModelSignature, device, dtype, model_kwargs: Optional[Dict] = None,
                   num_classes: Optional[int] = None) -> nn.Module:
    """The dense deployed model (random weights) of a timm model name: what the speedups are measured against."""
    kw = dict(model_kwargs or {})
    kw.setdefault("num_classes", num_classes if num_classes is not None else signature.num_classes)
    vit = timm.create_model(model_name, pretrained=False, **kw)
    arch = Architecture(model_name, signature, [BlockArch("msa", tuple(range(h))) for h in signature.block_mlp_hidden])
    return deploy(prune(vit, arch), dtype=dtype, device=device)

