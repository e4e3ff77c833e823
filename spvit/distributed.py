"""Processes of a run: plain DDP under ``torchrun`` (env vars RANK / WORLD_SIZE / LOCAL_RANK; nccl on CUDA, gloo on
CPU), the collectives the training loop needs, and printing on the main rank."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as tdist
import torch.nn as nn

from .runs import RunError, rng_state


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


def wrap_ddp(model: nn.Module, dist: DistInfo, find_unused: bool = False, broadcast_buffers: bool = True) -> nn.Module:
    """DDP (when distributed). ``broadcast_buffers``: rank 0's buffers (BN statistics) are sent to every rank at each
    forward, as in the original DeiT code; its Swin code does not (docs/method.md §7.6)."""
    if not dist.enabled:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    with warnings.catch_warnings():  # newer torch renames the argument (same meaning): no notice for the user
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused,
                                                   broadcast_buffers=broadcast_buffers)


def broadcast_ok(ok: bool, dist: DistInfo) -> bool:
    """True on every rank when ``ok`` is true on every rank (a failure on one rank reaches all of them)."""
    if not dist.enabled:
        return ok
    t = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64,
                     device=dist.device if dist.device.type == "cuda" else torch.device("cpu"))
    tdist.all_reduce(t)
    return t.item() == 0.0


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
