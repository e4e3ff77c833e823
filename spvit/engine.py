"""A run of search, fine-tune or the demo's teacher training: its setup (process group, data, loaders, seeds), its
folder (opened on rank 0, every rank told of a failure) and the epoch loop with evaluation, exact resume and
crash-consistent outputs.

The processes are :mod:`spvit.distributed`, the optimisers and schedules :mod:`spvit.optim`, the models by name
:mod:`spvit.hub`; files are written through :mod:`spvit.runs` and the configuration is a typed
:class:`spvit.config.TrainConfig`. This module imports neither search, fine-tune nor the demo.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import interrupts, runs
from .checkpoints import load_state
from .config import TrainConfig
from .config import save as save_config
from .config import without_run_control
from .data import DataConfig, DataError, build_datasets, build_loaders, build_mixup, check_data_config
from .distributed import (DistInfo, all_reduce_sum, barrier, broadcast_ok, gather_rng_states, init_distributed, log,
                          unwrap)
from .optim import ModelEma, Schedule, autocast, set_lr
from .runs import CHECKPOINT, RunError, set_rng_state

__all__ = ["Setup", "setup", "run_folder", "fit", "evaluate", "TrainingError"]


# ----------------------------------------------------------------------------------------------------------------
# Setup: data, loaders, seeds


@dataclass
class Setup:
    """What a run trains on: the process group, the datasets and loaders, Mixup and the number of classes."""

    dist: DistInfo
    train_set: object
    val_set: object
    train_loader: object
    sampler: object
    val_loader: object
    mixup: object
    num_classes: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_config(cfg: TrainConfig, input_size: int) -> DataConfig:
    keys = DataConfig.__dataclass_fields__.keys()
    values = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    values["input_size"] = input_size
    return DataConfig(**values)


# image-folder augmentation settings that the digits set does not use (Mixup, CutMix and smoothing do apply)
IMAGE_AUGMENTATION = ("aa", "color_jitter", "reprob", "remode", "recount", "train_interpolation", "crop_pct")


def ignored_augmentation(cfg: TrainConfig) -> List[str]:
    """The image-folder augmentation settings of ``cfg`` changed from their defaults (unused with the digits)."""
    defaults = type(cfg)()
    return [f"{k}={getattr(cfg, k)!r}" for k in IMAGE_AUGMENTATION
            if hasattr(cfg, k) and getattr(cfg, k) != getattr(defaults, k)]


def check_channels(st: "Setup", in_chans: int) -> None:
    """Raise :class:`DataError` unless the images of the data have the model's channel count (one sample)."""
    sample = st.val_set[0][0]
    if sample.dim() != 3 or sample.shape[0] != in_chans:
        have = sample.shape[0] if sample.dim() == 3 else f"shape {tuple(sample.shape)}"
        raise DataError(f"the model takes {in_chans}-channel images, the data gives {have} channel(s) (an image "
                        f"folder is read as RGB, the digits as 1 channel); set in_chans in --model-kwargs to match")


def setup(cfg: TrainConfig, input_size: int, need_train: bool = True) -> Setup:
    """Process group, data and loaders, seeds (nothing is written)."""
    dist = init_distributed(cfg.device)
    if not cfg.data:
        raise RunError("--data is required (an ImageNet-layout folder, or 'digits' for the embedded demo set)")
    dcfg = data_config(cfg, input_size)
    if cfg.data == "digits":
        if cfg.digits_augment and cfg.digits_shift >= input_size:
            raise DataError(f"digits_shift {cfg.digits_shift} must be smaller than the image size ({input_size})")
        ignored = ignored_augmentation(cfg)
        if ignored and need_train:
            log(f"note: --data digits uses its own augmentation (random shifts, digits_shift); ignored: "
                f"{', '.join(ignored)}", dist)
    else:
        check_data_config(dcfg)
    train_set, val_set = build_datasets(cfg.data, dcfg, need_train=need_train)
    if cfg.data == "digits" and train_set is not None:
        train_set.augment = bool(cfg.digits_augment)
        train_set.max_shift = int(cfg.digits_shift)
    num_classes = val_set.num_classes
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise DataError(f"--num-classes {cfg.num_classes} disagrees with the dataset, which has {num_classes} "
                        f"classes; leave --num-classes out to take it from the data")
    if cfg.train_limit and train_set is not None:
        train_set = Subset(train_set, range(min(cfg.train_limit, len(train_set))))
    if cfg.val_limit:
        val_set = Subset(val_set, range(min(cfg.val_limit, len(val_set))))
    seed_everything(cfg.seed + dist.rank)
    bs = cfg.batch_size
    if train_set is not None and len(train_set) < bs * dist.world:
        raise RunError(f"the training set has {len(train_set)} images, fewer than one global batch "
                       f"({bs} x {dist.world}); lower --batch-size")
    train_loader, sampler, val_loader = build_loaders(
        train_set, val_set, bs, dist.world, dist.rank, repeated_aug=cfg.repeated_aug and train_set is not None,
        num_workers=cfg.num_workers, pin_memory=cfg.pin_mem and dist.device.type == "cuda", seed=cfg.seed,
        eval_batch_size=cfg.eval_batch_size)
    mixup = build_mixup(dcfg, num_classes) if train_set is not None else None
    for loader in (train_loader, val_loader):
        interrupts.quiet_workers(loader)
    return Setup(dist, train_set, val_set, train_loader, sampler, val_loader, mixup, num_classes)


