"""ONNX export of deployed models: the ``spvit`` kernels lowered to standard ONNX operators.

A :class:`~spvit.deploy.DeployedModel` runs its conv and FFN layers through the ``spvit::`` custom ops, which no ONNX
runtime knows. :func:`export_onnx` traces the model with the ops' eager reference implementations instead (the same
math in plain PyTorch operators: GEMMs, shifted sums, GELU), so the file holds only standard ONNX operators and runs
in onnxruntime or any other ONNX runtime. The batch dimension is dynamic unless a fixed batch is asked for.

    deployed = spvit.load_deployed("deployed.pth")
    spvit.export_onnx(deployed, "model.onnx")        # or deployed.export_onnx("model.onnx")

    import onnxruntime as ort
    session = ort.InferenceSession("model.onnx")
    logits = session.run(None, {"images": images.numpy()})[0]
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import os
import warnings
from typing import Optional, Union

import torch
from spvit_kernels import use_backend

from .deploy import DeployedModel
from .options import FORMATS
from .runs import RunIOError, temp_name

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def dynamo_exporter_available() -> bool:
    """Whether ``torch.onnx.export(..., dynamo=True)`` can run here (it needs the ``onnxscript`` package)."""
    return importlib.util.find_spec("onnxscript") is not None and importlib.util.find_spec("onnx") is not None


@contextlib.contextmanager
def reference_ops(model):
    """Inside the block, ``model`` (a DeployedModel) runs and traces every ``spvit`` op as its eager reference.

    Restores the model's ``kernels_when_tracing`` setting on exit.
    """
    prev = model.kernels_when_tracing
    model.kernels_when_tracing = False
    try:
        with use_backend("eager"):
            yield model
    finally:
        model.kernels_when_tracing = prev


def check_onnx_dtype(dtype: torch.dtype) -> None:
    """Refuse a model dtype whose ONNX file no runtime could load.

    A bfloat16 model would export to an invalid file: ONNX's Conv (the patch embedding) takes no bfloat16 at the
    exporters' opsets, and onnxruntime has no bfloat16 Conv kernel at any opset. float32 and float16 export.

    Raises:
        ValueError: ``dtype`` is bfloat16.
    """
    if dtype == torch.bfloat16:
        raise ValueError("ONNX export of a bfloat16 model is not supported (ONNX Conv and onnxruntime take no "
                         "bfloat16); deploy in float32 or float16 for ONNX (spvit deploy --dtype fp32 or fp16)")


def export_onnx(model, path: Union[str, os.PathLike], batch: Optional[int] = None, opset: Optional[int] = None,
                dynamo: Optional[bool] = None) -> str:
    """Export a deployed model to an ONNX file holding only standard ONNX operators.

    The input is ``images`` (float32, ``(batch, in_chans, H, W)``: the model's fixed image size), the output
    ``logits`` (``(batch, num_classes)``, in the model's dtype). The file is self-contained (weights inside) and is
    written atomically: an existing file at ``path`` is replaced only once the export has succeeded.

    Args:
        model: a :class:`~spvit.deploy.DeployedModel` (deploy a PrunedModel first with :func:`spvit.deploy`).
        path: the ``.onnx`` file to write.
        batch: a fixed batch size; None (default) exports a dynamic batch dimension.
        opset: ONNX opset version (default: the exporter's default).
        dynamo: use the ``torch.export``-based exporter (True) or the TorchScript-based one (False); default: the
            former when ``onnxscript`` is installed, else the latter.
    Returns:
        the path written.
    Raises:
        TypeError: ``model`` is not a DeployedModel.
        ValueError: a batch size below 1.
        ImportError: ``dynamo=True`` without the ``onnx`` / ``onnxscript`` packages.
        ValueError: a bfloat16 model (see :func:`check_onnx_dtype`).
    """
    if not isinstance(model, DeployedModel):
        hint = " (deploy it first: spvit.deploy(pruned))" if isinstance(model, torch.nn.Module) else ""
        raise TypeError(f"export_onnx expects a DeployedModel{hint}; got {type(model).__name__}")
    check_onnx_dtype(model.dtype)
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive integer or None (dynamic batch); got {batch!r}")
    if dynamo is None:
        dynamo = dynamo_exporter_available()
    elif dynamo and not dynamo_exporter_available():
        raise ImportError("the dynamo ONNX exporter needs the onnx and onnxscript packages "
                          "(pip install onnx onnxscript), or pass dynamo=False for the TorchScript exporter")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder} does not exist")
    sig = model.architecture.signature
    # a dynamic batch is traced at batch 2 (an example batch of 1 would be specialised by torch.export)
    example = torch.randn(batch or 2, sig.in_chans, *sig.img_size, device=model.device)
    kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    if dynamo:
        kwargs.update(dynamo=True, external_data=False)
        if batch is None:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
    else:
        kwargs["dynamo"] = False
        if batch is None:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    tmp = temp_name(path)  # unique, in the same folder: fsynced, then renamed over ``path``
    try:
        with reference_ops(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter deprecation and tracer notices
            result = torch.onnx.export(model, (example,), tmp, **kwargs)
        if dynamo and result is not None and not os.path.exists(tmp):  # exporters that return the program
            result.save(tmp, external_data=False)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as exc:
        if _disk_error(exc):
            raise RunIOError(errno.ENOSPC if "space" in str(exc).lower() else errno.EIO,
                             f"could not write {path}: {_first_line(exc)}; the previous version of the file is "
                             f"intact") from None
        raise
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return path


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno) + (" (the disk is full)" if exc.errno == errno.ENOSPC else "")
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _disk_error(exc: BaseException) -> bool:
    """Whether the exporter failed writing its file (an OSError, or an error of the serialiser saying so)."""
    if isinstance(exc, OSError):
        return True
    msg = str(exc).lower()
    return any(s in msg for s in ("no space left", "disk quota", "write failed", "failed to write", "errno"))


# ----------------------------------------------------------------------------------------------------------------------
# `spvit deploy --format onnx`
# ----------------------------------------------------------------------------------------------------------------------
def export_for_format(args: argparse.Namespace, deployed, out_dir: str) -> Optional[str]:
    """``spvit deploy``: write ``out_dir/model.onnx`` when ``--format onnx`` was given; returns its path (or None)."""
    if getattr(args, "format", "torch") != "onnx":
        return None
    path = export_onnx(deployed, os.path.join(out_dir, "model.onnx"))
    print(f"ONNX model (dynamic batch, input {INPUT_NAME!r}, output {OUTPUT_NAME!r}): {path}")
    return path


__all__ = ["export_onnx", "check_onnx_dtype", "reference_ops", "dynamo_exporter_available", "export_for_format",
           "INPUT_NAME", "OUTPUT_NAME", "FORMATS"]
