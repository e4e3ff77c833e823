"""The plan of an ``spvit compress`` run: its settings (:class:`CompressConfig`), the recipes, the dense model, every
stage's config resolved and every input checked (model, weights, data, device, the target's reachability on the
device) before the first file is written."""
from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from . import distributed as D
from . import hub
from . import latency as L
from . import runs
from .checkpoints import model_from_checkpoint
from .config import (BaseConfig, ConfigError, FinetuneConfig, SearchConfig, TrainConfig, _finite, _int_at_least,
                     check_device, find_config, flag, load_yaml)
from .data import build_datasets
from .engine import data_config
from .models import supernet
from .options import QUICK_FRACTION, STAGES  # noqa: F401 (STAGES: re-exported)
from .runs import RunError

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
# The dense model


def chosen_model(path: str) -> torch.nn.Module:
    return model_from_checkpoint(runs.load_torch_file(path), path).eval()


def device_of(name: str) -> torch.device:
    return D.init_distributed(name).device


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
            raise RunError(f"--model {cfg.model} is not a checkpoint of an spvit run (no model name and weights "
                           f"inside); give a timm name, with --pretrained for a local weights file")
        if isinstance(ck.get("arch"), dict):
            raise RunError(f"--model {cfg.model} holds an already pruned model; give the dense model")
        return Dense(ck["model_name"], dict(ck.get("model_kwargs") or {}), "none", cfg.model)
    return Dense(cfg.model, dict(cfg.model_kwargs), cfg.pretrained)


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


def probe_model(plan: Plan, num_classes: int) -> torch.nn.Module:
    """The dense model with its weights (checks the name, the kwargs and the weights)."""
    d = plan.dense
    if d.checkpoint is not None:
        return chosen_model(d.checkpoint)
    weights = None if plan.has_dense_stage else d.pretrained
    with torch.random.fork_rng(devices=[]):  # random weights (no pre-trained ones): the same model every time
        torch.manual_seed(plan.cfg.seed)
        return hub.build_timm_model(d.name, num_classes, weights, 0.0, d.kwargs)


def check_data(plan: Plan, size: int) -> int:
    """The number of classes of ``--data`` (the training and validation splits are read, nothing is loaded)."""
    scfg = plan.search_cfg
    _, val = build_datasets(scfg.data, data_config(scfg, size), need_train=True)
    n = val.num_classes
    if plan.cfg.num_classes is not None and plan.cfg.num_classes != n:
        raise RunError(f"--num-classes {plan.cfg.num_classes} disagrees with the dataset, which has {n} classes")
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
    cfg = plan.cfg
    dev = device_of(cfg.device)
    size = hub.model_input_size(plan.search_cfg)
    ncls = check_data(plan, size)
    model = probe_model(plan, ncls)
    try:
        sn = supernet(model, model_name=plan.dense.name)
    except ValueError as exc:
        raise RunError(f"--model {cfg.model}: {exc}") from None
    plan.dense_gflops = sn.dense_gflops()
    if not cfg.latency_target:
        try:
            sn.check_target(cfg.target_gflops)
        except ValueError as exc:
            raise RunError(f"--target-gflops: {exc}") from None
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
            D.log(f"== profile: latency table of {plan.dense.name} on {L.device_name(dev)} (batch {cfg.batch}, "
                  f"{cfg.dtype}) ==")
            t0 = time.perf_counter()
            table = L.profile(model, device=dev, dtype=cfg.dtype, batch=cfg.batch, threads=cfg.threads,
                              budget_s=cfg.profile_budget, rounds=cfg.profile_rounds, model_name=plan.dense.name,
                              show=cfg.progress)
            plan.profile_s = time.perf_counter() - t0
    except (L.LatencyTableError, OSError) as exc:
        raise RunError(f"latency table: {exc}") from None
    finally:
        torch.set_num_threads(threads_before)
    try:
        table.check_model(sn.signature, plan.dense.name)
        plan.target_ms = L.resolve_target(table, cfg.target_speedup, cfg.target_latency_ms)
    except ValueError as exc:
        raise RunError(f"{exc} (on {table.device.get('name')}, batch {table.batch}, {table.dtype})") from None
    plan.table = table
    plan.ffn_align = default_ffn_align(table) if cfg.ffn_align is None else cfg.ffn_align


def input_size(plan: Plan) -> int:
    return hub.model_input_size(plan.search_cfg)
