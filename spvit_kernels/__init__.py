"""spvit_kernels: the ops of SPViT (eager reference, Triton kernels, C++/CUDA extension) behind one dispatcher.

* :mod:`spvit_kernels.ops` -- the entry points (``ops.masked_ffn(...)`` etc.), dispatched per device;
* :mod:`spvit_kernels.reference` -- the eager PyTorch definition of every op (what the kernels are tested against);
* ``spvit_kernels.<op>`` -- the kernels of one op (``gated_attn_conv``, ``masked_ffn``, ``pruned_ffn``,
  ``shift_sum``, ``deploy_conv``), each registered as the ``torch.library`` op ``spvit::<op>``;
* :mod:`spvit_kernels.backend` -- the per-call choice of implementation (``SPVIT_BACKEND``, :func:`use_backend`).
"""
from . import ops, reference
from .backend import backend_of, resolve, use_backend

__all__ = ["ops", "reference", "backend_of", "resolve", "use_backend"]
