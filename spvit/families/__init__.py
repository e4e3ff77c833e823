"""Model families: how each kind of timm model is searched, pruned, deployed, loaded from original checkpoints,
counted and timed (one module per family; docs/families.md).

:func:`family_of` is the one lookup from a model (a timm model or an spvit model wrapping one), a timm model name, a
signature, an architecture or a deployed model's config to its :class:`~spvit.families.base.Family`. The family
modules are listed by name in :data:`FAMILY_MODULES` and imported on the first lookup: they build on the model,
deployment and loading modules, which in turn dispatch through this lookup, so the list cannot be imported eagerly
from below. The first family whose ``matches`` accepts a model wins; the last one listed (ViT) is the default, whose
own checks then name what is unsupported.
"""
from __future__ import annotations

import importlib
from typing import Any, List, Tuple

from .base import Family

# Module of each family, most specific first; the last is the default.
FAMILY_MODULES: Tuple[str, ...] = ("spvit.families.swin", "spvit.families.vit")

_FAMILIES: List[Family] = []


def families() -> Tuple[Family, ...]:
    """Every family, in lookup order (the default last)."""
    if not _FAMILIES:
        _FAMILIES.extend(importlib.import_module(m).FAMILY for m in FAMILY_MODULES)
    return tuple(_FAMILIES)


def family_named(name: str) -> Family:
    """The family called ``name`` ("vit", "swin").

    Raises:
        KeyError: no family has that name.
    """
    for fam in families():
        if fam.name == name:
            return fam
    raise KeyError(f"unknown model family {name!r}; known: {sorted(f.name for f in families())}")


def family_of(obj: Any) -> Family:
    """The family of ``obj``: an ``nn.Module`` (timm model, supernet, pruned or deployed model), a timm model name
    (``"swin_tiny_patch4_window7_224"``), a family name, a signature or :class:`~spvit.arch.Architecture` (their
    ``family``) or a deployed model's config dict (its ``"family"`` key, ViT when absent). Anything no family claims
    gets the default (ViT) family, whose checks say why it is not supported."""
    fams = families()
    if isinstance(obj, str):
        for fam in fams:
            if obj == fam.name:
                return fam
        for fam in fams:
            if fam.matches_name(obj):
                return fam
        return fams[-1]
    if isinstance(obj, dict):
        return family_named(obj.get("family") or fams[-1].name)
    name = getattr(obj, "family", None)
    if isinstance(name, str):  # a signature, an Architecture
        return family_named(name)
    for fam in fams:
        if fam.matches(obj):
            return fam
    return fams[-1]


__all__ = ["Family", "FAMILY_MODULES", "families", "family_named", "family_of"]
