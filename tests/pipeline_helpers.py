"""Tiny configurations shared by the pipeline tests (search / fine-tune / resume / DDP / CLI on the digits set)."""
from __future__ import annotations

import copy
import os
import socket

TINY_MODEL = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "mlp_ratio": 2.0}


def tiny_cfg(defaults, out, **over):
    """A config (dict) for a run of a few seconds: 8x8 digits, a 2-block ViT, 128 training images, no workers."""
    cfg = copy.deepcopy(defaults.to_dict() if hasattr(defaults, "to_dict") else defaults)
    cfg.update({"model": "spvit_demo_vit", "model_kwargs": dict(TINY_MODEL), "pretrained": "none", "data": "digits",
                "out": str(out), "device": "cpu", "batch_size": 16, "epochs": 2,
                "sched_epochs": None, "num_workers": 0, "pin_mem": False, "progress": False, "tensorboard": False,
                "train_limit": 128, "val_limit": 64, "drop_path": 0.0, "repeated_aug": False, "lr": 1e-3,
                "scale_lr": False, "min_lr": 1e-5, "mixup": 0.0, "cutmix": 0.0})
    cfg.update(over)
    return cfg


def tiny_search_cfg(out, **over):
    from spvit import search

    dense = dense_gflops()
    base = {"target_gflops": 0.6 * dense, "loss_lambda": 60 / dense ** 2, "arc_lr": 0.2, "min_lr": 1e-3}
    base.update(over)
    cfg = tiny_cfg(search.DEFAULTS, out, **base)
    return cfg


def dense_gflops() -> float:
    import timm

    import spvit  # registers spvit_demo_vit with timm

    return spvit.gflops(timm.create_model("spvit_demo_vit", num_classes=10, **TINY_MODEL))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(train_limit: int = 64, val_limit: int = 32):
    """Command-line flags (with a YAML written by the caller for the rest) of a tiny run on the digits."""
    import json

    return ["--model", "spvit_demo_vit", "--model-kwargs", json.dumps(TINY_MODEL), "--pretrained", "none",
            "--data", "digits", "--device", "cpu", "--batch-size", "16", "--epochs", "1", "--num-workers", "0",
            "--no-progress", "--no-repeated-aug", "--no-scale-lr", "--mixup", "0", "--cutmix", "0"]


def tiny_yaml(folder, **over) -> str:
    import yaml

    cfg = {"train_limit": 64, "val_limit": 32, "tensorboard": False, **over}
    p = os.path.join(str(folder), "tiny.yaml")
    with open(p, "w") as f:
        yaml.safe_dump(cfg, f)
    return p
