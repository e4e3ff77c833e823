"""Dispatching entry points of the SPViT ops: ``ops.<op>(...)`` runs the implementation that
:mod:`spvit_kernels.backend` picks for the device of its first tensor.

Each function has the signature of the function of the same name in :mod:`spvit_kernels.reference`; the op's
kernels live in the module of the same name (``spvit_kernels/<op>.py``), its test in ``tests/test_<op>.py`` and its
benchmark in ``bench/test_kernels.py``. Each entry point first checks its arguments (:mod:`spvit_kernels.checks`:
devices, dtypes, shapes, ranges; one ``TypeError`` / ``ValueError`` naming the argument) whatever backend runs.
"""
from __future__ import annotations

from . import checks
from .backend import resolve


def gated_attn_conv(x_hat, *args, **kwargs):
    """Search-mode single-path attention layer; see :func:`spvit_kernels.reference.gated_attn_conv`."""
    checks.gated_attn_conv(x_hat, *args, **kwargs)
    return resolve("gated_attn_conv", x_hat.device)(x_hat, *args, **kwargs)


def masked_ffn(x, *args, **kwargs):
    """Search-mode FFN with gated hidden units; see :func:`spvit_kernels.reference.masked_ffn`."""
    checks.masked_ffn(x, *args, **kwargs)
    return resolve("masked_ffn", x.device)(x, *args, **kwargs)


def pruned_ffn(x, *args, **kwargs):
    """Compact (pruned) FFN; see :func:`spvit_kernels.reference.pruned_ffn`."""
    checks.pruned_ffn(x, *args, **kwargs)
    return resolve("pruned_ffn", x.device)(x, *args, **kwargs)


def shift_sum(planes, *args, **kwargs):
    """Folded depthwise 3x3 shift-sum (+bias, ReLU); see :func:`spvit_kernels.reference.shift_sum`."""
    checks.shift_sum(planes, *args, **kwargs)
    return resolve("shift_sum", planes.device)(planes, *args, **kwargs)


def deploy_conv(x_hat, *args, **kwargs):
    """Deployed conv layer with BN folded; see :func:`spvit_kernels.reference.deploy_conv`."""
    checks.deploy_conv(x_hat, *args, **kwargs)
    return resolve("deploy_conv", x_hat.device)(x_hat, *args, **kwargs)


OPS = ("gated_attn_conv", "masked_ffn", "pruned_ffn", "shift_sum", "deploy_conv")
__all__ = list(OPS)
