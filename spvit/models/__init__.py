"""SPViT model modules: supernet (search), pruned (fine-tune), converters from timm and original checkpoints."""
from .convert import UnsupportedModelError, signature_of
from .pruned import ConvAttention, ExplicitConvAttention, PrunedModel, SkipAttention, prune
from .supernet import GatedMlp, SearchAttention, Supernet, supernet

__all__ = ["UnsupportedModelError", "signature_of", "ConvAttention", "ExplicitConvAttention", "PrunedModel",
           "SkipAttention", "prune", "GatedMlp", "SearchAttention", "Supernet", "supernet"]