# ----------------------------------------------------------------------------------------------------------------
# The epoch loop shared by search, fine-tune and the demo's teacher training


def progress(iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar on the main rank (quiet elsewhere, when stderr is not wanted, or when stderr is not a terminal: a
    log file then gets the one line per epoch of :func:`fit` and no carriage-return bar text)."""
    enabled = enabled and _stderr_is_terminal()
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _batches(loader) -> Iterator:
    """The loader's iterator for one pass, made once, with stop signals held while it forks its workers
    (:func:`spvit.interrupts.start`).

    Before, the loader itself went to tqdm, whose constructor makes an iterator of its own that was never read: for a
    loader with workers, a second set of worker processes per pass, each loading its prefetched batches for nothing.
    Making that iterator drew one number from the loader's random generator (the workers' base seed); the draw is kept,
    so that a seed still gives the same run, bit for bit, as before (the recorded results in bench/results)."""
    if isinstance(loader, DataLoader):
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    return interrupts.start(loader)


@torch.no_grad()
def evaluate(model: nn.Module, loader, dist: DistInfo, dtype: Optional[torch.dtype] = None, desc: str = "eval",
             show: bool = True) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over the (sharded) loader, summed over ranks."""
    model.eval()
    correct1 = correct5 = loss_sum = n = 0.0
    for images, target in progress(_batches(loader), len(loader), desc, show and dist.main):
        interrupts.check()  # a stop signal whose first raise was dropped (at a DataLoader's fork)
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
                    show: bool = True, desc: str = "train",
                    lr_hook: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """One epoch. ``loss_fn(images, logits, targets) -> (loss, {name: float})``. Every optimiser steps every
    iteration (one shared scaler for fp16); gradient clipping per optimiser when ``clip_grad``. ``lr_hook(step)``
    runs before every iteration (per-iteration schedules).

    Returns the epoch means of the loss parts, train accuracy (against the mixed targets' argmax) and throughput.
    """
    model.train()
    sums: Dict[str, float] = {}
    n_seen = correct = steps = 0
    t0 = time.perf_counter()
    bar = progress(_batches(loader), len(loader), f"{desc} {epoch}", show and dist.main)
    for images, target in bar:
        interrupts.check()  # a stop signal whose first raise was dropped (at a DataLoader's fork)
        if lr_hook is not None:
            lr_hook(steps)
        images, target = images.to(dist.device, non_blocking=True), target.to(dist.device, non_blocking=True)
        labels = target
        if mixup is not None:
            images, target = mixup(images, target)
        with autocast(dist.device, dtype):
            logits = model(images)
        loss, parts = loss_fn(images, logits, target)
        if not torch.isfinite(loss):
            raise Diverged(loss.item(), epoch, steps)
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


class Diverged(Exception):
    """The training loss became NaN or infinite (raised by :func:`train_one_epoch`; :func:`fit` reports it)."""

    def __init__(self, value: float, epoch: int, step: int):
        super().__init__(f"the loss became {value} at step {step} of epoch index {epoch}")
        self.value, self.epoch, self.step = value, epoch, step


class TrainingError(Exception):
    """An unexpected failure while training (not the user's input): the CLI prints one line and exits with code 1."""


# settings that make a run diverge when far from their defaults, with the direction that does it: the one furthest
# (in orders of magnitude) from its default is named when the loss becomes NaN / inf
DIVERGENCE_SUSPECTS = {"lr": 1, "loss_lambda": 1, "arc_lr": 1, "theta": 1, "warmup_lr": 1, "alpha": -1,
                       "distillation_tau": -1, "opt_eps": -1}


