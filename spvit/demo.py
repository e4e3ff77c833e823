"""``spvit demo``: the whole method on a laptop in minutes, offline, on the embedded UCI digits set: ``spvit compress``
(:mod:`spvit.compress`) with the demo's settings, plus the demo's table and ``demo.png``.

1. train a small ViT teacher (timm ``VisionTransformer``, 16x16 upsampled digits, patch 4: 4x4 grid + class token);
2. SPViT search under a FLOPs target (a fraction of the teacher's GFLOPs), architecture read out every epoch;
3. fine-tune the pruned model (searched weights carried over) with hard distillation from the teacher;
4. report and save the comparison (``summary.json``, plots, every stage's configs, metrics and checkpoints).

The digits are split three ways (:class:`spvit.data.DigitsDataset`): every choice (the best epoch of the teacher
and of the fine-tune) is made on the validation split; the test split is evaluated once, at the end, for the chosen
teacher and the chosen pruned model.
"""
from __future__ import annotations

import os
from typing import Dict, Union

import torch
from torch.utils.data import DataLoader

from . import compress, hub, runs
from . import distributed as D
from . import engine as E
from .checkpoints import model_from_checkpoint
from .compress_plan import CompressConfig
from .config import DemoConfig, TrainConfig
from .config import save as save_config
from .data import DigitsDataset
from .models import supernet
from .models.registry import DEMO_MODEL
from .plots import plot_demo
from .runs import RunError


def _common(o: DemoConfig) -> Dict:
    """The settings every stage of the demo shares."""
    return dict(model=DEMO_MODEL, model_kwargs=dict(o.model_kwargs), pretrained="none", data="digits",
                num_classes=10, device=o.device, seed=o.seed, batch_size=o.batch_size, progress=o.progress,
                overwrite=False, resume=False, num_workers=0, pin_mem=False, amp="auto", scale_lr=False,
                mixup=0.0, cutmix=0.0, smoothing=0.1, repeated_aug=False, drop_path=0.0, warmup_epochs=0,
                weight_decay=0.05, digits_augment=True, digits_shift=o.digits_shift, tensorboard=True,
                train_limit=o.train_limit)


def stage_config(cls, o: DemoConfig, name: str, **over):
    """The full config of one stage (saved in its sub-folder)."""
    common = dict(_common(o), out=os.path.join(o.out, name))
    common.update(over)
    return cls.from_dict(common).validate()


def train_teacher(cfg: TrainConfig):
    """Dense training of the demo ViT (no pruning, no distillation); the model selected on validation is in
    ``best.pth``."""
    compress.train_dense(cfg)
    return D.init_distributed(cfg.device)


def chosen_model(path: str) -> torch.nn.Module:
    """The model a stage selected on validation (its ``best.pth``)."""
    return model_from_checkpoint(runs.load_torch_file(path), path).eval()


def test_accuracy(model: torch.nn.Module, size: int, dist: D.DistInfo) -> float:
    """Top-1 (%) on the digits test split (used once per model, for the report)."""
    loader = DataLoader(DigitsDataset("test", size=size), batch_size=256)
    return E.evaluate(model, loader, dist, show=False)["acc1"]


def compress_config(o: DemoConfig):
    """The demo as a :class:`spvit.compress_plan.CompressConfig`: the digits, a dense teacher trained first, a FLOPs
    target of ``target_fraction`` of the teacher's, each stage with the demo's settings."""
    probe = supernet(hub.build_timm_model(DEMO_MODEL, 10, None, 0.0, o.model_kwargs), model_name=DEMO_MODEL)
    dense = probe.dense_gflops()
    train = {k: v for k, v in _common(o).items()
             if k not in ("model", "model_kwargs", "data", "device", "seed", "progress")}
    return CompressConfig(
        model=DEMO_MODEL, model_kwargs=dict(o.model_kwargs), pretrained="none", data="digits", out=o.out,
        overwrite=o.overwrite, device=o.device, seed=o.seed, threads=o.threads, progress=o.progress,
        target_gflops=o.target_fraction * dense, ffn_align=0, recipe="none", teacher_epochs=o.teacher_epochs,
        distillation=o.distillation, train=train, teacher={"lr": o.teacher_lr, "min_lr": 1e-5},
        search={"epochs": o.search_epochs, "sched_epochs": o.search_epochs, "lr": o.search_lr,
                "min_lr": o.search_lr, "arc_lr": o.arc_lr, "loss_lambda": o.lambda_rel / dense ** 2},
        finetune={"epochs": o.finetune_epochs, "lr": o.finetune_lr, "min_lr": 1e-5},
        report_style="demo").validate()


