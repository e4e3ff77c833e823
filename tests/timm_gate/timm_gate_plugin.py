"""pytest plugin restricting timm's own model tests (``tests/test_models.py`` of timm's source distribution) to the
models spvit registers with timm. Loaded by tests/test_timm_models_gate.py with ``-p timm_gate_plugin``.

Only the model selection changes, timm's assertions run as written: timm's test module builds its per-test model
lists at import with ``timm.list_models`` / ``timm.list_pretrained`` and family filters (``deit*``,
``module='deit'``, ...). Those two functions are replaced before the module is imported: an spvit model is listed by
a query exactly when the timm model it is built on (the ``timm_base`` attribute of its entry point) is, and it passes
the query's name-level conditions itself (exclusions, ``pretrained``, ``name_matches_cfg``). Test items with a
hard-coded list of timm models (no spvit model among them) are deselected. Importing this module changes nothing;
the swap happens in ``pytest_configure``.
"""
from __future__ import annotations

from typing import Dict, List

import timm
import timm.models

import spvit.models  # noqa: F401  (registers the spvit models with timm)

_list_models = timm.list_models


def spvit_models() -> Dict[str, str]:
    """Every model registered with timm by spvit -> the timm model it is built on."""
    out = {}
    for name in _list_models():
        fn = timm.models.model_entrypoint(name)
        if fn.__module__.split(".")[0] != "spvit":
            continue
        base = getattr(fn, "timm_base", None)
        if not base or not timm.models.is_model(base):
            raise RuntimeError(f"spvit registration {name} declares no timm base model (entry point attribute "
                               f"timm_base = {base!r}); the timm test gate selects tests by it")
        out[name] = base
    return out


SPVIT_MODELS = spvit_models()


def _strip_tag(name: str) -> str:
    return name.split(".", 1)[0]


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None) -> List[str]:
    """timm.list_models restricted to spvit models selected as their base models would be (see module doc)."""
    own = _list_models(pretrained=pretrained, exclude_filters=exclude_filters, name_matches_cfg=name_matches_cfg,
                       include_tags=include_tags)
    family = set(_list_models(filter=filter, module=module, exclude_filters=exclude_filters))
    return [n for n in own if _strip_tag(n) in SPVIT_MODELS and SPVIT_MODELS[_strip_tag(n)] in family]


def list_pretrained(filter="", exclude_filters="") -> List[str]:
    return list_models(filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)


def pytest_configure(config):
    """Swap the two functions in before timm's test module is imported (at collection)."""
    timm.list_models = list_models
    timm.list_pretrained = list_pretrained


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        name = spec.params.get("model_name") if spec is not None else None
        selected = isinstance(name, str) and _strip_tag(name) in SPVIT_MODELS
        (keep if selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    return ["spvit timm gate: " + ", ".join(f"{k} (as {v})" for k, v in sorted(SPVIT_MODELS.items()))]

