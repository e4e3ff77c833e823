"""SPViT model modules: supernet (search), pruned (fine-tune), converters from timm and original checkpoints."""
from .convert import UnsupportedModelError, signature_of
from .pruned import ConvAttention, ExplicitConvAttention, PrunedModel, SkipAttention, prune
from .registry import SHIPPED, SHIPPED_SWIN, register_with_timm, shipped_architecture
from .supernet import GatedMlp, SearchAttention, Supernet, supernet
from .swin import SwinPrunedBlock, SwinPrunedModel, SwinSearchAttention, SwinSupernet, swin_signature_of

register_with_timm()

__all__ = ["UnsupportedModelError", "signature_of", "ConvAttention", "ExplicitConvAttention", "PrunedModel",
           "SkipAttention", "prune", "SHIPPED", "SHIPPED_SWIN", "register_with_timm", "shipped_architecture",
           "GatedMlp", "SearchAttention", "Supernet", "supernet",
           "SwinPrunedBlock", "SwinPrunedModel", "SwinSearchAttention", "SwinSupernet", "swin_signature_of"]
