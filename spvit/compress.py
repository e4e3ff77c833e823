"""``spvit compress``: from a timm model (or a checkpoint of a run) and a dataset to a deployed model measured on the
device, in one run folder.

Stages (each writes the files of the separate command, in its own sub-folder of ``--out``):

====== ===================================================== ==================================================
stage  what                                                  files
====== ===================================================== ==================================================
teacher (only with ``teacher_epochs`` > 0) train the dense ``teacher/``: as ``spvit search``/``finetune``
       model first (a model without pre-trained weights)     (``config.yaml``, ``checkpoint.pth``, ``best.pth``)
profile (latency / speedup target) the latency table of the  ``latency.json`` (as ``spvit profile``)
       model's deployed pieces on ``--device``
search SPViT search to the target, read-out with             ``search/`` (as ``spvit search``: ``arch.json``...)
       ``--ffn-align`` (default: the table's width grid)
finetune the pruned model, searched weights carried, with    ``finetune/`` (as ``spvit finetune``: ``best.pth``)
       distillation from the dense model
deploy BN folded, FFNs compacted, fused kernels              ``deploy/`` (as ``spvit deploy``: ``deployed.pth``)
measure accuracy of dense and compressed on the validation   ``measure.json``
       split; latency of both deployed models, alternated
       over rounds (median speedup and its spread); predicted
       vs measured latency
report the request against what was achieved                 ``report.md``, ``summary.json``, ``report.png``
====== ===================================================== ==================================================

The top folder holds the resolved settings (``compress.yaml``) and the stages done (``stages.json``); one lock on it
covers the whole run. ``spvit compress --out DIR --resume`` continues the stage that was running (a training stage
from its checkpoint). Every input (model, weights, data, device, the target's reachability on the device) is checked
before the first file is written.

Recipes (``--recipe``): ``paper`` takes the original configuration of the model family (``configs/``: epochs,
learning rates, lambda, data recipe); ``quick`` the same with :data:`QUICK_FRACTION` of every epoch count (at least
one), for a first look; ``none`` the package's defaults. Settings for every training stage (``train``) and per stage
(``teacher``, ``search``, ``finetune``) override the recipe, from ``--config file.yaml`` or the command line.
"""
from __future__ import annotations

import math
import os
import platform
import shlex
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from . import engine as E
from . import runs
from .config import (BaseConfig, ConfigError, FinetuneConfig, SearchConfig, TrainConfig, _finite, _int_at_least,
                     changed_settings, check_device, find_config, flag, load_saved, load_yaml)
from .config import save as save_config

STAGES = ("teacher", "profile", "search", "finetune", "deploy", "measure", "report")
QUICK_FRACTION = 0.05  # --recipe quick: this fraction of the paper recipe's epochs (at least 1 per stage)
# lambda of the FLOPs / latency loss for a model without an original configuration: lambda_rel / dense_gflops^2
# (DeiT-S's lambda 3 at 4.59 GFLOPs is lambda_rel ~ 63)
LAMBDA_REL = 60.0
# the original configurations per model family (search, fine-tune): configs/<name>.yaml
PAPER = {"deit_tiny": ("deit_ti_l200_t10_search", "deit_ti_l200_t10_ft_dist"),
         "deit_small": ("deit_sm_l30_t32_search", "deit_sm_l30_t32_ft_dist"),
         "deit_base": ("deit_bs_l008_t60_search", "deit_bs_l008_t60_ft_dist"),
         "swin_tiny": ("swin_tn_l28_t32_search", "swin_tn_l28_t32_ft_dist"),
         "swin_small": ("swin_sm_l04_t55_search", "swin_sm_l04_t55_ft_dist"),
         "swin_base": ("swin_bs_l01_t100_search", "swin_bs_l01_t100_ft")}
# keys of an original configuration that compress sets itself
_OWN_KEYS = ("model", "out", "data", "pretrained", "target_gflops", "arch", "init", "teacher", "teacher_weights",
             "teacher_kwargs", "resume", "overwrite", "latency_table", "target_speedup", "target_latency_ms")
EXECUTION_ONLY = ("out", "resume", "overwrite", "allow_changes", "progress", "config_file", "stop_after")
MISS_TOLERANCE = 0.10  # a measured speedup (or FLOPs) further than this from the request is reported plainly
CONFIG_NAME = "compress.yaml"
STAGES_FILE = "stages.json"
MEASURE_FILE = "measure.json"
TABLE_FILE = "latency.json"


