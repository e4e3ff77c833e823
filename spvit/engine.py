"""Shared training machinery of search and fine-tune: run folders, DDP, optimisers, schedules, the epoch loop,
evaluation, atomic checkpoints with exact resume, metrics (CSV, TensorBoard when installed) and progress bars.

Multi-GPU is plain DDP under ``torchrun`` (env vars RANK / WORLD_SIZE / LOCAL_RANK); nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn

CHECKPOINT = "checkpoint.pth"


class RunError(ValueError):
    """Bad run input (existing run folder, nothing to resume, bad target); the CLI exits with code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Set up from torchrun's environment (single process without it). ``device``: auto, cpu, cuda or cuda:N."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but no CUDA GPU is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank if world > 1 or device == "cuda" else int(device.split(":")[1]))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def barrier(dist: DistInfo) -> None:
    if dist.enabled:
        tdist.barrier()


def all_reduce_sum(values: List[float], dist: DistInfo) -> List[float]:
    """Sum floats over ranks (float64 on CPU for gloo, on the device for nccl)."""
    if not dist.enabled:
        return values
    dev = dist.device if dist.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    tdist.all_reduce(t)
    return t.tolist()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, dist: DistInfo, find_unused: bool = False) -> nn.Module:
    if not dist.enabled:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


# ----------------------------------------------------------------------------------------------------------------
# Seeds and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: Dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Run folder, config, checkpoints


def prepare_run_dir(out: str, overwrite: bool = False, resume: bool = False, dist: Optional[DistInfo] = None) -> str:
    """Create the run folder. An existing non-empty one is an error unless ``resume`` or ``overwrite``."""
    main = dist is None or dist.main
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a folder")
    exists = os.path.isdir(out) and any(os.scandir(out))
    if resume:
        if not os.path.exists(os.path.join(out, CHECKPOINT)):
            raise RunError(f"--resume: no {CHECKPOINT} in {out} to resume from")
    elif exists:
        if not overwrite:
            raise RunError(f"run folder {out} already exists and is not empty; pass --overwrite to replace it, "
                           f"--resume to continue it, or choose another --out")
        if main:
            shutil.rmtree(out)
    if dist is not None:
        barrier(dist)
    if main:
        os.makedirs(out, exist_ok=True)
    if dist is not None:
        barrier(dist)
    return out


