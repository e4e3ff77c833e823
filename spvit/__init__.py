"""spvit: SPViT (He et al., TPAMI 2024) for timm ViT/DeiT and Swin Transformers, with fused kernels.

    sn = spvit.supernet(timm_model)      # search
    arch = sn.architecture()             # read out
    pruned = spvit.prune(timm_model, arch)   # fine-tune
"""
import importlib

from . import _startup
from ._version import __version__

# Each public name and the module that defines it. `import spvit` imports them all (and so registers the spvit_*
# models with timm); the `spvit` command imports only what the command it runs needs, so that `spvit --version`
# and `--help` take no time (the names are still reachable: they are imported on first use).
_PUBLIC = {
    "Architecture": "arch", "BlockArch": "arch", "Signature": "arch", "ModelSignature": "arch", "SwinSignature": "arch",
    "count_params": "flops", "gflops": "flops",
    "PrunedModel": "models", "Supernet": "models", "SwinPrunedModel": "models", "SwinSupernet": "models",
    "UnsupportedModelError": "models", "prune": "models", "supernet": "models",
    "load_official": "models.official",
    "DeployedModel": "deploy", "deploy": "deploy", "load_deployed": "deploy",
    "export_onnx": "export",
    "DeployedSwin": "deploy_swin",
    "family_of": "families",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'spvit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


if _startup.launched_as_command():  # the `spvit` command: a signal while it imports its modules is one line
    _startup.install()
else:
    for _name in _PUBLIC:
        __getattr__(_name)
    del _name