@dataclass
class CompressConfig(BaseConfig):
    """``spvit compress``: the settings of a run (saved as ``compress.yaml`` in the run folder)."""

    model: Optional[str] = None  # a timm name, or the best.pth / checkpoint.pth of a run (a dense model)
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = "timm"  # weights of a timm name: "timm" (hub), "none" or a local file
    data: Optional[str] = None
    num_classes: Optional[int] = None
    out: Optional[str] = None
    overwrite: bool = False
    device: str = "auto"
    seed: int = 0
    threads: Optional[int] = None  # torch CPU threads for the whole run (profile and measure included)
    progress: bool = True
    # the target: exactly one
    target_speedup: Optional[float] = None
    target_latency_ms: Optional[float] = None
    target_gflops: Optional[float] = None
    # latency: the table is measured at this batch and dtype (or given: latency_table)
    latency_table: Optional[str] = None
    batch: int = 1
    dtype: str = "fp32"
    profile_budget: float = 0.3
    profile_rounds: int = 1
    ffn_align: Optional[int] = None  # None: the table's FFN width step (the device's grid); 0: off
    # training
    recipe: str = "quick"
    teacher_epochs: int = 0  # > 0: train the dense model this long first (it is then the teacher)
    distillation: str = "hard"
    train: Dict[str, Any] = field(default_factory=dict)  # settings of every training stage
    teacher: Dict[str, Any] = field(default_factory=dict)  # settings of the teacher stage (dense training)
    search: Dict[str, Any] = field(default_factory=dict)
    finetune: Dict[str, Any] = field(default_factory=dict)
    # measure
    measure_rounds: int = 7
    measure_budget: float = 0.2
    report_style: str = "compress"  # "demo": the demo's summary, table and demo.png as well
    config_file: Optional[str] = None

    def validate(self) -> "CompressConfig":
        check_device(self.device)
        if not self.model:
            raise ConfigError("--model is required (a timm model name, or the best.pth of an spvit run)")
        if not self.data:
            raise ConfigError("--data is required (an ImageNet-layout folder, or 'digits')")
        if not self.out:
            raise ConfigError("--out is required (the run folder)")
        given = [k for k in ("target_speedup", "target_latency_ms", "target_gflops") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one target: --target-speedup S, --target-latency-ms MS or "
                              "--target-gflops G" + (f" (got {', '.join(flag(k) for k in given)})" if given else ""))
        _finite("target_speedup", self.target_speedup, 0, lo_open=True)
        _finite("target_latency_ms", self.target_latency_ms, 0, lo_open=True)
        _finite("target_gflops", self.target_gflops, 0, lo_open=True)
        if self.latency_table and self.target_gflops is not None:
            raise ConfigError("--latency-table goes with --target-speedup or --target-latency-ms, not --target-gflops")
        if self.recipe not in ("paper", "quick", "none"):
            raise ConfigError(f"--recipe must be paper, quick or none, got {self.recipe!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"--dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.distillation not in ("none", "hard", "soft"):
            raise ConfigError(f"--distillation must be none, hard or soft, got {self.distillation!r}")
        if self.report_style not in ("compress", "demo"):
            raise ConfigError(f"report_style must be compress or demo, got {self.report_style!r}")
        for name in ("batch", "profile_rounds", "measure_rounds"):
            _int_at_least(name, getattr(self, name), 1)
        _int_at_least("threads", self.threads, 1)
        _int_at_least("teacher_epochs", self.teacher_epochs, 0)
        _int_at_least("ffn_align", self.ffn_align, 0)
        _int_at_least("num_classes", self.num_classes, 2)
        _finite("profile_budget", self.profile_budget, 0)
        _finite("measure_budget", self.measure_budget, 0)
        for name, cls in (("train", TrainConfig), ("teacher", TrainConfig), ("search", SearchConfig),
                          ("finetune", FinetuneConfig)):
            types = cls.field_types()
            bad = sorted(k for k in getattr(self, name) if k not in types)
            if bad:
                raise ConfigError(f"{name}: unknown setting(s) {', '.join(bad)}")
        return self

    @property
    def latency_target(self) -> bool:
        return self.target_gflops is None


# ----------------------------------------------------------------------------------------------------------------
# Recipes


def paper_family(model_name: str) -> Optional[str]:
    """The key of :data:`PAPER` for a timm model name (``deit_small_patch16_224`` -> ``deit_small``), or None."""
    name = model_name.lower()
    for fam in PAPER:
        if name.startswith(fam) or name.startswith(fam.replace("deit", "vit")):
            return fam
    return None


def _scaled(d: Dict[str, Any], fraction: float) -> Dict[str, Any]:
    out = dict(d)
    for k in ("epochs", "sched_epochs", "arc_sched_epochs", "warmup_epochs"):
        if out.get(k):
            out[k] = max(1 if k != "warmup_epochs" else 0, int(round(out[k] * fraction)))
    return out


def recipe_settings(recipe: str, model_name: str) -> Dict[str, Dict[str, Any]]:
    """The search and fine-tune settings of a recipe for a model (``{"search": {...}, "finetune": {...}}``)."""
    if recipe == "none":
        return {"search": {}, "finetune": {}}
    fam = paper_family(model_name)
    if fam is None:
        if recipe == "paper":
            raise ConfigError(f"--recipe paper: no original configuration for {model_name} (there are: "
                              f"{', '.join(f'{k}*' for k in PAPER)}); use --recipe quick or none with your settings")
        base = {"search": {"epochs": 20}, "finetune": {"epochs": 100}}
    else:
        base = {}
        for stage, name in zip(("search", "finetune"), PAPER[fam]):
            y = load_yaml(find_config(name))
            base[stage] = {k: v for k, v in y.items() if k not in _OWN_KEYS}
    if recipe == "quick":
        base = {k: _scaled(v, QUICK_FRACTION) for k, v in base.items()}
    return base


# ----------------------------------------------------------------------------------------------------------------
# Utilities


def _write_stages(out: str, done: List[str], times: Dict[str, float]) -> None:
    runs.write_json({"done": done, "stage_s": times}, os.path.join(out, STAGES_FILE))


def _read_json(path: str) -> Any:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stage_state(folder: str) -> Dict[str, bool]:
    """How to (re)start a training stage in ``folder``: resume from its checkpoint, or start over in it."""
    if os.path.isfile(os.path.join(folder, runs.CHECKPOINT)) and runs.is_run_folder(folder):
        return {"resume": True, "overwrite": False}
    return {"resume": False, "overwrite": runs.is_run_folder(folder)}


def _chosen(path: str) -> torch.nn.Module:
    from .finetune import model_from_checkpoint

    return model_from_checkpoint(runs.load_torch_file(path), path).eval()


def _median(v: List[float]) -> float:
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _device(name: str) -> torch.device:
    return E.init_distributed(name).device


# ----------------------------------------------------------------------------------------------------------------
# The dense model


@dataclass
class Dense:
    """The model to compress: its timm name and kwargs, its weights (``pretrained``) or checkpoint file."""

    name: str
    kwargs: Dict[str, Any]
    pretrained: Optional[str]
    checkpoint: Optional[str] = None  # a checkpoint file of a run (dense model)


def dense_of(cfg: CompressConfig) -> Dense:
    """What ``--model`` names (a checkpoint of a run is read safely; a pruned one is refused)."""
    if os.path.isfile(cfg.model):
        ck = runs.load_torch_file(cfg.model, "--model checkpoint")
        if not isinstance(ck, dict) or not ck.get("model_name") or not isinstance(ck.get("model"), dict):
            raise E.RunError(f"--model {cfg.model} is not a checkpoint of an spvit run (no model name and weights "
                             f"inside); give a timm name, with --pretrained for a local weights file")
        if isinstance(ck.get("arch"), dict):
            raise E.RunError(f"--model {cfg.model} holds an already pruned model; give the dense model")
        return Dense(ck["model_name"], dict(ck.get("model_kwargs") or {}), "none", cfg.model)
    return Dense(cfg.model, dict(cfg.model_kwargs), cfg.pretrained)


def train_dense(cfg: TrainConfig) -> None:
    """Dense training (no pruning, no distillation), resumable; the model selected on validation is in
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
              show=cfg.progress, desc="teacher", tensorboard=cfg.tensorboard, resume=cfg.resume,
              stop_after_epoch=cfg.stop_after_epoch)


# ----------------------------------------------------------------------------------------------------------------
# The plan: every stage's config, resolved and validated before anything is written


class Plan:
    """The resolved stages of a run (configs of the training stages, the dense model, the target)."""

    def __init__(self, cfg: CompressConfig):
        self.cfg = cfg
        self.out = cfg.out
        self.dense = dense_of(cfg)
        recipe = recipe_settings(cfg.recipe, self.dense.name)
        common = dict(model=self.dense.name, model_kwargs=dict(self.dense.kwargs), data=cfg.data, device=cfg.device,
                      seed=cfg.seed, progress=cfg.progress, num_classes=cfg.num_classes)
        self.has_dense_stage = cfg.teacher_epochs > 0
        if self.has_dense_stage and self.dense.checkpoint is not None:
            raise ConfigError(f"--teacher-epochs trains the dense model from scratch; --model {cfg.model} is already "
                              f"a trained checkpoint (leave --teacher-epochs out)")
        self.dense_ckpt = (os.path.join(self.out, "teacher", "best.pth") if self.has_dense_stage
                           else self.dense.checkpoint)
        dense_over = {**common, "pretrained": "none", **cfg.train, "epochs": cfg.teacher_epochs, **cfg.teacher,
                      "out": os.path.join(self.out, "teacher")}
        self.dense_cfg = (TrainConfig.from_dict(dense_over, source="teacher").validate() if self.has_dense_stage
                          else None)
        from_file = self.dense_ckpt is not None
        s = {**recipe["search"], **common, "pretrained": "none" if from_file else self.dense.pretrained, **cfg.train,
             **cfg.search, "out": os.path.join(self.out, "search"), "target_gflops": cfg.target_gflops or 1.0,
             "ffn_align": 0}
        self.search_cfg = SearchConfig.from_dict(s, source="search").validate()
        teacher = ({"teacher": self.dense_ckpt} if from_file else
                   {"teacher": self.dense.name, "teacher_weights": self.dense.pretrained or "none",
                    "teacher_kwargs": dict(self.dense.kwargs)})
        f = {**recipe["finetune"], **common, "pretrained": "none", **cfg.train, "distillation": cfg.distillation,
             **(teacher if cfg.distillation != "none" else {}), **cfg.finetune,
             "out": os.path.join(self.out, "finetune"), "arch": os.path.join(self.out, "search", "arch.json"),
             "init": os.path.join(self.out, "search", runs.CHECKPOINT)}
        self.finetune_cfg = FinetuneConfig.from_dict(f, source="finetune").validate()
        self.table = None
        self.target_ms = None
        self.dense_gflops = None
        self.profile_s = 0.0
        self.ffn_align = 0

    def stage_commands(self) -> Dict[str, str]:
        o = shlex.quote(self.out)
        return {"search": f"spvit search --out {o}/search --resume",
                "finetune": f"spvit finetune --out {o}/finetune --resume",
                "deploy": f"spvit deploy --checkpoint {o}/finetune/best.pth --out DEPLOY_DIR",
                "bench": (f"spvit bench --checkpoint {o}/finetune/best.pth --latency-table {o}/{TABLE_FILE}"
                          if self.cfg.latency_target else f"spvit bench --checkpoint {o}/finetune/best.pth")}


def _probe_model(plan: Plan, num_classes: int) -> torch.nn.Module:
    """The dense model with its weights (checks the name, the kwargs and the weights)."""
    d = plan.dense
    if d.checkpoint is not None:
        return _chosen(d.checkpoint)
    weights = None if plan.has_dense_stage else d.pretrained
    with torch.random.fork_rng(devices=[]):  # random weights (no pre-trained ones): the same model every time
        torch.manual_seed(plan.cfg.seed)
        return E.build_timm_model(d.name, num_classes, weights, 0.0, d.kwargs)


def _check_data(plan: Plan, size: int) -> int:
    """The number of classes of ``--data`` (the training and validation splits are read, nothing is loaded)."""
    from .data import build_datasets

    scfg = plan.search_cfg
    _, val = build_datasets(scfg.data, E.data_config(scfg, size), need_train=True)
    n = val.num_classes
    if plan.cfg.num_classes is not None and plan.cfg.num_classes != n:
        raise E.RunError(f"--num-classes {plan.cfg.num_classes} disagrees with the dataset, which has {n} classes")
    return n


def default_ffn_align(table) -> int:
    """The FFN width step of the table's grid: the widths the device was measured at (64 on wide FFNs: the
    tensor-core friendly multiple; about width/16 on narrow ones)."""
    step = table.meta.get("ffn_step")
    if isinstance(step, list):
        step = min(step)
    return int(step or 0)


def preflight(plan: Plan, resume: bool) -> None:
    """Every check before the first write: model, weights, data, device, the target on the device (profiling when
    the target is a latency and no table was given or saved)."""
    from . import latency as L
    from .models import supernet

    cfg = plan.cfg
    dev = _device(cfg.device)
    size = E.model_input_size(plan.search_cfg)
    ncls = _check_data(plan, size)
    model = _probe_model(plan, ncls)
    try:
        sn = supernet(model, model_name=plan.dense.name)
    except ValueError as exc:
        raise E.RunError(f"--model {cfg.model}: {exc}") from None
    plan.dense_gflops = sn.dense_gflops()
    if not cfg.latency_target:
        try:
            sn.check_target(cfg.target_gflops)
        except ValueError as exc:
            raise E.RunError(f"--target-gflops: {exc}") from None
        plan.ffn_align = cfg.ffn_align or 0
        return
    saved = os.path.join(plan.out, TABLE_FILE)
    threads_before = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if resume and os.path.isfile(saved):
            table = L.load_table(saved)
        elif cfg.latency_table:
            table = L.load_table(cfg.latency_table)
            table.check_device(dev, cfg.dtype)
        else:
            E.log(f"== profile: latency table of {plan.dense.name} on {L.device_name(dev)} (batch {cfg.batch}, "
                  f"{cfg.dtype}) ==")
            t0 = time.perf_counter()
            table = L.profile(model, device=dev, dtype=cfg.dtype, batch=cfg.batch, threads=cfg.threads,
                              budget_s=cfg.profile_budget, rounds=cfg.profile_rounds, model_name=plan.dense.name,
                              show=cfg.progress)
            plan.profile_s = time.perf_counter() - t0
    except (L.LatencyTableError, OSError) as exc:
        raise E.RunError(f"latency table: {exc}") from None
    finally:
        torch.set_num_threads(threads_before)
    try:
        table.check_model(sn.signature, plan.dense.name)
        plan.target_ms = L.resolve_target(table, cfg.target_speedup, cfg.target_latency_ms)
    except ValueError as exc:
        raise E.RunError(f"{exc} (on {table.device.get('name')}, batch {table.batch}, {table.dtype})") from None
    plan.table = table
    plan.ffn_align = default_ffn_align(table) if cfg.ffn_align is None else cfg.ffn_align


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def measure_latency(deployed, dense, batch: int, rounds: int, budget_s: float, stat: str = "median",
                    clock: str = "wall") -> Dict[str, Any]:
    """Latency of the compressed and the dense deployed models, alternated over ``rounds`` (so that a change of
    load affects both alike; the first model of a round alternates as well): per round the speedup dense /
    compressed; the median and its spread (min, max, quartiles) over the rounds."""
    from . import latency as L

    sig = deployed.signature
    dev = deployed.device
    x = torch.randn(batch, sig.in_chans, *sig.img_size, device=dev, dtype=deployed.dtype)
    key = L.STATS.get(stat, "ms")
    if dev.type == "cpu":
        L.set_steady_malloc()
    comp, dns, sp = [], [], []
    with torch.inference_mode():
        for r in range(rounds):  # which model goes first alternates too: neither gains from the other's warm-up
            order = (deployed, dense) if r % 2 == 0 else (dense, deployed)
            t = [L.time_ms(lambda m=m: m(x), dev, 3, 50, budget_s, clock=clock)[key] for m in order]
            c, d = (t[0], t[1]) if r % 2 == 0 else (t[1], t[0])
            comp.append(c)
            dns.append(d)
            sp.append(d / c)
    q = sorted(sp)

    def quantile(p):
        i = p * (len(q) - 1)
        lo, hi = int(math.floor(i)), int(math.ceil(i))
        return q[lo] + (q[hi] - q[lo]) * (i - lo)

    return {"compressed_ms": _median(comp), "dense_ms": _median(dns), "speedup": _median(sp),
            "speedup_min": q[0], "speedup_max": q[-1], "speedup_q1": quantile(0.25), "speedup_q3": quantile(0.75),
            "speedup_rounds": sp, "rounds": rounds, "batch": batch, "stat": stat, "clock": clock,
            "threads": torch.get_num_threads()}


def accuracy(model: torch.nn.Module, data: str, size: int, split: str = "val", batch_size: int = 100) -> float:
    """Top-1 (%) of ``model`` on a split of ``data`` (``val``; ``test`` for the digits)."""
    from torch.utils.data import DataLoader

    from .data import DataConfig, DigitsDataset, build_datasets

    if split == "test":
        ds = DigitsDataset("test", size=size)
    else:
        _, ds = build_datasets(data, DataConfig(input_size=size), need_train=False)
    loader = DataLoader(ds, batch_size=batch_size)
    return E.evaluate(model, loader, E.DistInfo(), show=False)["acc1"]


# ----------------------------------------------------------------------------------------------------------------
# The run


def _load_cfg(out: str, flags: Dict[str, Any], config: Optional[str], allow_changes: bool) -> CompressConfig:
    from .config import resolve

    path = os.path.join(out, CONFIG_NAME)
    if not runs.is_run_folder(out) or not os.path.isfile(path):
        raise E.RunError(f"--resume: {out} is not a run folder of spvit compress (no {CONFIG_NAME} in it)")
    saved = load_saved(CompressConfig, path)
    flags = {k: v for k, v in flags.items() if k not in ("resume", "allow_changes", "stop_after")}
    cfg = resolve(CompressConfig, flags, config, base=saved.replace(overwrite=False))
    changed = [k for k in changed_settings(saved, cfg) if k not in EXECUTION_ONLY]
    if changed and not allow_changes:
        what = ", ".join(f"{flag(k)} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ConfigError(f"--resume: settings differ from the run's saved config ({what}); drop them to continue "
                          f"the run as it was, or pass --allow-changes to continue with them")
    return cfg


def run(cfg: CompressConfig, resume: bool = False, stop_after: Optional[str] = None,
        hook: Optional[Callable[[Dict, Dict], Dict]] = None, on_open: Optional[Callable[[str], None]] = None) -> Dict:
    """Run (or with ``resume`` continue) a compression; returns the summary (also ``out/summary.json``).

    ``stop_after``: end after this stage (the run continues with ``resume``). ``hook(summary, ctx)``: adds to the
    summary before it is written (the demo's table). ``on_open(out)``: called once the new run's folder is open
    (the demo saves its own settings there)."""
    cfg = cfg.validate()
    if stop_after is not None and stop_after not in STAGES:
        raise ConfigError(f"--stop-after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    out = cfg.out
    if resume:
        if not runs.is_run_folder(out) or not os.path.isfile(os.path.join(out, CONFIG_NAME)):
            raise E.RunError(f"--resume: {out} is not a run folder of spvit compress (no {CONFIG_NAME} in it)")
    else:
        runs.check_out(out, cfg.overwrite)
    plan = Plan(cfg)
    threads_before = torch.get_num_threads()
    done: List[str] = []
    times: Dict[str, float] = {}
    if resume and os.path.isfile(os.path.join(out, STAGES_FILE)):
        state = _read_json(os.path.join(out, STAGES_FILE))
        done, times = list(state.get("done", [])), dict(state.get("stage_s", {}))
    preflight(plan, resume)  # profiles (in memory) when needed: nothing written yet
    lock = _reopen(out) if resume else runs.open_run(out, overwrite=cfg.overwrite)
    stage = "start"
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if not resume:
            save_config(cfg.replace(overwrite=False), os.path.join(out, CONFIG_NAME))
            _write_stages(out, done, times)
            if on_open is not None:
                on_open(out)
        ctx = {"plan": plan, "times": times}

        def finish(stage: str, t0: float) -> bool:
            # every process's time in the stage (a resumed stage adds up); profiling happens before the folder opens
            times[f"{stage}_s"] = round(times.get(f"{stage}_s", 0.0) + time.perf_counter() - t0
                                        + (plan.profile_s if stage == "profile" else 0.0), 1)
            runs.crash_point(f"compress_{stage}_done")
            done.append(stage)
            _write_stages(out, done, times)
            return stage == stop_after

        for stage in STAGES:
            if stage in done:
                continue
            t0 = time.perf_counter()
            if stage == "teacher" and plan.has_dense_stage:
                E.log("== teacher: train the dense model ==")
                train_dense(plan.dense_cfg.replace(**_stage_state(plan.dense_cfg.out)))
            elif stage == "profile" and plan.table is not None:
                plan.table.save(os.path.join(out, TABLE_FILE), force=True)
                E.log(plan.table.summary())
            elif stage == "search":
                _run_search(plan)
            elif stage == "finetune":
                from . import finetune

                E.log(f"== finetune: the pruned model (distillation: {plan.finetune_cfg.distillation}) ==")
                finetune.run(plan.finetune_cfg.replace(**_stage_state(plan.finetune_cfg.out)))
            elif stage == "deploy":
                _run_deploy(plan)
            elif stage == "measure":
                _run_measure(plan, ctx)
            elif stage == "report":
                _run_report(plan, ctx, hook, sum(times.values()) + time.perf_counter() - t0)
            if finish(stage, t0):
                break
    except runs.Interrupted as exc:  # a stage's own hint names its folder: the whole run continues from the top
        cmd = "spvit demo" if cfg.report_style == "demo" else "spvit compress"
        raise runs.Interrupted(f"{exc}; or continue the whole run: {cmd} --out {shlex.quote(out)} --resume",
                               exc.signum) from None
    except KeyboardInterrupt:  # outside a training loop (profile, deploy, measure, report): redo that stage
        cmd = "spvit demo" if cfg.report_style == "demo" else "spvit compress"
        raise runs.Interrupted(f"interrupted in stage {stage}; continue with: {cmd} --out {shlex.quote(out)} "
                               f"--resume", signal.SIGINT) from None
    finally:
        lock.release()
        torch.set_num_threads(threads_before)
    if "report" not in done:
        E.log(f"stopped after stage {done[-1] if done else 'none'}; continue with: spvit compress --out "
              f"{shlex.quote(out)} --resume")
        return {"stopped": True, "done": done}
    return _read_json(os.path.join(out, "summary.json"))


def _reopen(out: str):
    lock = runs.try_lock(out)
    if lock is None:
        raise E.RunError(f"run folder {out} is in use by another run; wait for it to end before resuming")
    for entry in os.scandir(out):  # temporary files of a killed run
        if entry.name.endswith(".spvit-tmp") and entry.is_file():
            os.remove(entry.path)
    return lock


def _run_search(plan: Plan) -> None:
    from . import search
    from .models import supernet

    scfg = plan.search_cfg
    if plan.table is not None:
        scfg = scfg.replace(latency_table=os.path.join(plan.out, TABLE_FILE), target_speedup=plan.cfg.target_speedup,
                            target_latency_ms=plan.cfg.target_latency_ms)
    if "loss_lambda" not in plan.cfg.search and paper_family(plan.dense.name) is None and plan.cfg.recipe != "none":
        scfg = scfg.replace(loss_lambda=LAMBDA_REL / plan.dense_gflops ** 2)  # no original lambda for this model
    scfg = scfg.replace(ffn_align=plan.ffn_align, **_stage_state(scfg.out)).validate()
    E.log(f"== search: {plan.dense.name} to " + (f"{plan.target_ms:.4g} ms per batch of {plan.cfg.batch}"
                                                 if plan.table is not None else f"{scfg.target_gflops:g} GFLOPs")
          + (f", FFN widths aligned to {plan.ffn_align}" if plan.ffn_align > 1 else "") + " ==")
    sn = None
    if plan.dense_ckpt is not None:  # the supernet of the dense model of a checkpoint (the teacher stage's)
        sn = supernet(_chosen(plan.dense_ckpt), theta=scfg.theta, alpha=scfg.alpha, model_name=plan.dense.name)
    res = search.run(scfg, supernet_module=sn)
    from .arch import Architecture

    E.log(Architecture.load(res["arch"]).summary())


def _run_deploy(plan: Plan) -> None:
    from . import latency as L
    from .deploy import deploy_checkpoint

    folder = os.path.join(plan.out, "deploy")
    lock = runs.open_run(folder, overwrite=runs.is_run_folder(folder))
    try:
        dev = _device(plan.cfg.device)
        deployed = deploy_checkpoint(os.path.join(plan.out, "finetune", "best.pth"), dtype=L.DTYPES[plan.cfg.dtype],
                                     device=dev)
        deployed.save(os.path.join(folder, "deployed.pth"))
        runs.write_json(deployed.architecture.to_dict(), os.path.join(folder, "arch.json"))
        E.log(f"== deploy: {os.path.join(folder, 'deployed.pth')} [{' '.join(deployed.architecture.attn_choices)}] ==")
    finally:
        lock.release()


def _run_measure(plan: Plan, ctx: Dict) -> None:
    from . import latency as L
    from .deploy import load_deployed
    from .flops import count_params, gflops

    cfg = plan.cfg
    E.log("== measure: accuracy (validation split) and latency of the dense and the compressed model ==")
    dev = _device(cfg.device)
    dtype = L.DTYPES[cfg.dtype]
    dense = _chosen(plan.dense_ckpt) if plan.dense_ckpt else _probe_model(plan, _check_data(plan, _size(plan)))
    pruned = _chosen(os.path.join(plan.out, "finetune", "best.pth"))
    size = pruned.architecture.signature.img_size[0]
    acc = {"dense_val_acc": accuracy(dense, cfg.data, size), "compressed_val_acc": accuracy(pruned, cfg.data, size)}
    if cfg.data == "digits":
        acc.update({"dense_test_acc": accuracy(dense, "digits", size, "test", 256),
                    "compressed_test_acc": accuracy(pruned, "digits", size, "test", 256)})
    deployed = load_deployed(os.path.join(plan.out, "deploy", "deployed.pth"), device=dev)
    dense_dep = L.dense_deployed(plan.dense.name, deployed.signature, dev, dtype,
                                 {**plan.dense.kwargs, "num_classes": deployed.signature.num_classes})
    t = plan.table
    threads_before = torch.get_num_threads()
    if t is not None and dev.type == "cpu" and t.device.get("threads"):
        torch.set_num_threads(int(t.device["threads"]))
    try:
        lat = measure_latency(deployed, dense_dep, t.batch if t is not None else cfg.batch, cfg.measure_rounds,
                              cfg.measure_budget, stat=t.meta.get("stat", "median") if t is not None else "median",
                              clock=t.meta.get("clock", "wall") if t is not None else "wall")
    finally:
        torch.set_num_threads(threads_before)
    if t is not None:
        lat.update({"predicted_ms": t.predict(deployed.architecture)["ms"], "dense_predicted_ms": t.dense_ms()})
        lat["predicted_speedup"] = lat["dense_predicted_ms"] / lat["predicted_ms"]
        lat["prediction_error"] = lat["predicted_ms"] / lat["compressed_ms"] - 1
    res = {**acc, "latency": lat, "dense_gflops": gflops(dense), "compressed_gflops": gflops(pruned),
           "dense_params": count_params(dense), "compressed_params": count_params(pruned),
           "device": {"name": L.device_name(dev), "class": L.device_class(dev), "threads": lat["threads"]}}
    runs.write_json(res, os.path.join(plan.out, MEASURE_FILE))
    E.log(f"measured speedup {lat['speedup']:.3f}x (rounds: {lat['speedup_min']:.3f} .. {lat['speedup_max']:.3f}); "
          f"val acc {acc['dense_val_acc']:.2f} -> {acc['compressed_val_acc']:.2f}")


def _size(plan: Plan) -> int:
    return E.model_input_size(plan.search_cfg)


def _versions() -> Dict[str, str]:
    from ._version import __version__

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    import timm

    return {"spvit": __version__, "torch": torch.__version__, "triton": tv, "timm": timm.__version__,
            "python": platform.python_version()}


def verdict(cfg: CompressConfig, m: Dict, target_ms: Optional[float]) -> Optional[str]:
    """A plain sentence when the result is further than :data:`MISS_TOLERANCE` from the request, with its likely
    cause; None when within."""
    lat = m["latency"]
    if cfg.target_gflops is not None:
        got = m["compressed_gflops"]
        if abs(got / cfg.target_gflops - 1) <= MISS_TOLERANCE:
            return None
        return (f"The compressed model has {got:.4g} GFLOPs, {100 * (got / cfg.target_gflops - 1):+.0f}% from the "
                f"requested {cfg.target_gflops:.4g}: the search ended away from its target (more search epochs or a "
                f"larger loss_lambda bring it closer).")
    requested = cfg.target_speedup if cfg.target_speedup is not None else lat["dense_ms"] / cfg.target_latency_ms
    got = lat["speedup"]
    off = got / requested - 1
    if abs(off) <= MISS_TOLERANCE:
        return None
    pred = lat.get("predicted_speedup")
    if pred is not None and abs(pred / requested - 1) > MISS_TOLERANCE:
        how = ("the gates moved too little: more search epochs, a larger arc_lr or loss_lambda" if pred < requested
               else "the search overshot: a smaller arc_lr, or more search epochs for the latency loss to pull it back")
        cause = (f"the search ended away from its target (the table predicts {pred:.3g}x for the architecture it read "
                 f"out; {how})")
    else:
        cause = (f"the latency table's prediction ({pred:.3g}x) does not hold on this measurement: the table was "
                 f"measured under other conditions (device load, thread setting, batch, clock) or the deployed "
                 f"widths run at other speeds than the table's grid; re-profile on an idle device")
    if lat["speedup_min"] <= requested <= lat["speedup_max"]:
        cause += f"; the request lies within the measured spread ({lat['speedup_min']:.3g}..{lat['speedup_max']:.3g})"
    return f"The measured speedup {got:.3g}x is {100 * off:+.0f}% from the requested {requested:.3g}x. Likely cause: " \
           f"{cause}."


def _run_report(plan: Plan, ctx: Dict, hook, wall: float) -> Dict:
    from .arch import Architecture

    cfg, out = plan.cfg, plan.out
    m = _read_json(os.path.join(out, MEASURE_FILE))
    arch = Architecture.load(os.path.join(out, "finetune", "arch.json"))
    lat = m["latency"]
    request = ({"target_speedup": cfg.target_speedup} if cfg.target_speedup is not None else
               {"target_latency_ms": cfg.target_latency_ms} if cfg.target_latency_ms is not None else
               {"target_gflops": cfg.target_gflops})
    if cfg.latency_target:
        request.update({"batch": lat["batch"], "dtype": cfg.dtype, "device": m["device"]["name"]})
    o = shlex.quote(out)
    summary = {
        "request": request,
        "model": plan.dense.name, "data": cfg.data, "recipe": cfg.recipe,
        "achieved": {
            "measured_speedup": lat["speedup"],
            "measured_speedup_spread": {"min": lat["speedup_min"], "q1": lat["speedup_q1"], "q3": lat["speedup_q3"],
                                        "max": lat["speedup_max"], "rounds": lat["rounds"]},
            "dense_ms": lat["dense_ms"], "compressed_ms": lat["compressed_ms"],
            "predicted_ms": lat.get("predicted_ms"), "predicted_speedup": lat.get("predicted_speedup"),
            "prediction_error": lat.get("prediction_error"),
            "dense_gflops": m["dense_gflops"], "compressed_gflops": m["compressed_gflops"],
            "dense_params": m["dense_params"], "compressed_params": m["compressed_params"],
            "dense_val_acc": m["dense_val_acc"], "compressed_val_acc": m["compressed_val_acc"],
        },
        "verdict": verdict(cfg, m, plan.target_ms),
        "blocks": [{"block": i, "attn": b.attn, "ffn_kept": b.ffn_width,
                    "ffn_total": (arch.signature.block_mlp_hidden[i])} for i, b in enumerate(arch.blocks)],
        "ffn_align": plan.ffn_align,
        "hardware": m["device"], "versions": _versions(), "platform": platform.platform(),
        "stage_s": ctx["times"],
        "commands": {"continue": f"spvit compress --out {o} --resume",
                     "reproduce": f"spvit compress --config {o}/{CONFIG_NAME} --out NEW_DIR",
                     **plan.stage_commands()},
    }
    summary["search_epochs"] = search_tradeoff(out)
    if hook is not None:
        summary = hook(summary, {"plan": plan, "measure": m, "wall_s": wall, "arch": arch})
    runs.write_json(summary, os.path.join(out, "summary.json"))
    try:
        from .plots import plot_compress

        plot_compress(out, summary)
        png = True
    except ImportError:
        png = False
        E.log("(matplotlib not installed: plots skipped)")
    runs.write_text(os.path.join(out, "report.md"), report_md(summary, png))
    E.log(f"report: {os.path.join(out, 'report.md')}")
    if summary["verdict"]:
        E.log("note: " + summary["verdict"])
    return summary


def search_tradeoff(out: str) -> List[Dict[str, Any]]:
    """Per search epoch: the read-out's GFLOPs, predicted latency (latency targets) and validation top-1."""
    import csv

    path = os.path.join(out, "search", "metrics.csv")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            g = r.get("arch_gflops") or r.get("gflops")
            rows.append({"epoch": int(r["epoch"]), "gflops": float(g) if g else None,
                         "predicted_ms": float(r["pred_ms"]) if r.get("pred_ms") else None,
                         "val_acc1": float(r["val_acc1"]) if r.get("val_acc1") else None})
    return rows


def report_md(s: Dict, png: bool) -> str:
    """The run's report (Markdown)."""
    a, r = s["achieved"], s["request"]
    sp = a["measured_speedup_spread"]
    req = ", ".join(f"{k} {v}" for k, v in r.items())
    lines = [f"# spvit compress: {s['model']} on {s['data']}", "",
             f"**Request:** {req} (recipe `{s['recipe']}`, "
             + (f"FFN widths read out as multiples of {s['ffn_align']})." if s["ffn_align"] > 1
                else "FFN widths not aligned)."),
             "",
             "| | dense | compressed |", "|---|---|---|",
             f"| latency (ms per batch, measured) | {a['dense_ms']:.4g} | {a['compressed_ms']:.4g} |"]
    if a.get("predicted_ms") is not None:
        lines.append(f"| latency (ms, predicted by the table) | — | {a['predicted_ms']:.4g} "
                     f"({100 * a['prediction_error']:+.1f}% vs measured) |")
    lines += [f"| GFLOPs (MACs/1e9) | {a['dense_gflops']:.4g} | {a['compressed_gflops']:.4g} |",
              f"| params | {a['dense_params']:,d} | {a['compressed_params']:,d} |",
              f"| top-1 on the validation split (%) | {a['dense_val_acc']:.2f} | {a['compressed_val_acc']:.2f} |", "",
              f"**Measured speedup: {a['measured_speedup']:.3f}x** (median over {sp['rounds']} alternated rounds; "
              f"spread {sp['min']:.3f} .. {sp['max']:.3f}, quartiles {sp['q1']:.3f} .. {sp['q3']:.3f})"
              + (f"; predicted {a['predicted_speedup']:.3f}x." if a.get("predicted_speedup") else "."), ""]
    lines.append(f"**{s['verdict']}**" if s["verdict"] else "The result is within 10% of the request.")
    lines += ["", "## Architecture", "", "| block | attention | FFN units kept |", "|---|---|---|"]
    lines += [f"| {b['block']} | {b['attn']} | {b['ffn_kept']}/{b['ffn_total']} |" for b in s["blocks"]]
    if s.get("search_epochs"):
        lines += ["", "## The search, epoch by epoch (architecture read out at each epoch's end)", "",
                  "| epoch | GFLOPs | predicted ms | validation top-1 (%) |", "|---|---|---|---|"]
        for r in s["search_epochs"]:
            ms = f"{r['predicted_ms']:.4g}" if r["predicted_ms"] is not None else "—"
            acc = f"{r['val_acc1']:.2f}" if r["val_acc1"] is not None else "—"
            gf = f"{r['gflops']:.4g}" if r["gflops"] is not None else "—"
            lines.append(f"| {r['epoch']} | {gf} | {ms} | {acc} |")
    if png:
        lines += ["", "![per-block choices and the search trade-off](report.png)"]
    d = s["hardware"]
    lines += ["", "## Device and versions", "", f"{d['name']} [{d['class']}], {d['threads']} thread(s); "
              + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + f"; {s['platform']}.", "",
              "Stage times (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in s["stage_s"].items()) + ".", "",
              "## Commands", "", "```bash"]
    lines += [f"{v}   # {k}" for k, v in s["commands"].items()]
    lines += ["```", ""]
    return "\n".join(lines)


def config_from_flags(flags: Dict[str, Any], config: Optional[str]) -> CompressConfig:
    """The config of a new run: defaults, then ``config`` (YAML), then the flags."""
    from .config import resolve

    return resolve(CompressConfig, flags, config)


def cli_run(flags: Dict[str, Any], config: Optional[str],
            hooks: Optional[Dict[str, Callable[[Dict, Dict], Dict]]] = None) -> Dict:
    """``spvit compress`` (and ``spvit demo --resume``): a new run, or ``--resume`` of the run in ``--out``.
    ``hooks``: the summary hook of a ``report_style`` (the demo's), for a resumed run."""
    flags = dict(flags)
    resume = bool(flags.pop("resume", False))
    allow = bool(flags.pop("allow_changes", False))
    stop_after = flags.pop("stop_after", None)
    if resume:
        if flags.get("overwrite"):
            raise ConfigError("--overwrite and --resume exclude each other")
        if not flags.get("out"):
            raise ConfigError("--resume needs --out (the run folder to continue)")
        cfg = _load_cfg(flags["out"], flags, config, allow)
        return run(cfg, resume=True, stop_after=stop_after, hook=(hooks or {}).get(cfg.report_style))
    return run(config_from_flags(flags, config), stop_after=stop_after)


__all__ = ["CompressConfig", "run", "cli_run", "measure_latency", "recipe_settings", "verdict", "QUICK_FRACTION",
           "STAGES"]


def add_parser(sub, suppress, json_dict) -> None:
    """The ``spvit compress`` sub-command's flags (every one defaults to the config's value)."""
    S = suppress
    p = sub.add_parser("compress", help="one command from a timm model and a dataset to a deployed model measured on "
                       "the device: profile, search, fine-tune with distillation, deploy, measure, report",
                       description="Stages: [teacher] -> profile (latency / speedup target) -> search -> fine-tune "
                       "with distillation from the dense model -> deploy -> measure -> report (report.md, "
                       "summary.json, report.png). Each stage writes the files of its own command in a sub-folder of "
                       "--out; `spvit compress --out DIR --resume` continues the stage that was running.")
    p.add_argument("--config", help="YAML of compress settings (flat keys named like the flags; 'train', 'teacher', "
                   "'search', 'finetune': mappings of stage settings that override the recipe)")
    g = p.add_argument_group("what")
    g.add_argument("--model", default=S, help="timm model name, or the best.pth of an spvit run (a dense model)")
    g.add_argument("--model-kwargs", type=json_dict, default=S, help="JSON object of extra timm.create_model kwargs")
    g.add_argument("--pretrained", default=S, help="weights of a timm name: 'timm' (default, the hub), 'none' or a "
                   "local file")
    g.add_argument("--data", default=S, help="ImageNet-layout folder (train/, val/ of class folders) or 'digits'")
    g.add_argument("--num-classes", type=int, default=S, help="must match the dataset (default: from the data)")
    g = p.add_argument_group("target (exactly one)")
    g.add_argument("--target-speedup", type=float, default=S, help="measured-latency speedup S over the dense model "
                   "on --device (a latency table is profiled first)")
    g.add_argument("--target-latency-ms", type=float, default=S, help="latency in ms per batch of --batch")
    g.add_argument("--target-gflops", type=float, default=S, help="FLOPs target in GFLOPs (no profiling)")
    g = p.add_argument_group("device")
    g.add_argument("--device", default=S, help="auto (default: CUDA when visible, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--batch", type=int, default=S, help="batch size the latency is profiled and measured at "
                   "(default 1)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=S, help="deployed dtype (default fp32)")
    g.add_argument("--threads", type=int, default=S, help="torch CPU threads for the whole run")
    g.add_argument("--latency-table", default=S, help="a table from `spvit profile` instead of profiling")
    g.add_argument("--ffn-align", type=int, default=S, help="read out FFN widths that are multiples of N (default: "
                   "the latency table's width step on the device; 0: off)")
    g.add_argument("--profile-budget", type=float, default=S, help="seconds of timing per piece of the latency "
                   "table (default 0.3)")
    g.add_argument("--measure-rounds", type=int, default=S, help="alternated timing rounds of the dense and the "
                   "compressed model (default 7: median speedup and its spread)")
    g = p.add_argument_group("training")
    g.add_argument("--recipe", choices=["paper", "quick", "none"], default=S,
                   help=f"paper: the original configuration of the model family (configs/); quick (default): the "
                        f"same with {QUICK_FRACTION:g} of its epochs, for a first look; none: the package defaults")
    g.add_argument("--teacher-epochs", type=int, default=S, help="train the dense model this many epochs first (a "
                   "model without pre-trained weights); it is then the teacher")
    g.add_argument("--distillation", choices=["none", "hard", "soft"], default=S,
                   help="distillation from the dense model in the fine-tune (default hard)")
    g.add_argument("--seed", type=int, default=S, help="random seed")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=S, help="run folder: created if new; an existing one is only continued "
                   "(--resume) or replaced (--overwrite)")
    g.add_argument("--overwrite", action="store_true", default=S, help="replace the run in --out (removes only "
                   "the files spvit wrote there)")
    g.add_argument("--resume", action="store_true", default=S, help="continue the run in --out from the stage "
                   "that was running (no other flag needed)")
    g.add_argument("--allow-changes", action="store_true", default=S, help="with --resume: accept changed settings")
    g.add_argument("--stop-after", choices=list(STAGES), default=S, help="end after this stage (--resume later)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bars")
