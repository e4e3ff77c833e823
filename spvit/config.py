"""Typed run configurations, resolved once: defaults, then a YAML file (``--config``), then the command-line flags.

Every setting is a field of a dataclass (:class:`SearchConfig`, :class:`FinetuneConfig`, :class:`DemoConfig`,
:class:`EvalConfig`); YAML keys and flags have the field's name (flags with dashes). Types are checked when a value
comes in (``epochs: three`` is an error) and :meth:`validate` checks every range in one place. The resolved
configuration is saved in the run folder (``config.yaml``) and is what ``--resume`` continues from.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .data import DataConfig
from .options import DEVICE_HELP
from .runs import RunError, write_text

_DATA = DataConfig()  # the data recipe's defaults live in spvit.data.DataConfig alone

MAX_IMAGE_SIZE = 4096  # image side in pixels: a 16-pixel-patch ViT has 65,536 tokens there
# Settings that do not change what a run computes: --resume accepts new values for them.
EXECUTION_ONLY = ("out", "resume", "overwrite", "allow_changes", "progress", "num_workers", "pin_mem", "tensorboard",
                  "stop_after_epoch", "config_file", "eval_batch_size")
# Settings that let a file run code when it is loaded: honoured only from the command line of the current invocation
# (never from a --config file nor from a run folder's saved config.yaml) and never saved.
CODE_RUNNING = ("teacher_file_runs_code",)


# Flags that control one invocation, not what the run computes: never saved in config.yaml and never taken from it
# (a plain --resume continues to the end, whatever flags the earlier invocations had).
RUN_CONTROL = {"resume": False, "overwrite": False, "allow_changes": False, "stop_after_epoch": None}


def without_run_control(cfg: "BaseConfig") -> "BaseConfig":
    """``cfg`` with the run-control flags (:data:`RUN_CONTROL`) at their defaults."""
    return cfg.replace(**{k: v for k, v in RUN_CONTROL.items() if hasattr(cfg, k)})


class ConfigError(RunError):
    """A bad setting (unknown key, wrong type, out of range); the CLI prints one line and exits with code 2."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite(name: str, v: Optional[float], lo: Optional[float] = None, hi: Optional[float] = None,
            lo_open: bool = False, hi_open: bool = False) -> None:
    if v is None:
        return
    if not math.isfinite(v):
        raise ConfigError(f"{flag(name)} must be a finite number, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{flag(name)} must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ConfigError(f"{flag(name)} must be {'<' if hi_open else '<='} {hi:g}, got {v:g}")


def _int_at_least(name: str, v: Optional[int], lo: int) -> None:
    if v is not None and v < lo:
        raise ConfigError(f"{flag(name)} must be >= {lo}, got {v}")


def check_device(device: str) -> None:
    d = device.lower()
    if d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()):
        return
    raise ConfigError(f"--device {device!r} is not supported; use {DEVICE_HELP}")


