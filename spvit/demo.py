"""``spvit demo``: the whole method on a laptop in minutes, offline, on the embedded UCI digits set.

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
import time
from typing import Dict, Union

import torch
from torch.utils.data import DataLoader

from . import engine as E
from . import finetune, runs, search
from .arch import Architecture
from .config import DemoConfig, FinetuneConfig, SearchConfig, TrainConfig
from .config import save as save_config
from .data import DigitsDataset
from .flops import count_params, gflops
from .models import supernet
from .models.registry import DEMO_MODEL
from .plots import plot_demo


def _stage(cls, o: DemoConfig, name: str, **over):
    """The full config of one stage (saved in its sub-folder)."""
    common = dict(model=DEMO_MODEL, model_kwargs=dict(o.model_kwargs), pretrained="none", data="digits",
                  num_classes=10, device=o.device, seed=o.seed, batch_size=o.batch_size, progress=o.progress,
                  overwrite=False, resume=False, num_workers=0, pin_mem=False, amp="auto", scale_lr=False,
                  mixup=0.0, cutmix=0.0, smoothing=0.1, repeated_aug=False, drop_path=0.0, warmup_epochs=0,
                  weight_decay=0.05, digits_augment=True, digits_shift=o.digits_shift, tensorboard=True,
                  train_limit=o.train_limit, out=os.path.join(o.out, name))
    common.update(over)
    return cls.from_dict(common).validate()


def train_teacher(cfg: TrainConfig):
    """Dense training of the demo ViT (no pruning, no distillation); the model selected on validation is in
    ``best.pth``."""
    size = E.model_input_size(cfg)
    st = E.setup(cfg, size)
    dist = st.dist
    model = E.build_timm_model(cfg.model, st.num_classes, None, cfg.drop_path, cfg.model_kwargs, dist)
    with E.run_folder(cfg, dist) as out:
        E.save_run_config(cfg, out, dist)
        model.to(dist.device)
        opt = torch.optim.AdamW(E.decay_groups(model, cfg.weight_decay), lr=cfg.lr)
        sched = E.Schedule(opt, cfg.lr, cfg.min_lr, cfg.schedule_length, cfg.warmup_epochs, cfg.warmup_lr)
        task = E.task_loss_fn(cfg.smoothing, False)
        E.fit(model=E.wrap_ddp(model, dist), schedules=[sched], epochs=cfg.epochs,
              loss_fn=lambda im, lo, y: (task(lo, y), {}), train_loader=st.train_loader, train_sampler=st.sampler,
              val_loader=st.val_loader, dist=dist, out=out, dtype=E.amp_dtype(cfg.amp, dist.device),
              best_meta={"model_name": cfg.model, "model_kwargs": cfg.model_kwargs, "num_classes": st.num_classes},
              show=cfg.progress, desc="teacher", tensorboard=cfg.tensorboard)
    return dist


def _chosen(path: str) -> torch.nn.Module:
    """The model a stage selected on validation (its ``best.pth``)."""
    return finetune.model_from_checkpoint(runs.load_torch_file(path), path).eval()


def test_accuracy(model: torch.nn.Module, size: int, dist: E.DistInfo) -> float:
    """Top-1 (%) on the digits test split (used once per model, for the report)."""
    loader = DataLoader(DigitsDataset("test", size=size), batch_size=256)
    return E.evaluate(model, loader, dist, show=False)["acc1"]


def run(opts: Union[DemoConfig, Dict]) -> Dict:
    """Run the demo; returns the summary (also written to ``out/summary.json``)."""
    o = DemoConfig.from_dict(opts) if isinstance(opts, dict) else opts
    o = o.validate()
    size = int(o.model_kwargs["img_size"])
    tcfg = _stage(TrainConfig, o, "teacher", epochs=o.teacher_epochs, lr=o.teacher_lr, min_lr=1e-5)
    runs.check_out(o.out, o.overwrite)
    probe = supernet(E.build_timm_model(DEMO_MODEL, 10, None, 0.0, o.model_kwargs), model_name=DEMO_MODEL)
    try:  # before any training: the target must be reachable
        probe.check_target(o.target_fraction * probe.dense_gflops())
    except ValueError as exc:
        raise E.RunError(f"--target-fraction {o.target_fraction:g}: {exc}") from None
    threads_before = torch.get_num_threads()
    if o.threads:
        torch.set_num_threads(int(o.threads))
    t_start = time.perf_counter()
    times = {}
    lock = runs.open_run(o.out, overwrite=o.overwrite)
    try:
        save_config(o, os.path.join(o.out, "demo.yaml"))
        # 1. teacher
        E.log("== 1/3 teacher: dense ViT on the UCI digits ==")
        t0 = time.perf_counter()
        dist = train_teacher(tcfg)
        teacher_ckpt = os.path.join(o.out, "teacher", "best.pth")
        teacher = _chosen(teacher_ckpt)
        times["teacher_s"] = time.perf_counter() - t0

        # 2. search, from the teacher chosen on validation
        E.log("== 2/3 SPViT search ==")
        t0 = time.perf_counter()
        sn = supernet(_chosen(teacher_ckpt), theta=1.5, alpha=1e-2, model_name=DEMO_MODEL)
        dense = sn.dense_gflops()
        target = o.target_fraction * dense
        scfg = _stage(SearchConfig, o, "search", epochs=o.search_epochs, sched_epochs=o.search_epochs,
                      lr=o.search_lr, min_lr=o.search_lr, arc_lr=o.arc_lr, target_gflops=target,
                      loss_lambda=o.lambda_rel / dense ** 2)
        sres = search.run(scfg, supernet_module=sn)
        arch = Architecture.load(sres["arch"])
        E.log(arch.summary())
        times["search_s"] = time.perf_counter() - t0

        # 3. fine-tune (searched weights carried from the search checkpoint) with distillation from the teacher
        E.log(f"== 3/3 fine-tune the pruned model (distillation: {o.distillation}) ==")
        t0 = time.perf_counter()
        fcfg = _stage(FinetuneConfig, o, "finetune", arch=sres["arch"],
                      init=os.path.join(o.out, "search", runs.CHECKPOINT), epochs=o.finetune_epochs,
                      lr=o.finetune_lr, min_lr=1e-5, distillation=o.distillation,
                      teacher=teacher_ckpt if o.distillation != "none" else None)
        finetune.run(fcfg)
        pruned = _chosen(os.path.join(o.out, "finetune", "best.pth"))
        times["finetune_s"] = time.perf_counter() - t0

        # 4. the report: test accuracy, once, of the two chosen models
        teacher_acc = test_accuracy(teacher, size, dist)
        pruned_acc = test_accuracy(pruned, size, dist)
        wall = time.perf_counter() - t_start
        splits = DigitsDataset.split_indices(1797)
        n_train = len(splits["train"]) if o.train_limit is None else min(o.train_limit, len(splits["train"]))
        summary = {
            "teacher_acc": round(teacher_acc, 3), "pruned_acc": round(pruned_acc, 3),
            "teacher_gflops": gflops(teacher), "pruned_gflops": gflops(pruned),
            "target_gflops": target, "flops_cut": 1 - gflops(pruned) / gflops(teacher),
            "teacher_params": count_params(teacher), "pruned_params": count_params(pruned),
            "wall_s": round(wall, 1), "stage_s": {k: round(v, 1) for k, v in times.items()},
            "blocks": [{"block": i, "attn": b.attn, "ffn_kept": b.ffn_width, "ffn_total": arch.signature.mlp_hidden}
                       for i, b in enumerate(arch.blocks)],
            "seed": o.seed, "device": str(dist.device), "threads": torch.get_num_threads(),
            "train_images": n_train, "val_images": len(splits["val"]), "test_images": len(splits["test"]),
            "selection": "best epoch on the validation split (teacher and fine-tune); test split evaluated once",
            "dataset": "UCI Optical Recognition of Handwritten Digits (CC BY 4.0), 8x8 upsampled to "
                       f"{size}x{size}",
        }
        runs.write_json(summary, os.path.join(o.out, "summary.json"))
        try:
            plot_demo(o.out, summary)
        except ImportError:
            E.log("(matplotlib not installed: plots skipped)")
    finally:
        lock.release()
        torch.set_num_threads(threads_before)
    E.log(format_table(summary))
    E.log(f"run folder: {o.out}")
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
