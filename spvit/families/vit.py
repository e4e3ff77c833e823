"""The ViT/DeiT family: timm ``VisionTransformer`` models with a class token (ViT, DeiT, DeiT-III).

Search: :class:`~spvit.models.supernet.Supernet`; fine-tune: :class:`~spvit.models.pruned.PrunedModel`; inference:
:class:`~spvit.deploy.DeployedModel`; original checkpoints: :func:`spvit.models.official.load_official_vit`; FLOPs:
:func:`spvit.flops.vit_macs`; latency pieces: ``spvit.latency.ViTPieces``. It is the default family: a model that no
other family claims is checked by :func:`~spvit.models.convert.vit_signature_of`, which names what is unsupported.
"""
from __future__ import annotations

from typing import Optional

from timm.models.vision_transformer import VisionTransformer

from ..arch import ModelSignature
from ..deploy import DeployedModel, deploy_vit
from ..flops import layer_costs, vit_macs
from ..models.convert import vit_signature_of
from ..models.official import load_official_vit
from ..models.pruned import PrunedModel, prune_vit
from ..models.supernet import Supernet
from .base import Family


class VitFamily(Family):
    name = "vit"
    display_name = "ViT/DeiT"
    example_model = "deit_small_patch16_224"
    timm_attr = "vit"
    default_alpha = 1e-2  # hard-coded in the original DeiT code
    signature_type = ModelSignature
    supernet_class = Supernet
    pruned_class = PrunedModel
    deployed_class = DeployedModel
    latency_pieces = "ViTPieces"

    def matches(self, model) -> bool:
        inner = getattr(model, self.timm_attr, model)
        return isinstance(inner, VisionTransformer) or isinstance(model, DeployedModel) and model.config.get(
            "family", self.name) == self.name

    def matches_name(self, name: str) -> bool:
        return name.startswith(("vit_", "deit_", "deit3_", "spvit_deit_", "spvit_demo_vit"))

    # the family's functions, called as they are (warnings keep pointing at the caller of the public entry point)
    signature_of = staticmethod(vit_signature_of)

    def supernet(self, model, theta: float, alpha: Optional[float], model_name: Optional[str]) -> Supernet:
        return Supernet(model, theta=theta, alpha=self.default_alpha if alpha is None else alpha,
                        model_name=model_name)

    prune = staticmethod(prune_vit)
    deploy = staticmethod(deploy_vit)
    load_official = staticmethod(load_official_vit)
    macs = staticmethod(vit_macs)

    def block_costs(self, signature, i: int):
        return layer_costs(signature)  # every block alike


FAMILY = VitFamily()

__all__ = ["VitFamily", "FAMILY"]
