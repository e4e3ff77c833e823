"""The checkpoint of a run that holds a model (``best.pth`` and ``checkpoint.pth``): what it records besides the
weights, and the model it describes.

Format: a dict loadable with ``torch.load(weights_only=True)`` with

* ``model``: the state dict of the model (a pruned model when ``arch`` is present, else the dense timm model);
* ``model_name``, ``model_kwargs``, ``num_classes``: the timm model (and kwargs) the run built;
* ``arch`` (fine-tune runs): :meth:`spvit.arch.Architecture.to_dict` of the pruned model's architecture.

``checkpoint.pth`` holds the same keys and what a resume needs (optimisers, scaler, EMA, epoch, RNG states: see
:func:`spvit.engine.fit`). Every reader of these files (fine-tune's teacher, ``spvit eval``, ``spvit bench``,
``spvit deploy`` / :func:`spvit.deploy_checkpoint`, compress and the demo) goes through :func:`model_from_checkpoint`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.nn as nn

from . import hub, runs
from .arch import Architecture
from .models import prune
from .runs import RunError


def model_meta(model_name: str, model_kwargs: Optional[Dict], num_classes: int,
               arch: Optional[Architecture] = None) -> Dict[str, Any]:
    """The keys a run writes next to the weights (``arch`` for a pruned model)."""
    meta = {"model_name": model_name, "model_kwargs": model_kwargs, "num_classes": num_classes}
    if arch is not None:
        meta["arch"] = arch.to_dict()
    return meta


def load_state(module: nn.Module, state: Dict, path: str, what: str) -> None:
    """``module.load_state_dict(state)`` with a mismatch reported as one :class:`RunError` line."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith("size mismatch")), lines[-1] if lines else str(exc))
        raise RunError(f"{what} {path} does not fit the model ({detail[:300]}); it was made for another model, "
                       f"architecture or image size") from None


def model_from_checkpoint(ck: Any, path: str, what: str = "checkpoint", model_name: Optional[str] = None) -> nn.Module:
    """The model a checkpoint of a run describes (the pruned model when it records an architecture, else the dense
    timm model), with its weights. ``model_name`` replaces the recorded timm name. A file that is not such a
    checkpoint, or whose weights do not fit, is a :class:`RunError` (a ``ValueError``) naming ``path``."""
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        raise RunError(f"{what} {path} is not a checkpoint of an spvit run (no model name and weights inside)")
    arch = None
    if isinstance(ck.get("arch"), dict):
        try:
            arch = Architecture.from_dict(ck["arch"])
        except (ValueError, TypeError, KeyError) as exc:
            raise RunError(f"{what} {path}: malformed architecture record ({exc})") from None
    name = model_name or ck.get("model_name") or (arch.model_name if arch is not None else None)
    if not name:
        raise RunError(f"{what} {path} is not a checkpoint of an spvit run (no model name and weights inside)")
    kwargs, ncls = ck.get("model_kwargs") or {}, ck.get("num_classes")
    if arch is not None:
        dense = hub.build_timm_model(name, ncls or arch.signature.num_classes, None, 0.0, kwargs)
        try:
            model = prune(dense, arch)
        except ValueError as exc:
            raise RunError(f"architecture {getattr(arch, 'model_name', '?')} does not fit model {name}: {exc}") \
                from None
    else:
        if not ncls:
            raise RunError(f"{what} {path} does not record its number of classes")
        model = hub.build_timm_model(name, ncls, None, 0.0, kwargs)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ck["model"].items()}  # DDP's prefix
    load_state(model, state, path, what)
    return model


def load_finetuned(path: str) -> Tuple[nn.Module, Dict]:
    """A fine-tuned pruned model (eval mode) and its checkpoint, from a ``best.pth`` / ``checkpoint.pth`` of a
    fine-tune run (loaded with ``weights_only=True``)."""
    ck = runs.load_torch_file(path, "checkpoint")
    if not isinstance(ck, dict) or not isinstance(ck.get("arch"), dict) or "model" not in ck:
        raise RunError(f"{path} is not a checkpoint of `spvit finetune` (no architecture inside)")
    return model_from_checkpoint(ck, path).eval(), ck
