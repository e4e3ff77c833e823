"""Test configuration: Triton kernels run under the interpreter on CPU-only machines; a seed fixture."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere (kernels then run on CPU tensors).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield 0


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    """Device to run on: CPU (Triton interpreter) always, CUDA when present."""
    return torch.device(request.param)