def summary_hook(summary: Dict, ctx: Dict) -> Dict:
    """The demo's figures on top of the compress summary: test accuracy (once) of the teacher and of the pruned
    model chosen on validation, the FLOPs cut, the splits; and ``demo.png``."""
    cfg, m = ctx["plan"].cfg, ctx["measure"]
    size = int(cfg.model_kwargs["img_size"])
    splits = DigitsDataset.split_indices(1797)
    limit = cfg.train.get("train_limit")
    n_train = len(splits["train"]) if limit is None else min(limit, len(splits["train"]))
    demo = {
        "teacher_acc": round(m["dense_test_acc"], 3), "pruned_acc": round(m["compressed_test_acc"], 3),
        "teacher_gflops": m["dense_gflops"], "pruned_gflops": m["compressed_gflops"],
        "target_gflops": cfg.target_gflops, "flops_cut": 1 - m["compressed_gflops"] / m["dense_gflops"],
        "teacher_params": m["dense_params"], "pruned_params": m["compressed_params"],
        "wall_s": round(ctx["wall_s"], 1),
        "seed": cfg.seed, "device": str(torch.device(cfg.device)), "threads": torch.get_num_threads(),
        "train_images": n_train, "val_images": len(splits["val"]), "test_images": len(splits["test"]),
        "selection": "best epoch on the validation split (teacher and fine-tune); test split evaluated once",
        "dataset": "UCI Optical Recognition of Handwritten Digits (CC BY 4.0), 8x8 upsampled to "
                   f"{size}x{size}",
    }
    summary = {**summary, **demo}
    try:
        plot_demo(cfg.out, summary)
    except ImportError:
        D.log("(matplotlib not installed: plots skipped)")
    return summary


def run(opts: Union[DemoConfig, Dict]) -> Dict:
    """Run the demo (``spvit compress`` on the digits, :func:`compress_config`); returns the summary (also written
    to ``out/summary.json``)."""
    o = DemoConfig.from_dict(opts) if isinstance(opts, dict) else opts
    o = o.validate()
    runs.check_out(o.out, o.overwrite)
    try:  # before any training: the target must be reachable
        ccfg = compress_config(o)
    except ValueError as exc:
        raise RunError(f"--target-fraction {o.target_fraction:g}: {exc}") from None
    summary = compress.run(ccfg, hook=summary_hook, on_open=lambda out: save_config(o, os.path.join(out, "demo.yaml")))
    D.log(format_table(summary))
    D.log(f"run folder: {o.out}")
    return summary


def format_table(s: Dict) -> str:
    """The demo's result table (teacher vs pruned, then per-block choices)."""
    cut = 100 * s["flops_cut"]
    lines = [
        "",
        f"{'':22s}{'teacher':>12s}{'SPViT pruned':>15s}",
        f"{'test accuracy (%)':22s}{s['teacher_acc']:12.2f}{s['pruned_acc']:15.2f}",
        f"{'GFLOPs (MACs/1e9)':22s}{s['teacher_gflops']:12.5f}{s['pruned_gflops']:15.5f}",
        f"{'MFLOPs':22s}{1e3 * s['teacher_gflops']:12.2f}{1e3 * s['pruned_gflops']:15.2f}",
        f"{'params':22s}{s['teacher_params']:12,d}{s['pruned_params']:15,d}",
        f"FLOPs cut {cut:.1f}%, accuracy change {s['pruned_acc'] - s['teacher_acc']:+.2f} points, "
        f"wall time {s['wall_s']:.0f} s ({s['threads']} threads on {s['device']})",
        f"splits: {s['train_images']} train / {s['val_images']} validation (model selection) / {s['test_images']} "
        f"test (reported once)",
        "",
        "block  attention  FFN units kept",
    ]
    for b in s["blocks"]:
        lines.append(f"{b['block']:5d}  {b['attn']:>9s}  {b['ffn_kept']:4d}/{b['ffn_total']}")
    return "\n".join(lines)
