"""``spvit demo``: the whole method on a laptop in minutes, offline, on the embedded UCI digits set.

1. train a small ViT teacher (timm ``VisionTransformer``, 16x16 upsampled digits, patch 4: 4x4 grid + class token);
2. SPViT search under a FLOPs target (a fraction of the teacher's GFLOPs), architecture read out every epoch;
3. fine-tune the pruned model (searched weights carried over) with hard distillation from the teacher;
4. print and save the comparison (``summary.json``, plots, every sub-run's configs, metrics and checkpoints).
"""
from __future__ import annotations

import copy
import os
import time
from typing import Dict

import torch

from . import engine as E

DEMO_MODEL = "spvit_demo_vit"

# The demo's settings (each stage's full config is saved in its sub-folder).
DEFAULTS: Dict = {
    "out": "spvit_demo",
    "overwrite": False,
    "device": "cpu",
    "seed": 0,
    "threads": None,
    "progress": True,
    "model_kwargs": {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 6, "num_heads": 4,
                     "mlp_ratio": 4.0},
    "batch_size": 32,
    "digits_shift": 1,
    "teacher_epochs": 30,
    "teacher_lr": 2e-3,
    "search_epochs": 10,
    "search_lr": 5e-4,
    "arc_lr": 2e-2,
    "target_fraction": 0.6,
    # lambda of the FLOPs loss relative to the model size: lambda = lambda_rel / dense_gflops^2, so the loss is
    # lambda_rel * (T/F_dense - F/F_dense)^2 (DeiT-S's lambda 3 at 4.59 G is lambda_rel ~ 63)
    "lambda_rel": 60.0,
    "finetune_epochs": 15,
    "finetune_lr": 5e-4,
    "distillation": "hard",
    "train_limit": None,  # quick runs / tests only
}


