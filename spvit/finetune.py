"""The SPViT fine-tune phase (docs/method.md §5): the pruned model of an architecture, trained with optional
hard/soft distillation from any timm model (or a checkpoint of a run) as teacher.

Initialisation (``init``): ``pretrained`` (official: the dense pre-trained weights, docs/method.md §5.1), ``none``
or the path of a search checkpoint (carry the searched weights: learned head mixing, BNs). The run folder gets
``config.yaml``, ``arch.json``, ``metrics.csv``, ``checkpoint.pth`` (resumable) and ``best.pth`` (weights +
architecture: what ``spvit eval`` and ``spvit deploy`` read).
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Union

import torch
import torch.nn as nn

from . import distributed as D
from . import engine as E
from . import hub
from . import optim
from . import runs
from .arch import Architecture
from .checkpoints import load_state, model_from_checkpoint, model_meta
from .config import FinetuneConfig
from .distill import DistillationLoss
from .flops import count_params, gflops
from .models import prune, supernet
from .models.official import load_official
from .runs import RunError

DEFAULTS = FinetuneConfig()
TEACHER_CODE_FLAG = "--teacher-file-runs-code"


def load_arch(path: Optional[str], model_name: Optional[str] = None,
              num_classes: Optional[int] = None) -> Architecture:
    """An :class:`Architecture` from an ``arch.json``, or from an original SPViT checkpoint (``.pth``: a search
    checkpoint's gates or a fine-tuned model's layers, via :func:`spvit.load_official`; needs ``model_name``)."""
    if not path:
        raise RunError("--arch is required (the arch.json written by `spvit search`)")
    if not os.path.isfile(path):
        raise RunError(f"architecture file not found: {path}")
    if path.endswith((".pth", ".pt", ".bin")):
        if not model_name:
            raise RunError("--arch with an original SPViT checkpoint needs --model (e.g. deit_small_patch16_224)")
        try:
            with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error says enough
                warnings.simplefilter("ignore")
                m = load_official(path, model_name, **({"num_classes": num_classes} if num_classes else {}))
        except (ValueError, OSError) as exc:
            raise RunError(str(exc) if not isinstance(exc, OSError) or not exc.strerror else
                           f"--arch {path}: cannot read it ({exc.strerror})") from None
        return m.architecture() if callable(m.architecture) else m.architecture
    try:
        return Architecture.load(path)
    except (ValueError, TypeError, KeyError) as exc:
        raise RunError(f"--arch {path}: {exc}") from None
    except OSError as exc:  # unreadable (permissions, a folder, a link loop): bad input
        raise RunError(f"--arch {path}: cannot read it ({exc.strerror or exc})") from None


def arch_model_kwargs(arch: Architecture) -> Dict:
    """The timm kwargs of the model an architecture was searched on: those its search recorded (``meta``), else the
    ones its signature implies (patch size, depth, width, heads, FFN ratio, channels); without ``img_size`` and
    ``num_classes`` (the run's image size and data give them)."""
    kw = arch.meta.get("model_kwargs")
    if not isinstance(kw, dict):
        s = arch.signature
        if s.family == "swin":
            kw = {"patch_size": s.patch_size, "in_chans": s.in_chans, "embed_dim": s.embed_dim,
                  "depths": tuple(s.depths), "num_heads": tuple(s.num_heads), "window_size": s.window_size,
                  "mlp_ratio": s.mlp_hidden[0] / s.embed_dim}
        else:
            kw = {"patch_size": s.patch_size, "in_chans": s.in_chans, "embed_dim": s.embed_dim, "depth": s.depth,
                  "num_heads": s.num_heads, "mlp_ratio": s.mlp_hidden / s.embed_dim}
    return {k: v for k, v in kw.items() if k not in ("img_size", "num_classes")}


def _init_mismatch(path: str, ck, model_name: str, model_kwargs: Optional[Dict]) -> Optional[str]:
    """What a search checkpoint records of its model when that differs from this run's, else None."""
    if not isinstance(ck, dict) or not ck.get("model_name"):
        return None
    theirs, ours = ck.get("model_kwargs") or {}, model_kwargs or {}
    diffs = [f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
             if theirs.get(k) != ours.get(k)]
    if ck["model_name"] != model_name:
        diffs.insert(0, f"model {ck['model_name']} vs {model_name}")
    if not diffs:
        return None
    return (f"--init checkpoint {path} was written by a search of another model than this fine-tune's (checkpoint vs "
            f"this run: {'; '.join(diffs)}); give the search checkpoint of this architecture's search")


def build_pruned(arch: Architecture, model_name: str, num_classes: int, pretrained: Optional[str],
                 drop_path: float = 0.0, model_kwargs: Optional[Dict] = None, init: Optional[str] = "pretrained",
                 dist: Optional[D.DistInfo] = None, source: Optional[nn.Module] = None) -> nn.Module:
    """The pruned model of ``arch`` from a timm model (or ``source``: a dense model or a supernet to carry).

    ``init``: ``pretrained`` (the timm model's ``pretrained`` weights), ``none`` (random) or the path of a search
    checkpoint whose supernet weights are carried (loaded safely; a checkpoint of another model or image size is
    a :class:`RunError`)."""
    if source is None:
        source = hub.build_timm_model(model_name, num_classes, pretrained if init == "pretrained" else None, drop_path,
                                      model_kwargs, dist)
        if init not in ("pretrained", "none", None):
            ck = runs.load_torch_file(init, "--init checkpoint")
            state = runs.state_dict_of(ck, init, "--init checkpoint")
            sn = supernet(source, model_name=model_name)
            try:  # the architecture against the model first: a mismatch there is not the checkpoint's fault
                arch.check_compatible(sn.signature, model_name)
            except ValueError as exc:
                raise RunError(f"the model built for the fine-tune does not fit the architecture: {exc}") from None
            try:
                load_state(sn, state, init, "--init checkpoint")
            except RunError:
                why = _init_mismatch(init, ck, model_name, model_kwargs)
                if why:
                    raise RunError(why) from None
                raise
            source = sn
    try:
        return prune(source, arch)
    except ValueError as exc:
        raise RunError(f"architecture {getattr(arch, 'model_name', '?')} does not fit model {model_name}: {exc}") \
            from None


def build_teacher(cfg: FinetuneConfig, num_classes: int, dist: Optional[D.DistInfo] = None) -> nn.Module:
    """The teacher: a timm name (weights ``--teacher-weights``: "timm" = hub, or a local file) or a checkpoint file
    of a run (``best.pth``). A whole pickled model only with ``--teacher-file-runs-code``: loading it runs code."""
    name = cfg.teacher
    if not name:
        raise RunError(f"--distillation {cfg.distillation} needs --teacher (a timm model name or a file)")
    if os.path.isfile(name):
        if cfg.teacher_file_runs_code:
            # Unpickling a whole module runs code from the file: only behind the explicit --teacher-file-runs-code
            # opt-in (its help says so); every other load of a user file is weights_only=True.
            obj = torch.load(name, map_location="cpu", weights_only=False)
            if not isinstance(obj, nn.Module):
                raise RunError(f"--teacher {name} holds no model (a {type(obj).__name__})")
            return obj
        try:
            ck = runs.load_torch_file(name, "--teacher file")
        except RunError as exc:
            if "Python objects" in str(exc):
                raise RunError(f"{exc}. A whole pickled model is loaded only with {TEACHER_CODE_FLAG} (it runs "
                               f"code from the file: only for files you trust)") from None
            raise
        if not isinstance(ck, dict) or not ck.get("model_name"):
            raise RunError(f"--teacher file {name} is not a checkpoint of an spvit run; for plain weights give the "
                           f"timm name: --teacher <model> --teacher-weights {name}")
        teacher = model_from_checkpoint(ck, name, "--teacher file")
    else:
        teacher = hub.build_timm_model(name, num_classes, cfg.teacher_weights, 0.0, cfg.teacher_kwargs, dist,
                                       weights_flag="--teacher-weights")
    out_dim = getattr(teacher, "num_classes", None)
    if out_dim is not None and out_dim != num_classes:
        raise RunError(f"the teacher predicts {out_dim} classes, the dataset has {num_classes}")
    return teacher


def run(cfg: Union[FinetuneConfig, Dict], source: Optional[nn.Module] = None,
        teacher: Optional[nn.Module] = None) -> Dict:
    """Run (or resume) a fine-tune. ``source`` / ``teacher``: already built modules (instead of ``init`` and
    ``teacher``). Everything is validated before the first file is written."""
    if isinstance(cfg, dict):
        cfg = FinetuneConfig.from_dict(cfg, source="arguments")
    cfg = cfg.validate()
    runs.check_out(cfg.out, cfg.overwrite, cfg.resume)
    arch_path = os.path.join(cfg.out, "arch.json") if cfg.resume else cfg.arch
    arch = load_arch(arch_path, cfg.model, cfg.num_classes)
    if cfg.model is None:
        cfg = cfg.replace(model=arch.model_name)
    size = hub.model_input_size(cfg, arch.signature.img_size[0])
    # the model the architecture was searched on (patch size, depth, ...) unless --model-kwargs says otherwise
    kwargs = {**(arch_model_kwargs(arch) if cfg.model == arch.model_name else {}), **hub.model_kwargs_for(cfg, size)}
    hub.check_model_name(cfg.model)  # before the data: an unknown name is not a batch-size problem
    st = E.setup(cfg, size)
    dist = st.dist
    # a resumed run takes every weight from its checkpoint: nothing is downloaded or read for the init
    model = build_pruned(arch, cfg.model, st.num_classes, "none" if cfg.resume else cfg.pretrained, cfg.drop_path,
                         kwargs, "none" if cfg.resume else cfg.init, dist, source)
    E.check_channels(st, arch.signature.in_chans)
    if cfg.distillation != "none" and teacher is None:
        teacher = build_teacher(cfg, st.num_classes, dist)
    teacher = teacher.to(dist.device).eval() if teacher is not None and cfg.distillation != "none" else None
    lr = optim.effective_lr(cfg, dist)
    f = optim.other_lr_scale(cfg, dist)
    min_lr = optim.lr_floor(lr, cfg.min_lr * f, "--min-lr", dist)
    with E.run_folder(cfg, dist) as out:
        if dist.main and not cfg.resume:
            runs.write_json(arch.to_dict(), os.path.join(out, "arch.json"))
        E.save_run_config(cfg, out, dist)
        model.to(dist.device)
        task = optim.task_loss_fn(cfg.smoothing, st.mixup is not None)
        distill = DistillationLoss(teacher, cfg.distillation, cfg.distillation_alpha, cfg.distillation_tau)
        dtype = optim.amp_dtype(cfg.amp, dist.device)

        def loss_fn(images, logits, y):
            t = task(logits, y)
            if teacher is None:
                return t, {}
            with optim.autocast(dist.device, dtype):
                d = distill.distill_term(images, logits)
            return (1 - distill.alpha) * t + distill.alpha * d, {"task": t.item(), "distill": d.item()}

        opt = torch.optim.AdamW(optim.decay_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.opt_betas),
                                eps=cfg.opt_eps)
        schedules = [optim.Schedule(opt, lr, min_lr, cfg.schedule_length, cfg.warmup_epochs, cfg.warmup_lr * f,
                                    per_step=cfg.sched_per_step)]
        scaler = torch.amp.GradScaler(dist.device.type) if dtype == torch.float16 else None
        ema = optim.ModelEma(model, cfg.model_ema_decay) if cfg.model_ema else None
        # a skip block leaves norm1 unused; the original Swin code does not broadcast buffers (§7.6)
        ddp = D.wrap_ddp(model, dist, find_unused="skip" in arch.attn_choices,
                         broadcast_buffers=arch.signature.family != "swin")
        gf = gflops(model)
        D.log(f"fine-tune {cfg.model}: {gf:.4g} GFLOPs, {count_params(model) / 1e6:.3f} M params, lr {lr:.3g}, "
              f"distillation {cfg.distillation}, {dist.world} process(es) on {dist.device}", dist)
        meta = model_meta(cfg.model, kwargs, st.num_classes, arch)
        res = E.fit(model=ddp, schedules=schedules, epochs=cfg.epochs, loss_fn=loss_fn, train_loader=st.train_loader,
                    train_sampler=st.sampler, val_loader=st.val_loader, dist=dist, out=out, mixup=st.mixup,
                    dtype=dtype, scaler=scaler, clip_grad=cfg.clip_grad, ema=ema, resume=cfg.resume,
                    stop_after_epoch=cfg.stop_after_epoch, after_epoch=lambda e, m: {"gflops": gf},
                    postfix=lambda: {"GFLOPs": f"{gf:.4g}"}, best_meta=meta, show=cfg.progress, desc="finetune",
                    tensorboard=cfg.tensorboard, resume_hint=f"spvit finetune --out {out} --resume",
                    cfg=cfg)
    return {"model": model, "gflops": gf, "val_acc1": res["last"].get("val_acc1"), "best_acc1": res["best_acc1"],
            "stopped": res["stopped"], "out": out, "dist": dist}
