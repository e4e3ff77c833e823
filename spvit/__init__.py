"""spvit: SPViT (He et al., TPAMI 2024) for timm ViT/DeiT and Swin Transformers, with fused kernels.

    sn = spvit.supernet(timm_model)      # search
    arch = sn.architecture()             # read out
    pruned = spvit.prune(timm_model, arch)   # fine-tune
"""
from . import _startup

if _startup.launched_as_command():  # the `spvit` command: a signal during the imports below is one line
    _startup.install()
from ._version import __version__
from .arch import Architecture, BlockArch, ModelSignature, SwinSignature
from .flops import count_params, gflops
from .models import PrunedModel, Supernet, SwinPrunedModel, SwinSupernet, UnsupportedModelError, prune, supernet
from .models.official import load_official
from .deploy import DeployedModel, deploy, load_deployed
from .export import export_onnx
from .deploy_swin import DeployedSwin
from .families import family_of

__all__ = ["Architecture", "BlockArch", "ModelSignature", "SwinSignature", "SwinSupernet", "SwinPrunedModel",
           "count_params", "gflops", "PrunedModel", "Supernet",
           "UnsupportedModelError", "prune", "supernet", "load_official", "DeployedModel", "DeployedSwin", "deploy",
           "load_deployed", "export_onnx", "family_of", "__version__"]