def _coerce(name: str, tp: Any, v: Any) -> Any:
    """``v`` as the field's type (YAML / JSON values and flags), or ConfigError naming the setting."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            return None
        return _coerce(name, args[0], v)
    want = origin or tp
    if want is bool:
        if isinstance(v, bool):
            return v
    elif want is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
    elif want is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
    elif want is str:
        if isinstance(v, str):
            return v
    elif want in (dict, Dict):
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return dict(v)
    elif want in (list, List):
        if isinstance(v, (list, tuple)):
            return list(v)
    else:
        return v
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            list: "a list"}.get(want, str(want))
    raise ConfigError(f"setting {name} ({flag(name)}) must be {kind}, got {v!r}")


@dataclass
class BaseConfig:
    """Common machinery: typed construction from a mapping, validation, saving."""

    @classmethod
    def field_types(cls) -> Dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "config", base: Optional["BaseConfig"] = None):
        """A config from ``base`` (or the defaults) updated with ``d``; unknown keys and wrong types are errors."""
        types = cls.field_types()
        unknown = sorted(k for k in d if k not in types)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        if source not in ("flags", "arguments"):  # the command line, or the Python caller's own arguments
            for k in CODE_RUNNING:
                if k in d and d[k] is not False:
                    raise ConfigError(f"{source}: setting {k} is accepted only on the command line ({flag(k)}): "
                                      f"a file cannot allow code from another file to run")
        values = dataclasses.asdict(base) if base is not None else {}
        values.update({k: _coerce(k, types[k], v) for k, v in d.items()})
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate(self) -> "BaseConfig":
        return self


@dataclass
class TrainConfig(BaseConfig):
    """Settings shared by search, fine-tune and the demo's teacher training: the DeiT recipe (docs/method.md §4.5,
    §8.1)."""

    model: Optional[str] = "deit_small_patch16_224"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = "timm"
    data: Optional[str] = None
    num_classes: Optional[int] = None
    out: Optional[str] = None
    overwrite: bool = False
    resume: bool = False
    allow_changes: bool = False
    stop_after_epoch: Optional[int] = None
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    epochs: int = 21
    sched_epochs: Optional[int] = None
    lr: float = 5e-5
    scale_lr: bool = True
    # the Swin recipe (docs/method.md §7.6) scales every learning rate (min, warm-up, architecture lr and its floor)
    # by global batch / 512, DeiT's only the weight lr
    scale_all_lrs: bool = False
    sched_per_step: bool = False  # cosine schedules updated every iteration (the Swin recipe) instead of every epoch
    min_lr: float = 1e-5
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    opt_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: Optional[float] = None
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    drop_path: float = 0.1
    num_workers: int = min(8, os.cpu_count() or 1)
    pin_mem: bool = True
    tensorboard: bool = True
    progress: bool = True
    # data recipe; input_size None: the model's own size (model_kwargs img_size, the architecture's, or timm's)
    input_size: Optional[int] = None
    color_jitter: float = _DATA.color_jitter
    aa: Optional[str] = _DATA.aa
    train_interpolation: str = _DATA.train_interpolation
    reprob: float = _DATA.reprob
    remode: str = _DATA.remode
    recount: int = _DATA.recount
    crop_pct: float = _DATA.crop_pct
    mixup: float = _DATA.mixup
    cutmix: float = _DATA.cutmix
    mixup_prob: float = _DATA.mixup_prob
    mixup_switch_prob: float = _DATA.mixup_switch_prob
    mixup_mode: str = _DATA.mixup_mode
    smoothing: float = _DATA.smoothing
    repeated_aug: bool = _DATA.repeated_aug
    digits_augment: bool = True
    digits_shift: int = 2  # random shift (pixels of the upsampled image) of the digits training images
    train_limit: Optional[int] = None  # use only the first N training / validation images (quick runs, tests)
    val_limit: Optional[int] = None
    config_file: Optional[str] = None

    def validate(self) -> "TrainConfig":
        for name in ("lr",):
            _finite(name, getattr(self, name), 0, lo_open=True)
        for name in ("min_lr", "warmup_lr", "weight_decay", "mixup", "cutmix"):
            _finite(name, getattr(self, name), 0)
        _finite("color_jitter", self.color_jitter, 0, 1)  # brightness / contrast / saturation factors in [1-c, 1+c]
        _finite("opt_eps", self.opt_eps, 0, lo_open=True)
        _finite("clip_grad", self.clip_grad, 0, lo_open=True)
        for name in ("smoothing", "drop_path"):
            _finite(name, getattr(self, name), 0, 1, hi_open=True)
        for name in ("reprob", "mixup_prob", "mixup_switch_prob", "model_ema_decay"):
            _finite(name, getattr(self, name), 0, 1)
        _finite("crop_pct", self.crop_pct, 0, 1, lo_open=True)
        if len(self.opt_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.opt_betas):
            raise ConfigError(f"opt_betas must be two numbers in [0, 1), got {self.opt_betas}")
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("eval_batch_size", self.eval_batch_size, 1)
        _int_at_least("epochs", self.epochs, 1)
        _int_at_least("sched_epochs", self.sched_epochs, 1)
        _int_at_least("warmup_epochs", self.warmup_epochs, 0)
        _int_at_least("stop_after_epoch", self.stop_after_epoch, 0)
        _int_at_least("num_workers", self.num_workers, 0)
        _int_at_least("num_classes", self.num_classes, 2)
        _int_at_least("input_size", self.input_size, 1)
        _int_at_least("train_limit", self.train_limit, 1)
        _int_at_least("val_limit", self.val_limit, 1)
        _int_at_least("digits_shift", self.digits_shift, 0)
        check_device(self.device)
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ConfigError(f"--amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ConfigError(f"mixup_mode must be batch, pair or elem, got {self.mixup_mode!r}")
        if self.overwrite and self.resume:
            raise ConfigError("--overwrite and --resume exclude each other")
        ms = self.model_kwargs.get("img_size")
        for what, v in (("--input-size", self.input_size), ("--model-kwargs img_size", ms)):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_IMAGE_SIZE:
                raise ConfigError(f"{what} {v} is beyond {MAX_IMAGE_SIZE} pixels (the token grid would not fit in "
                                  f"memory)")
        if self.input_size is not None and ms is not None and ms != self.input_size:
            raise ConfigError(f"--input-size {self.input_size} disagrees with --model-kwargs img_size {ms}")
        return self

    @property
    def schedule_length(self) -> int:
        return self.sched_epochs or self.epochs


@dataclass
class SearchConfig(TrainConfig):
    """``spvit search``: the supernet under the FLOPs loss (docs/method.md §4)."""

    min_lr: float = 1e-4
    sched_epochs: Optional[int] = 300
    target_gflops: float = 3.2
    loss_lambda: float = 3.0
    arc_lr: float = 5e-4
    arc_min_lr: Optional[float] = None
    arc_sched_epochs: Optional[int] = None  # cosine length of the gate logits' schedule (Swin: 150); default the lr's
    theta: float = 1.5
    alpha: Optional[float] = None  # head-mixing temperature; None: the model family's (0.01 DeiT, 100 Swin)
    # hardware-aware search (docs/method.md §11.4): a latency table replaces the FLOPs target by a latency target
    latency_table: Optional[str] = None
    target_speedup: Optional[float] = None
    target_latency_ms: Optional[float] = None
    ffn_align: int = 0  # read out a multiple of this many units per FFN (0 / 1: off, the original rule)

    def validate(self) -> "SearchConfig":
        super().validate()
        _int_at_least("ffn_align", self.ffn_align, 0)
        _finite("target_speedup", self.target_speedup, 0, lo_open=True)
        _finite("target_latency_ms", self.target_latency_ms, 0, lo_open=True)
        if self.latency_table:
            if (self.target_speedup is None) == (self.target_latency_ms is None):
                raise ConfigError("--latency-table needs exactly one of --target-speedup and --target-latency-ms")
        elif self.target_speedup is not None or self.target_latency_ms is not None:
            raise ConfigError("--target-speedup / --target-latency-ms need --latency-table (from `spvit profile`)")
        _finite("target_gflops", self.target_gflops, 0, lo_open=True)
        _finite("loss_lambda", self.loss_lambda, 0)
        _finite("arc_lr", self.arc_lr, 0)
        _finite("arc_min_lr", self.arc_min_lr, 0)
        _int_at_least("arc_sched_epochs", self.arc_sched_epochs, 1)
        _finite("theta", self.theta, -50, 50)  # sigmoid(50) is 1 in double precision: the gates could not learn
        _finite("alpha", self.alpha, 0, lo_open=True)
        return self


@dataclass
class FinetuneConfig(TrainConfig):
    """``spvit finetune``: the pruned model of an architecture, optionally distilled (docs/method.md §5)."""

    model: Optional[str] = None  # from the architecture file when not given
    arch: Optional[str] = None
    init: str = "pretrained"
    epochs: int = 130
    min_lr: float = 1e-5
    teacher: Optional[str] = None
    teacher_weights: Optional[str] = "timm"
    teacher_kwargs: Dict[str, Any] = field(default_factory=dict)
    teacher_file_runs_code: bool = False
    distillation: str = "none"
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0

    def validate(self) -> "FinetuneConfig":
        super().validate()
        if self.distillation not in ("none", "hard", "soft"):
            raise ConfigError(f"--distillation must be none, hard or soft, got {self.distillation!r}")
        _finite("distillation_alpha", self.distillation_alpha, 0, 1)
        _finite("distillation_tau", self.distillation_tau, 0, lo_open=True)
        if self.distillation != "none" and not self.teacher:
            raise ConfigError(f"--distillation {self.distillation} needs --teacher (a timm model name or a "
                              f"checkpoint file of a run)")
        if not self.arch:
            raise ConfigError("--arch is required (the arch.json written by `spvit search`)")
        return self


@dataclass
class DemoConfig(BaseConfig):
    """``spvit demo``: teacher, search and fine-tune on the embedded digits (each stage's config is saved)."""

    out: str = "spvit_demo"
    overwrite: bool = False
    device: str = "cpu"
    seed: int = 0
    # one torch thread: the results do not depend on the machine's core count (torch's CPU kernels may sum in another
    # order with more threads), and a busy machine does not slow the run down by thread oversubscription
    threads: Optional[int] = 1
    progress: bool = True
    model_kwargs: Dict[str, Any] = field(default_factory=lambda: {
        "img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 6, "num_heads": 4,
        "mlp_ratio": 4.0})
    batch_size: int = 32
    digits_shift: int = 1
    teacher_epochs: int = 30
    teacher_lr: float = 2e-3
    search_epochs: int = 10
    search_lr: float = 5e-4
    arc_lr: float = 2e-2
    target_fraction: float = 0.6
    # lambda of the FLOPs loss relative to the model size: lambda = lambda_rel / dense_gflops^2, so the loss is
    # lambda_rel * (T/F_dense - F/F_dense)^2 (DeiT-S's lambda 3 at 4.59 G is lambda_rel ~ 63)
    lambda_rel: float = 60.0
    finetune_epochs: int = 15
    finetune_lr: float = 5e-4
    distillation: str = "hard"
    train_limit: Optional[int] = None  # quick runs / tests only
    config_file: Optional[str] = None

    def validate(self) -> "DemoConfig":
        check_device(self.device)
        _int_at_least("threads", self.threads, 1)
        _int_at_least("batch_size", self.batch_size, 1)
        for name in ("teacher_epochs", "search_epochs", "finetune_epochs"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("teacher_lr", "search_lr"):
            _finite(name, getattr(self, name), 0, lo_open=True)
        _finite("finetune_lr", self.finetune_lr, 0, lo_open=True)
        _finite("arc_lr", self.arc_lr, 0)
        _finite("lambda_rel", self.lambda_rel, 0)
        _finite("target_fraction", self.target_fraction, 0, 1, lo_open=True)
        if self.distillation not in ("none", "hard", "soft"):
            raise ConfigError(f"--distillation must be none, hard or soft, got {self.distillation!r}")
        _int_at_least("train_limit", self.train_limit, 1)
        if "img_size" not in self.model_kwargs:
            raise ConfigError("the demo's model_kwargs need img_size")
        return self


@dataclass
class EvalConfig(BaseConfig):
    """``spvit eval``: accuracy of a fine-tuned checkpoint or of a dense timm model."""

    checkpoint: Optional[str] = None
    model: Optional[str] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = "timm"
    data: Optional[str] = None
    batch_size: int = 100
    device: str = "auto"
    amp: str = "auto"
    input_size: Optional[int] = None
    crop_pct: float = 0.875
    num_workers: int = min(8, os.cpu_count() or 1)
    config_file: Optional[str] = None

    def validate(self) -> "EvalConfig":
        check_device(self.device)
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("num_workers", self.num_workers, 0)
        _int_at_least("input_size", self.input_size, 1)
        if not self.data:
            raise ConfigError("--data is required (an ImageNet-layout folder, or 'digits')")
        if not self.checkpoint and not self.model:
            raise ConfigError("give --checkpoint (a fine-tuned best.pth) or --model (a dense timm model)")
        return self


def changed_settings(old: BaseConfig, new: BaseConfig) -> List[str]:
    """Names of the settings (other than execution-only ones) whose values differ."""
    a, b = old.to_dict(), new.to_dict()
    return [k for k in b if k not in EXECUTION_ONLY and k not in CODE_RUNNING and a.get(k) != b[k]]


# ----------------------------------------------------------------------------------------------------------------
# Resolution: defaults (or a run's saved config), then YAML, then flags

CONFIG_DIRS = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"),
               os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")]


def find_config(path: str) -> str:
    """``path`` itself, or a shipped config by name (``configs/<name>.yaml``)."""
    if os.path.isfile(path):
        return path
    for d in CONFIG_DIRS:
        for cand in (os.path.join(d, path), os.path.join(d, path + ".yaml")):
            if os.path.isfile(cand):
                return cand
    raise ConfigError(f"config file not found: {path}")


def load_yaml(path: str) -> Dict[str, Any]:
    """A mapping of settings from a YAML file (safe loader)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            y = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        first = str(exc).replace("\n", " ")[:200]
        raise ConfigError(f"{path} is not valid YAML: {first}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if y is None:
        return {}
    if not isinstance(y, dict):
        raise ConfigError(f"{path} must hold a mapping of settings (key: value lines)")
    return y


def resolve(cls, flags: Dict[str, Any], config: Optional[str] = None, base: Optional[BaseConfig] = None):
    """The validated config of ``cls``: ``base`` (or the defaults), then the YAML file ``config``, then ``flags``."""
    cfg = base if base is not None else cls()
    if config:
        path = find_config(config)
        cfg = cls.from_dict(load_yaml(path), source=path, base=cfg)
        cfg = cfg.replace(config_file=path)
    cfg = cls.from_dict(flags, source="flags", base=cfg)
    return cfg.validate()


def save(cfg: BaseConfig, path: str) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    d = {k: v for k, v in cfg.to_dict().items() if k not in CODE_RUNNING}  # typed anew at every invocation
    write_text(path, yaml.safe_dump(d, sort_keys=False))


def load_saved(cls, path: str):
    """The config a run saved (``config.yaml`` of its folder)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: the run folder has no saved config to resume from")
    # a code-running setting in a saved config (written by hand, or by an older version) is dropped: only the
    # command line of this invocation can allow it
    return cls.from_dict({k: v for k, v in load_yaml(path).items() if k not in CODE_RUNNING}, source=path)
