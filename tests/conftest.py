"""Test configuration: where the kernels are tested, and a seed fixture.

With a CUDA GPU the kernel tests run on CUDA tensors (compiled Triton kernels, the extension's CUDA kernels); without
one they run on CPU tensors, the Triton kernels under the interpreter (``TRITON_INTERPRET=1``, set here before triton is
imported). Compiled Triton kernels are never launched on CPU tensors.
"""
import os
import signal

import torch

# The package keeps a signal that its process was started with ignored (spvit.interrupts.IGNORED_AT_START: nohup
# ignores SIGHUP, a shell without job control ignores SIGINT in background commands). The tests send these signals to
# their own process and to the runs they start, so they run with the default handlers whoever started them.
for _sig, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                       (signal.SIGHUP, signal.SIG_DFL)):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, _default)

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere (kernels then run on CPU tensors).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Correctness runs launch one pinned config of the autotuned kernels (one compilation per shape class, not one per
# autotune config); tests/test_deploy_conv.py runs the autotuned path once on a GPU.
os.environ.setdefault("SPVIT_AUTOTUNE", "0")

import pytest  # noqa: E402

# At most 2 threads per test process; under pytest-xdist the cores are shared among the workers (the Triton interpreter
# is single-threaded, so two workers on two cores run those tests side by side instead of oversubscribing the cores).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield 0


@pytest.fixture(params=["cuda"] if HAS_CUDA else ["cpu"])
def device(request):
    """Device the kernels are tested on: CUDA when present, else CPU (Triton kernels under the interpreter)."""
    return torch.device(request.param)


@pytest.fixture(params=["vit", "swin"])
def family(request):
    """A model family as seen by the generic tests (tests/helpers.py: a tiny timm model, an architecture with every
    attention choice, images)."""
    from .helpers import FAMILIES

    return FAMILIES[request.param]