def likely_divergence_cause(cfg) -> str:
    """The setting of ``cfg`` most likely to make a run diverge (furthest above, or for temperatures below, its
    default), as ``--lr 1e+308``; ``--lr`` when none stands out."""
    defaults = type(cfg)() if cfg is not None else None
    best, score = "lr", 0.0
    for name, sign in DIVERGENCE_SUSPECTS.items():
        v, d = getattr(cfg, name, None), getattr(defaults, name, None)
        if name == "alpha" and d is None:  # the family's default: 0.01 for DeiT (Swin's 100 is further still)
            d = 0.01
        if not isinstance(v, (int, float)) or not isinstance(d, (int, float)) or v == 0 or d == 0:
            continue
        r = sign * math.log10(abs(v) / abs(d)) if math.isfinite(v) else math.inf
        if r > score:
            best, score = name, r
    value = getattr(cfg, best, None)
    return f"--{best.replace('_', '-')}" + (f" {value:g}" if isinstance(value, (int, float)) else "")


def _failure_line(exc: BaseException) -> str:
    """``Type: message`` in one line (the last line of a re-raised DataLoader worker error)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught"):
        return lines[-1][:300]
    return f"{type(exc).__name__}: {' '.join(lines)[:300]}" if lines else type(exc).__name__


def _interrupted_in(signum: int, desc: str, epoch: int, epochs: int, saved: Optional[int],
                    resume_hint: Optional[str]) -> "interrupts.Interrupted":
    """The stop of a training loop by a signal: where it stopped and how to continue (epochs counted from 1)."""
    if saved is None:
        how = ("no checkpoint was written yet, so there is nothing to resume: start the run again "
               "(with --overwrite for the same --out)")
    elif resume_hint:
        how = f"the last checkpoint is after epoch {saved + 1}/{epochs}; continue with `{resume_hint}`"
    else:
        how = f"the last checkpoint is after epoch {saved + 1}/{epochs}"
    name = signal.Signals(signum).name
    return interrupts.Interrupted(f"interrupted ({name}) in {desc} epoch {epoch + 1}/{epochs}; {how}", signum)


# ----------------------------------------------------------------------------------------------------------------
# The run folder of a (possibly distributed) run


@contextlib.contextmanager
def run_folder(cfg: TrainConfig, dist: DistInfo) -> Iterator[str]:
    """Open (create, lock, clean for ``--overwrite``, mark) ``cfg.out`` on rank 0 for the duration of the block.
    Every rank learns when rank 0 failed. Call after all validation: this is a run's first write."""
    lock, err = None, None
    if dist.main:
        try:
            lock = runs.open_run(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
        except (RunError, OSError) as exc:
            err = exc
    if not broadcast_ok(err is None, dist):
        if err is not None:
            raise err
        raise RunError("rank 0 could not open the run folder")
    try:
        yield cfg.out
    finally:
        if lock is not None:
            lock.release()


def save_run_config(cfg, out: str, dist: DistInfo, name: str = "config.yaml") -> None:
    if dist.main:
        save_config(without_run_control(cfg), os.path.join(out, name))


def read_checkpoint(path: str) -> Dict:
    """A resumable checkpoint of a run (safe load; the keys a resume needs are checked)."""
    ck = runs.load_torch_file(path, "checkpoint")
    need = ("model", "optimizers", "epoch", "rng")
    if not isinstance(ck, dict) or any(k not in ck for k in need):
        raise RunError(f"{path} is not a resumable checkpoint of spvit (it lacks "
                       f"{', '.join(k for k in need if not isinstance(ck, dict) or k not in ck)})")
    return ck


def _lr_hook(schedules: List[Schedule], epoch: int, n_steps: int) -> Callable[[int], None]:
    """Sets every per-step schedule's learning rate before step ``step`` of ``epoch``."""
    def hook(step: int) -> None:
        for s in schedules:
            set_lr(s.opt, s.lr_at(epoch, step, n_steps))
    return hook


def fit(*, model: nn.Module, schedules: List[Schedule], epochs: int, loss_fn: Callable, train_loader, train_sampler,
        val_loader, dist: DistInfo, out: str, mixup=None, dtype: Optional[torch.dtype] = None,
        scaler: Optional[torch.amp.GradScaler] = None, clip_grad: Optional[float] = None,
        ema: Optional[ModelEma] = None, resume: bool = False, stop_after_epoch: Optional[int] = None,
        after_epoch: Optional[Callable[[int, Dict], Dict]] = None,
        write_epoch: Optional[Callable[[int, Dict], None]] = None, postfix: Optional[Callable[[], Dict]] = None,
        best_meta: Optional[Dict] = None, show: bool = True, desc: str = "train", tensorboard: bool = False,
        resume_hint: Optional[str] = None, epoch_notes: Optional[Callable[[int, Dict], Optional[str]]] = None,
        cfg=None) -> Dict:
    """Train ``epochs`` epochs with per-epoch evaluation, metrics, a checkpoint every epoch and the best weights.

    The checkpoint (``out/checkpoint.pth``) holds the model, every optimiser, the scaler, the EMA, the epoch, the
    best accuracy and every rank's RNG state (all loadable with ``weights_only=True``), so ``resume=True`` continues
    bit-identically. ``best.pth`` holds the weights (and ``best_meta``) of the epoch with the best val top-1.
    ``after_epoch(epoch, metrics)`` may add metrics; ``write_epoch(epoch, metrics)`` writes per-epoch files (rank 0).
    Per epoch, on rank 0: ``write_epoch``, the ``metrics.csv`` row, ``best.pth``, then the checkpoint, each written
    atomically; a resume trims the logs to the checkpoint's epoch. SIGINT / SIGTERM stop the run (deferred while
    files are written) with :class:`spvit.interrupts.Interrupted`, whose message says how to continue.
    ``epoch_notes(epoch, metrics)`` may return lines printed under the epoch's line. A NaN / inf loss is a
    :class:`RunError` naming the setting of ``cfg`` that most likely caused it (the last checkpoint is kept); any
    other unexpected exception of the loop is a :class:`TrainingError` (one line naming it).
    """
    raw = unwrap(model)
    ckpt_path = os.path.join(out, CHECKPOINT)
    metrics_path = os.path.join(out, "metrics.csv")
    start, best, saved = 0, -1.0, None
    if resume:
        ck = read_checkpoint(ckpt_path)
        load_state(raw, ck["model"], ckpt_path, "checkpoint")
        if len(ck["optimizers"]) != len(schedules):
            raise RunError(f"{ckpt_path} holds {len(ck['optimizers'])} optimiser(s), this run has {len(schedules)}")
        try:
            for s, st in zip(schedules, ck["optimizers"]):
                s.opt.load_state_dict(st)
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise RunError(f"{ckpt_path}: the optimiser state does not fit this run ({exc})") from None
        if ema is not None and ck.get("ema"):
            load_state(ema.module, ck["ema"], ckpt_path, "checkpoint (EMA)")
        start, best, saved = int(ck["epoch"]) + 1, float(ck.get("best_acc", -1.0)), int(ck["epoch"])
        rngs = ck["rng"]
        if len(rngs) != dist.world:
            log(f"note: checkpoint was written by {len(rngs)} process(es), resuming with {dist.world}; "
                f"random streams restart from rank 0's state", dist)
        set_rng_state(rngs[dist.rank % len(rngs)])
        if dist.main:
            runs.trim_logs(out, saved)
        log(f"resumed from {ckpt_path} at epoch {start}", dist)
    tb = None
    if tensorboard and dist.main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(os.path.join(out, "tb"))
        except Exception:  # tensorboard not installed
            tb = None
    last: Dict = {}
    stopped = False
    epoch = start
    t_run, done = time.perf_counter(), 0
    try:
        with interrupts.StopSignals() as sig:
            for epoch in range(start, epochs):
                runs.CURRENT_EPOCH = epoch
                n_steps = len(train_loader)
                for s in schedules:
                    set_lr(s.opt, s.lr_at(epoch, 0, n_steps))
                if hasattr(train_sampler, "set_epoch"):
                    train_sampler.set_epoch(epoch)
                t0 = time.perf_counter()
                m = {"epoch": epoch, **{f"lr{i}": s.lr_at(epoch, 0, n_steps) for i, s in enumerate(schedules)}}
                hook = _lr_hook(schedules, epoch, n_steps) if any(s.per_step for s in schedules) else None
                m.update(train_one_epoch(model, train_loader, [s.opt for s in schedules], loss_fn, dist, epoch,
                                         mixup=mixup, dtype=dtype, scaler=scaler, clip_grad=clip_grad, ema=ema,
                                         postfix=postfix, show=show, desc=desc, lr_hook=hook))
                ev = evaluate(model, val_loader, dist, dtype, show=show)
                m.update({f"val_{k}": v for k, v in ev.items()})
                if ema is not None:
                    m.update({f"ema_val_{k}": v
                              for k, v in evaluate(ema.module, val_loader, dist, dtype, show=False).items()})
                if after_epoch is not None:
                    m.update(after_epoch(epoch, m) or {})
                m["epoch_time_s"] = time.perf_counter() - t0
                improved = m["val_acc1"] > best
                best = max(best, m["val_acc1"])
                m["best_acc1"] = best
                rngs = gather_rng_states(dist)
                runs.crash_point("after_train", epoch)
                with sig.critical():
                    if dist.main:
                        # logs and read-outs first, then the checkpoint that covers them (resume trims the logs)
                        if write_epoch is not None:
                            write_epoch(epoch, m)
                        runs.log_epoch_row(metrics_path, m)
                        runs.crash_point("after_metrics", epoch)
                        if improved:
                            runs.save_torch({"model": raw.state_dict(), "epoch": epoch, "val_acc1": m["val_acc1"],
                                             **(best_meta or {})}, os.path.join(out, "best.pth"))
                        runs.crash_point("after_best", epoch)
                        opts = [s.opt.state_dict() for s in schedules]
                        runs.save_torch({"model": raw.state_dict(), "optimizers": opts,
                                         "scaler": scaler.state_dict() if scaler is not None else None,
                                         "ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch,
                                         "best_acc": best, "rng": rngs, **(best_meta or {})}, ckpt_path)
                        runs.crash_point("after_checkpoint", epoch)
                        if tb is not None:
                            for k, v in m.items():
                                if isinstance(v, (int, float)) and k != "epoch":
                                    tb.add_scalar(k, v, epoch)
                            tb.flush()
                        extra = "".join(f"  {k} {m[k]:.4g}" for k in ("gflops",) if k in m)
                        done += 1
                        left = (time.perf_counter() - t_run) / done * (epochs - 1 - epoch)
                        eta = f"  ETA {format_duration(left)}" if epoch < epochs - 1 else "  done"
                        log(f"{desc} epoch {epoch + 1}/{epochs}: loss {m.get('train_loss', float('nan')):.4f}  "
                            f"train acc {m['train_acc']:.2f}  val acc {m['val_acc1']:.2f} (best {best:.2f}){extra}  "
                            f"{m['train_img_s']:.0f} img/s  {m['epoch_time_s']:.1f}s{eta}", dist)
                        note = epoch_notes(epoch, m) if epoch_notes is not None else None
                        if note:
                            log(note, dist)
                    saved = epoch
                    barrier(dist)
                last = m
                if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < epochs - 1:
                    log(f"stopping after epoch {epoch + 1}/{epochs} (--stop-after-epoch {stop_after_epoch}); "
                        f"continue with {resume_hint or '--resume'}", dist)
                    stopped = True
                    break
    except interrupts.Interrupted as exc:
        raise _interrupted_in(exc.signum, desc, epoch, epochs, saved, resume_hint) from None
    except Diverged as exc:  # epochs are counted from 1 in messages, as in the epoch lines
        kept = (f"the last good checkpoint (after epoch {saved + 1}/{epochs}) is kept: continue from it with "
                f"`{resume_hint or '--resume'} --allow-changes` and a smaller value" if saved is not None else
                "no checkpoint was written yet: start again with a smaller value (--overwrite for the same --out)")
        raise RunError(f"{desc} diverged: the loss became {exc.value} in epoch {exc.epoch + 1}/{epochs} (step "
                       f"{exc.step + 1}); likely cause: {likely_divergence_cause(cfg)}; {kept}") from None
    except (RunError, DataError, OSError, interrupts.Interrupted, KeyboardInterrupt):  # reported as they are
        raise
    except Exception as exc:  # a failure of the training machinery, not of the user's input
        signum = interrupts.worker_killed_by_stop(exc)
        if signum is not None:  # a worker killed by the same stop signal, heard of as the stop unwound
            raise _interrupted_in(signum, desc, epoch, epochs, saved, resume_hint) from None
        # a dead torchrun peer is said by the CLI
        if os.environ.get("SPVIT_TRACEBACK") == "1" or interrupts.peer_lost(exc):
            raise
        ck = (f"the last checkpoint is after epoch {saved + 1}/{epochs}" if saved is not None else
              "no checkpoint was written yet")
        raise TrainingError(f"{desc} failed in epoch {epoch + 1}/{epochs} ({_failure_line(exc)}); {ck}; "
                            f"SPVIT_TRACEBACK=1 shows where") from None
    finally:
        runs.CURRENT_EPOCH = -1
        if tb is not None:
            tb.close()
    if not last and resume:
        last = {"epoch": epochs - 1}
        log(f"{ckpt_path} already covers all {epochs} epochs; nothing left to run", dist)
    return {"last": last, "best_acc1": best, "stopped": stopped}