def _register() -> None:
    """Register ``spvit_demo_vit`` with timm (a plain timm VisionTransformer; sizes come as kwargs)."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(DEMO_MODEL):
        return

    @register_model
    def spvit_demo_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
        """Small ViT for the 8x8 digits demo: 16x16 one-channel input, patch 4, dim 64, depth 6, 4 heads."""
        if pretrained:
            raise ValueError("spvit_demo_vit has no pretrained weights")
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        args = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=6, num_heads=4,
                    mlp_ratio=4.0, class_token=True, global_pool="token")
        args.update(kwargs)
        model = VisionTransformer(**args)
        model.pretrained_cfg = {"architecture": DEMO_MODEL, "num_classes": args["num_classes"]}
        return model


_register()


def _stage_cfg(base: Dict, stage_defaults: Dict, **over) -> Dict:
    cfg = copy.deepcopy(stage_defaults)
    cfg.update({"model": DEMO_MODEL, "model_kwargs": base["model_kwargs"], "pretrained": "none", "data": "digits",
                "num_classes": 10, "device": base["device"], "seed": base["seed"], "batch_size": base["batch_size"],
                "progress": base["progress"], "overwrite": True, "resume": False, "num_workers": 0, "pin_mem": False,
                "amp": "auto", "scale_lr": False, "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.1,
                "repeated_aug": False, "drop_path": 0.0, "warmup_epochs": 0, "weight_decay": 0.05,
                "digits_size": base["model_kwargs"]["img_size"], "digits_augment": True,
                "digits_shift": base["digits_shift"], "tensorboard": True,
                "train_limit": base.get("train_limit")})
    cfg.update(over)
    return cfg


def train_teacher(cfg: Dict):
    """Dense training of the demo ViT (no pruning, no distillation)."""
    from .search import setup, task_loss_fn

    dist, _, _, train_loader, sampler, val_loader, mixup = setup(cfg)
    E.save_config(cfg, cfg["out"])
    model = E.build_timm_model(cfg["model"], cfg["num_classes"], None, cfg["drop_path"], cfg["model_kwargs"], dist)
    model.to(dist.device)
    opt = torch.optim.AdamW(E.decay_groups(model, cfg["weight_decay"]), lr=cfg["lr"])
    sched = E.Schedule(opt, cfg["lr"], cfg["min_lr"], cfg["epochs"], cfg["warmup_epochs"], cfg["warmup_lr"])
    task = task_loss_fn(cfg["smoothing"], False)
    res = E.fit(model=E.wrap_ddp(model, dist), schedules=[sched], epochs=cfg["epochs"],
                loss_fn=lambda im, lo, y: (task(lo, y), {}), train_loader=train_loader, train_sampler=sampler,
                val_loader=val_loader, dist=dist, out=cfg["out"], dtype=E.amp_dtype(cfg["amp"], dist.device),
                best_meta={"model_name": cfg["model"], "model_kwargs": cfg["model_kwargs"], "num_classes": 10},
                show=cfg["progress"], desc="teacher")
    return model, res, dist


def run(opts: Dict) -> Dict:
    """Run the demo; returns the summary (also written to ``out/summary.json``)."""
    import spvit

    from . import finetune, search
    from .plots import plot_demo

    o = {**DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    if o["threads"]:
        torch.set_num_threads(int(o["threads"]))
    out = o["out"]
    E.prepare_run_dir(out, overwrite=o["overwrite"])
    E.save_config(o, out, "demo.yaml")
    t_start = time.perf_counter()
    times = {}

    # 1. teacher
    E.log("== 1/3 teacher: dense ViT on the UCI digits ==")
    t0 = time.perf_counter()
    tcfg = _stage_cfg(o, search.COMMON_DEFAULTS, out=os.path.join(out, "teacher"), epochs=o["teacher_epochs"],
                      lr=o["teacher_lr"], min_lr=1e-5, warmup_epochs=0)
    teacher, tres, dist = train_teacher(tcfg)
    teacher.eval()
    teacher_acc = E.evaluate(teacher, _val_loader(tcfg), dist, show=False)["acc1"]
    times["teacher_s"] = time.perf_counter() - t0

    # 2. search
    E.log("== 2/3 SPViT search ==")
    t0 = time.perf_counter()
    sn = spvit.supernet(copy.deepcopy(teacher), theta=1.5, alpha=1e-2, model_name=DEMO_MODEL)
    dense = sn.dense_gflops()
    target = o["target_fraction"] * dense
    scfg = _stage_cfg(o, search.DEFAULTS, out=os.path.join(out, "search"), epochs=o["search_epochs"],
                      sched_epochs=o["search_epochs"], lr=o["search_lr"], min_lr=o["search_lr"], arc_lr=o["arc_lr"],
                      target_gflops=target, loss_lambda=o["lambda_rel"] / dense ** 2)
    sres = search.run(scfg, supernet=sn)
    arch = spvit.Architecture.load(sres["arch"])
    E.log(arch.summary())
    times["search_s"] = time.perf_counter() - t0

    # 3. fine-tune with hard distillation from the teacher
    E.log("== 3/3 fine-tune the pruned model (distillation: %s) ==" % o["distillation"])
    t0 = time.perf_counter()
    fcfg = _stage_cfg(o, finetune.DEFAULTS, out=os.path.join(out, "finetune"), arch=os.path.join(out, "search",
                      "arch.json"), init="search", epochs=o["finetune_epochs"], lr=o["finetune_lr"], min_lr=1e-5,
                      distillation=o["distillation"], teacher=os.path.join(out, "teacher", "teacher_model.pth"))
    torch.save(teacher, os.path.join(out, "teacher", "teacher_model.pth"))
    fres = finetune.run(fcfg, source=sn, teacher=teacher)
    pruned = fres["model"]
    pruned.eval()
    pruned_acc = E.evaluate(pruned, _val_loader(fcfg), dist, show=False)["acc1"]
    times["finetune_s"] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start

    summary = {
        "teacher_acc": round(teacher_acc, 3), "pruned_acc": round(pruned_acc, 3),
        "teacher_gflops": spvit.gflops(teacher), "pruned_gflops": spvit.gflops(pruned),
        "target_gflops": target, "flops_cut": 1 - spvit.gflops(pruned) / spvit.gflops(teacher),
        "teacher_params": spvit.count_params(teacher), "pruned_params": spvit.count_params(pruned),
        "wall_s": round(wall, 1), "stage_s": {k: round(v, 1) for k, v in times.items()},
        "blocks": [{"block": i, "attn": b.attn, "ffn_kept": b.ffn_width, "ffn_total": arch.signature.mlp_hidden}
                   for i, b in enumerate(arch.blocks)],
        "device": str(dist.device), "threads": torch.get_num_threads(), "test_images": 360, "train_images": 1437,
        "dataset": "UCI Optical Recognition of Handwritten Digits (CC BY 4.0), 8x8 upsampled to "
                   f"{o['model_kwargs']['img_size']}x{o['model_kwargs']['img_size']}",
    }
    E.write_json(summary, os.path.join(out, "summary.json"))
    try:
        plot_demo(out, summary)
    except ImportError:
        E.log("(matplotlib not installed: plots skipped)")
    E.log(format_table(summary))
    E.log(f"run folder: {out}")
    return summary


def _val_loader(cfg: Dict):
    from .data import DigitsDataset
    from torch.utils.data import DataLoader

    return DataLoader(DigitsDataset(train=False, size=cfg["digits_size"]), batch_size=256)


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
        "",
        "block  attention  FFN units kept",
    ]
    for b in s["blocks"]:
        lines.append(f"{b['block']:5d}  {b['attn']:>9s}  {b['ffn_kept']:4d}/{b['ffn_total']}")
    return "\n".join(lines)
