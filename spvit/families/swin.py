"""The Swin family: timm ``SwinTransformer`` (Swin v1) models (docs/method.md §7).

Search: :class:`~spvit.models.swin.SwinSupernet`; fine-tune: :class:`~spvit.models.swin.SwinPrunedModel`; inference:
:class:`~spvit.deploy_swin.DeployedSwin`; original checkpoints (the original Swin code's names and PatchMerging
placement): :func:`spvit.models.official_swin.load_official_swin`; FLOPs: :func:`spvit.flops.swin_macs`; latency
pieces: ``spvit.latency.SwinPieces``.
"""
from __future__ import annotations

from typing import Optional

from ..arch import SwinSignature
from ..deploy_swin import DeployedSwin, deploy_swin
from ..flops import swin_macs, swin_stage_costs
from ..models.convert import is_swin, swin_signature_of
from ..models.official_swin import load_official_swin, looks_like_swin_checkpoint
from ..models.swin import SWIN_ALPHA, SwinPrunedModel, SwinSupernet, prune_swin
from .base import Family


class SwinFamily(Family):
    name = "swin"
    display_name = "Swin"
    example_model = "swin_tiny_patch4_window7_224"
    timm_attr = "swin"
    default_alpha = SWIN_ALPHA  # EXTRA.alpha of every original Swin config
    signature_type = SwinSignature
    supernet_class = SwinSupernet
    pruned_class = SwinPrunedModel
    deployed_class = DeployedSwin
    latency_pieces = "SwinPieces"

    def matches(self, model) -> bool:
        return is_swin(model) or isinstance(model, DeployedSwin)

    def matches_name(self, name: str) -> bool:
        return name.startswith(("swin_", "spvit_swin_"))

    # the family's functions, called as they are (warnings keep pointing at the caller of the public entry point)
    signature_of = staticmethod(swin_signature_of)

    def supernet(self, model, theta: float, alpha: Optional[float], model_name: Optional[str]) -> SwinSupernet:
        return SwinSupernet(model, theta=theta, alpha=self.default_alpha if alpha is None else alpha,
                            model_name=model_name)

    prune = staticmethod(prune_swin)
    deploy = staticmethod(deploy_swin)
    claims_checkpoint = staticmethod(looks_like_swin_checkpoint)
    load_official = staticmethod(load_official_swin)
    macs = staticmethod(swin_macs)

    def block_costs(self, signature, i: int):
        return swin_stage_costs(signature, signature.block_stage[i])


FAMILY = SwinFamily()

__all__ = ["SwinFamily", "FAMILY"]
