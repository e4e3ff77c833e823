"""timm models by name: the name checked, weights from the timm hub (failing at once when it is unreachable) or a
local file (safe load, another head size or image size adapted), and the image size a run builds its model for."""
from __future__ import annotations

import contextlib
import difflib
import os
import socket
from typing import Dict, Iterator, Optional

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from . import models  # noqa: F401  (registers the spvit_* models with timm)
from . import runs
from .config import TrainConfig
from .distributed import DistInfo, log
from .runs import RunError


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when the hub is declared offline (HF_HUB_OFFLINE) or cannot be reached within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_mode(offline: bool) -> Iterator[None]:
    """Make huggingface_hub use its local cache only (no retries) while ``offline``."""
    if not offline:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def check_model_name(name: Optional[str], flag: str = "--model") -> None:
    """Raise :class:`RunError` for a model name timm does not know (spvit's models are registered with timm), with
    the closest known names."""
    if not name or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists the known names)"
    raise RunError(f"{flag} {name}: unknown timm model{hint}")


def build_timm_model(name: str, num_classes: int, pretrained: Optional[str] = None, drop_path: float = 0.0,
                     model_kwargs: Optional[Dict] = None, dist: Optional[DistInfo] = None,
                     weights_flag: str = "--pretrained") -> nn.Module:
    """A timm model by name. ``pretrained``: None / "none" (random init), "timm" (the timm hub: needs network or
    the local hub cache; an offline machine fails at once, naming the alternatives), or a local checkpoint path (a
    classifier head of another size is left at its fresh init)."""
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise RunError(f"model kwargs must be a JSON object (a mapping), got {model_kwargs!r}")
    hub = pretrained == "timm"
    check_model_name(name, "--teacher" if weights_flag == "--teacher-weights" else "--model")
    offline = hub and not _hub_reachable()
    try:
        with _hub_offline_mode(offline):
            model = timm.create_model(name, pretrained=hub, num_classes=num_classes, drop_path_rate=drop_path,
                                      **(model_kwargs or {}))
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            check_model_name(name)
            raise RunError(f"unknown timm model {name!r}") from None
        if not hub:
            raise RunError(f"cannot build {name} with {model_kwargs}: {str(exc).splitlines()[0][:200]}") from None
        raise _hub_error(name, exc, offline, weights_flag) from None
    except (TypeError, AssertionError, ValueError, ZeroDivisionError, KeyError, IndexError) as exc:
        detail = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RunError(f"cannot build {name} with model kwargs {model_kwargs}: {detail}") from None
    except Exception as exc:  # hub / network errors of every kind
        if not hub:
            raise
        raise _hub_error(name, exc, offline, weights_flag) from None
    if pretrained not in (None, "", "none", "timm"):
        load_local_weights(model, pretrained, dist, weights_flag)
    return model


def _hub_error(name: str, exc: BaseException, offline: bool, weights_flag: str) -> RunError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    where = "the hub is not reachable and they are not in the local cache" if offline else first
    return RunError(f"{weights_flag} timm: cannot get the pretrained weights of {name} ({where}); use "
                    f"{weights_flag} none (random init) or {weights_flag} <file> (a local checkpoint)")


def load_local_weights(model: nn.Module, path: str, dist: Optional[DistInfo] = None,
                       what: str = "--pretrained") -> None:
    """Load a local checkpoint into a timm model (safe load), non-strict for a differently sized head; report what
    was skipped."""
    state = dict(runs.state_dict_of(runs.load_torch_file(path, f"{what} file"), path, f"{what} file"))
    own = model.state_dict()
    pe = state.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape and pe.dim() == 3:
        # weights of another image size: resample the grid
        npt = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=npt)
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    res = model.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if k not in skipped]
    if len(missing) > len(own) // 2:
        raise RunError(f"{what} file {path} does not fit the model: {len(missing)} of {len(own)} weights missing "
                       f"(e.g. {missing[:3]})")
    msg = f"loaded {path}"
    if skipped or missing:
        msg += f" (left at init: {len(skipped) + len(missing)} tensors, e.g. {(skipped + missing)[:3]})"
    log(msg, dist)


def timm_default_size(model_name: Optional[str]) -> int:
    """The input size a timm model is built for (224 when unknown)."""
    try:
        pc = timm.models.get_pretrained_cfg(model_name) if model_name else None
        size = getattr(pc, "input_size", None) if pc is not None else None
        if size:
            return int(size[-1])
        if model_name and timm.is_model(model_name):  # no pretrained config (e.g. spvit_demo_vit): build it, empty
            with torch.device("meta"):
                m = timm.create_model(model_name, pretrained=False)
            img = getattr(getattr(m, "patch_embed", None), "img_size", None)
            if img:
                return int(img[0])
    except Exception:  # an unknown name is reported when the model is built
        pass
    return 224


def model_input_size(cfg: TrainConfig, arch_size: Optional[int] = None) -> int:
    """The one image size of a run: ``--input-size``, else ``model_kwargs.img_size``, else the architecture's,
    else the timm model's default. A disagreement with the architecture is an error."""
    size = cfg.input_size or cfg.model_kwargs.get("img_size") or arch_size or timm_default_size(cfg.model)
    if arch_size is not None and size != arch_size:
        raise RunError(f"image size {size} differs from the architecture's ({arch_size}, from the grid it was "
                       f"searched on); fine-tune at --input-size {arch_size}")
    return int(size)


def model_kwargs_for(cfg: TrainConfig, size: int) -> Dict:
    """``model_kwargs`` with ``img_size`` set when the run's size is not the model's default."""
    kw = dict(cfg.model_kwargs or {})
    if "img_size" not in kw and size != timm_default_size(cfg.model):
        kw["img_size"] = size
    return kw
