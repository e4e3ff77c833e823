"""spvit_kernels: the ops of SPViT (eager reference, Triton kernels, C++/CUDA extension) behind one dispatcher.

Each public function here has the signature of the function of the same name in :mod:`spvit_kernels.reference`
and runs the implementation that :mod:`spvit_kernels.backend` picks for the device of its first tensor.
"""
import importlib as _importlib

from . import reference
from .backend import backend_of, resolve, use_backend

# Each op's implementation module has the op's name (one name stem per op), like the dispatcher functions below.
# Import them now, before the functions are defined: importing a submodule later would rebind the package attribute
# from the function to the module. A module that cannot be imported here (e.g. no triton) is simply unavailable.
for _m in ("gated_attn_conv", "masked_ffn", "pruned_ffn", "shift_sum", "deploy_conv"):
    try:
        _importlib.import_module(f"{__name__}.{_m}")
    except ImportError:
        pass


def gated_attn_conv(x_hat, *args, **kwargs):
    """Search-mode single-path attention layer; see :func:`reference.gated_attn_conv`."""
    return resolve("gated_attn_conv", x_hat.device)(x_hat, *args, **kwargs)


def gated_ffn(x, *args, **kwargs):
    """Search-mode FFN with gated hidden units; see :func:`reference.gated_ffn`."""
    return resolve("gated_ffn", x.device)(x, *args, **kwargs)


def ffn(x, *args, **kwargs):
    """Compact (pruned) FFN; see :func:`reference.ffn`."""
    return resolve("ffn", x.device)(x, *args, **kwargs)


def shift_sum(planes, *args, **kwargs):
    """Folded depthwise 3x3 shift-sum (+bias, ReLU); see :func:`reference.shift_sum`."""
    return resolve("shift_sum", planes.device)(planes, *args, **kwargs)


def deploy_conv(x_hat, *args, **kwargs):
    """Deployed conv layer with BN folded; see :func:`reference.deploy_conv`."""
    return resolve("deploy_conv", x_hat.device)(x_hat, *args, **kwargs)


__all__ = ["reference", "backend_of", "resolve", "use_backend", "gated_attn_conv", "gated_ffn", "ffn", "shift_sum",
           "deploy_conv"]
