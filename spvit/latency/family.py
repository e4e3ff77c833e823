"""What the latency code knows about particular model families, in one place: how a model's family is recognised,
which :class:`~spvit.latency.pieces.Pieces` measure a family's deployed model (:data:`PIECES`), and how a family's
timm model is rebuilt from its signature (:func:`timm_kwargs`)."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch.nn as nn

from ..arch import ModelSignature
from ..families import family_of as model_family
from ..models.convert import UnsupportedModelError
from .pieces import Pieces
from .swin_pieces import SwinPieces
from .vit_pieces import ViTPieces

PIECES: Dict[str, Callable[..., Pieces]] = {"vit": ViTPieces, "swin": SwinPieces}


def family_of(model: nn.Module) -> str:
    """The family name of ``model`` (a timm model, or a Supernet / PrunedModel of one), from the family lookup."""
    return model_family(model).name


def pieces_for(model: nn.Module, device, dtype, batch, model_name=None, context: int = 4) -> Pieces:
    """The :class:`Pieces` of ``model`` (a timm ViT / DeiT, or a Supernet / PrunedModel wrapping one)."""
    family = family_of(model)
    if family not in PIECES:
        raise UnsupportedModelError(f"latency tables are not implemented for the {family} family")
    return PIECES[family](model, device, dtype, batch, model_name=model_name, context=context)


def timm_kwargs(signature: ModelSignature) -> Dict[str, Any]:
    """``timm.create_model`` kwargs that rebuild the model (ViT / DeiT or Swin) of ``signature`` (for a deployed file,
    which has no record of its timm kwargs)."""
    s = signature
    if s.family == "swin":
        return {"img_size": s.img_size[0] if s.img_size[0] == s.img_size[1] else tuple(s.img_size),
                "patch_size": s.patch_size, "in_chans": s.in_chans, "embed_dim": s.embed_dim,
                "depths": tuple(s.depths), "num_heads": tuple(s.num_heads), "window_size": s.window_size,
                "mlp_ratio": s.mlp_hidden[0] / s.embed_dim, "num_classes": s.num_classes}
    return {"img_size": s.img_size[0] if s.img_size[0] == s.img_size[1] else tuple(s.img_size),
            "patch_size": s.patch_size, "in_chans": s.in_chans, "embed_dim": s.embed_dim, "depth": s.depth,
            "num_heads": s.num_heads, "mlp_ratio": s.mlp_hidden / s.embed_dim, "num_classes": s.num_classes}