def save_config(cfg: Dict, out: str, name: str = "config.yaml") -> str:
    """The resolved config, as YAML, in the run folder."""
    import yaml

    path = os.path.join(out, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(tmp, path)
    return path


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path.tmp``, fsync, then rename over ``path``: the previous file stays until the new one is
    complete."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_weights(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a checkpoint file: accepts our checkpoints ({"model": ...}), timm/DeiT files, bare dicts."""
    if not os.path.exists(path):
        raise RunError(f"weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict):
        for k in ("model", "state_dict"):
            if k in obj and isinstance(obj[k], dict):
                return obj[k]
        return obj
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    raise RunError(f"{path} holds no state dict")


# ----------------------------------------------------------------------------------------------------------------
# Optimisers and schedules


def decay_groups(model: nn.Module, weight_decay: float, skip_names=("pos_embed", "cls_token")) -> List[Dict]:
    """DeiT's two groups over the non-architecture parameters: >= 2-D (not pos_embed / cls_token) get weight decay,
    1-D parameters and biases do not. ``head_probs`` (2-D) is a weight with decay (spec §4.3, Q22)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or "thresholds" in name:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in skip_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def arch_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Architecture parameters: every parameter whose name contains ``thresholds``."""
    return [p for n, p in model.named_parameters() if "thresholds" in n and p.requires_grad]


def cosine_lr(t: int, base: float, floor: float, t_initial: int, warmup_t: int = 0, warmup_lr: float = 1e-6) -> float:
    """timm's per-epoch CosineLRScheduler value at epoch ``t`` (no restarts, warm-up not as prefix)."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    if t >= t_initial:
        return floor
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / t_initial))


def epoch_lr(epoch: int, base: float, floor: float, t_initial: int, warmup_t: int = 0,
             warmup_lr: float = 1e-6) -> float:
    """The lr epoch ``epoch`` runs at in DeiT's loop: the scheduler is stepped with the finished epoch index, so epoch
    e uses the schedule value at max(e - 1, 0) (spec §4.4)."""
    t = max(epoch - 1, 0)
    return cosine_lr(t, base, floor, t_initial, warmup_t, warmup_lr)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (kept on the model's device)."""

    def __init__(self, model: nn.Module, decay: float = 0.99996):
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(m.detach(), alpha=1 - self.decay)
            else:
                e.copy_(m)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


class MetricsWriter:
    """Appends one row per epoch to ``metrics.csv`` (new columns extend the header); TensorBoard when installed."""

    def __init__(self, out: str, enabled: bool = True, tensorboard: bool = True):
        self.path = os.path.join(out, "metrics.csv")
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out, "tb"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def write(self, row: Dict) -> None:
        if not self.enabled:
            return
        rows = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = list(csv.DictReader(f))
            # a resumed run rewrites the epochs it repeats
            rows = [r for r in rows if int(r.get("epoch", -1)) < int(row["epoch"])]
        rows.append({k: _fmt(v) for k, v in row.items()})
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, int(row["epoch"]))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def progress(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar on the main rank (quiet elsewhere or when stderr is not wanted)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)


# ----------------------------------------------------------------------------------------------------------------
# Precision


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``auto``: bf16 on CUDA, fp32 on CPU; ``bf16``, ``fp16`` or ``none`` explicitly."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None, "fp32": None}[amp]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Loops


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: DistInfo, dtype: Optional[torch.dtype] = None, desc: str = "eval",
             show: bool = True) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over the (sharded) loader, summed over ranks."""
    model.eval()
    correct1 = correct5 = loss_sum = n = 0.0
    for images, target in progress(loader, len(loader), desc, show and dist.main):
        images, target = images.to(dist.device, non_blocking=True), target.to(dist.device, non_blocking=True)
        with autocast(dist.device, dtype):
            out = model(images)
        out = out.float()
        loss_sum += nn.functional.cross_entropy(out, target, reduction="sum").item()
        topk = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += (topk[:, 0] == target).sum().item()
        correct5 += (topk == target[:, None]).any(dim=1).sum().item()
        n += target.numel()
    correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], dist)
    n = max(n, 1)
    return {"acc1": 100.0 * correct1 / n, "acc5": 100.0 * correct5 / n, "loss": loss_sum / n}


def train_one_epoch(model: nn.Module, loader, optimizers: List[torch.optim.Optimizer],
                    loss_fn: Callable, dist: DistInfo, epoch: int, mixup=None, dtype: Optional[torch.dtype] = None,
                    scaler: Optional[torch.amp.GradScaler] = None, clip_grad: Optional[float] = None,
                    ema: Optional[ModelEma] = None, postfix: Optional[Callable[[], Dict]] = None,
                    show: bool = True, desc: str = "train") -> Dict[str, float]:
    """One epoch. ``loss_fn(images, logits, targets) -> (loss, {name: float})``. Every optimiser steps every
    iteration (one shared scaler for fp16); gradient clipping per optimiser when ``clip_grad``.

    Returns the epoch means of the loss parts, train accuracy (against the mixed targets' argmax) and throughput.
    """
    model.train()
    sums: Dict[str, float] = {}
    n_seen = correct = steps = 0
    t0 = time.perf_counter()
    bar = progress(loader, len(loader), f"{desc} {epoch}", show and dist.main)
    for images, target in bar:
        images, target = images.to(dist.device, non_blocking=True), target.to(dist.device, non_blocking=True)
        labels = target
        if mixup is not None:
            images, target = mixup(images, target)
        with autocast(dist.device, dtype):
            logits = model(images)
        loss, parts = loss_fn(images, logits, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {steps}; stopping")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        for opt in optimizers:
            if clip_grad:
                if scaler is not None:
                    scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        if ema is not None:
            ema.update(unwrap(model))
        steps += 1
        bs = images.shape[0]
        n_seen += bs
        correct += (logits.detach().argmax(-1) == (labels if target.dim() == 1 else target.argmax(-1))).sum().item()
        parts = {"loss": loss.item(), **parts}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        if dist.main and show and (steps % 5 == 1 or steps == len(loader)):
            elapsed = time.perf_counter() - t0
            pf = {"loss": f"{sums['loss'] / steps:.3f}", "acc": f"{100.0 * correct / n_seen:.1f}",
                  "img/s": f"{n_seen * dist.world / max(elapsed, 1e-9):.0f}"}
            if postfix is not None:
                pf.update(postfix())
            bar.set_postfix(pf)
    elapsed = time.perf_counter() - t0
    out = {f"train_{k}": v / max(steps, 1) for k, v in sums.items()}
    out["train_acc"] = 100.0 * correct / max(n_seen, 1)
    out["train_img_s"] = n_seen * dist.world / max(elapsed, 1e-9)
    out["train_time_s"] = elapsed
    return out


def gather_rng_states(dist: DistInfo) -> List[Dict]:
    """Every rank's RNG state (so a resumed DDP run continues each rank's random stream)."""
    s = rng_state()
    if not dist.enabled:
        return [s]
    out: List = [None] * dist.world
    tdist.all_gather_object(out, s)
    return out


def log(msg: str, dist: Optional[DistInfo] = None) -> None:
    if dist is None or dist.main:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The epoch loop shared by search, fine-tune and the demo's teacher training


@dataclass
class Schedule:
    """One optimiser with its per-epoch cosine schedule (timm semantics, spec §4.4)."""

    opt: torch.optim.Optimizer
    base_lr: float
    min_lr: float
    t_initial: int
    warmup_t: int = 0
    warmup_lr: float = 1e-6

    def lr(self, epoch: int) -> float:
        return epoch_lr(epoch, self.base_lr, self.min_lr, self.t_initial, self.warmup_t, self.warmup_lr)


def fit(*, model: nn.Module, schedules: List[Schedule], epochs: int, loss_fn: Callable, train_loader, train_sampler,
        val_loader, dist: DistInfo, out: str, mixup=None, dtype: Optional[torch.dtype] = None,
        scaler: Optional[torch.amp.GradScaler] = None, clip_grad: Optional[float] = None,
        ema: Optional[ModelEma] = None, resume: bool = False, stop_after_epoch: Optional[int] = None,
        after_epoch: Optional[Callable[[int, Dict], Dict]] = None, postfix: Optional[Callable[[], Dict]] = None,
        best_meta: Optional[Dict] = None, show: bool = True, desc: str = "train",
        metrics_name: str = "metrics.csv") -> Dict:
    """Train ``epochs`` epochs with per-epoch evaluation, metrics, a checkpoint every epoch and the best weights.

    The checkpoint (``out/checkpoint.pth``, atomic) holds the model, every optimiser, the scaler, the EMA, the epoch,
    the best accuracy and every rank's RNG state, so ``resume=True`` continues bit-identically. ``best.pth`` holds the
    weights (and ``best_meta``) of the epoch with the best val top-1. ``after_epoch(epoch, metrics)`` may add
    metrics (e.g. GFLOPs, gate statistics) and write per-epoch files. ``stop_after_epoch`` ends the run after that
    epoch's checkpoint (to split a run into pieces, and for the resume test).
    """
    raw = unwrap(model)
    writer = MetricsWriter(out, enabled=dist.main)
    writer.path = os.path.join(out, metrics_name)
    start, best = 0, -1.0
    ckpt_path = os.path.join(out, CHECKPOINT)
    if resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        raw.load_state_dict(ck["model"])
        for s, st in zip(schedules, ck["optimizers"]):
            s.opt.load_state_dict(st)
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema"):
            ema.module.load_state_dict(ck["ema"])
        start, best = ck["epoch"] + 1, ck.get("best_acc", -1.0)
        rngs = ck["rng"]
        if len(rngs) != dist.world:
            log(f"note: checkpoint was written by {len(rngs)} process(es), resuming with {dist.world}; "
                f"random streams restart from rank 0's state", dist)
        set_rng_state(rngs[dist.rank % len(rngs)])
        log(f"resumed from {ckpt_path} at epoch {start}", dist)
    last: Dict = {}
    for epoch in range(start, epochs):
        for s in schedules:
            set_lr(s.opt, s.lr(epoch))
        if hasattr(train_sampler, "set_epoch"):
            train_sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        m = {"epoch": epoch, **{f"lr{i}": s.lr(epoch) for i, s in enumerate(schedules)}}
        m.update(train_one_epoch(model, train_loader, [s.opt for s in schedules], loss_fn, dist, epoch, mixup=mixup,
                                 dtype=dtype, scaler=scaler, clip_grad=clip_grad, ema=ema, postfix=postfix,
                                 show=show, desc=desc))
        ev = evaluate(model, val_loader, dist, dtype, show=show)
        m.update({f"val_{k}": v for k, v in ev.items()})
        if ema is not None:
            m.update({f"ema_val_{k}": v for k, v in evaluate(ema.module, val_loader, dist, dtype, show=False).items()})
        if after_epoch is not None:
            m.update(after_epoch(epoch, m) or {})
        m["epoch_time_s"] = time.perf_counter() - t0
        improved = m["val_acc1"] > best
        best = max(best, m["val_acc1"])
        m["best_acc1"] = best
        rngs = gather_rng_states(dist)
        if dist.main:
            if improved:
                atomic_save({"model": raw.state_dict(), "epoch": epoch, "val_acc1": m["val_acc1"], **(best_meta or {})},
                            os.path.join(out, "best.pth"))
            atomic_save({"model": raw.state_dict(), "optimizers": [s.opt.state_dict() for s in schedules],
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch,
                         "best_acc": best, "rng": rngs, **(best_meta or {})}, ckpt_path)
            writer.write(m)
            extra = "".join(f"  {k} {m[k]:.4g}" for k in ("gflops",) if k in m)
            log(f"{desc} epoch {epoch}: loss {m.get('train_loss', float('nan')):.4f}  train acc {m['train_acc']:.2f}  "
                f"val acc {m['val_acc1']:.2f} (best {best:.2f}){extra}  {m['train_img_s']:.0f} img/s  "
                f"{m['epoch_time_s']:.1f}s", dist)
        barrier(dist)
        last = m
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < epochs - 1:
            log(f"stopping after epoch {epoch} (--stop-after-epoch); continue with --resume", dist)
            writer.close()
            return {"last": last, "best_acc1": best, "stopped": True}
    writer.close()
    if not last and resume:
        last = {"epoch": epochs - 1}
    return {"last": last, "best_acc1": best, "stopped": False}


# ----------------------------------------------------------------------------------------------------------------
# Models (timm by name; weights from the timm hub or a local file)


def build_timm_model(name: str, num_classes: int, pretrained: Optional[str] = None, drop_path: float = 0.0,
                     model_kwargs: Optional[Dict] = None, dist: Optional[DistInfo] = None) -> nn.Module:
    """A timm model by name. ``pretrained``: None / "none" (random init), "timm" (the timm hub; needs network),
    or a local checkpoint path (a classifier head of another size is left at its fresh init)."""
    import timm

    from . import demo  # noqa: F401  (registers the demo model, spvit_demo_vit, with timm)

    try:
        model = timm.create_model(name, pretrained=(pretrained == "timm"), num_classes=num_classes,
                                  drop_path_rate=drop_path, **(model_kwargs or {}))
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise RunError(f"unknown timm model {name!r}") from exc
        raise
    if pretrained not in (None, "", "none", "timm"):
        load_local_weights(model, pretrained, dist)
    return model


def load_local_weights(model: nn.Module, path: str, dist: Optional[DistInfo] = None) -> None:
    """Load a local checkpoint into a timm model, non-strict for a differently sized head; report what was skipped."""
    state = load_weights(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    res = model.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if k not in skipped]
    if len(missing) > len(own) // 2:
        raise RunError(f"{path} does not fit the model: {len(missing)} of {len(own)} weights missing "
                       f"(e.g. {missing[:3]})")
    msg = f"loaded {path}"
    if skipped or missing:
        msg += f" (left at init: {len(skipped) + len(missing)} tensors, e.g. {(skipped + missing)[:3]})"
    log(msg, dist)
