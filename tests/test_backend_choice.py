"""The backend choice of the op dispatcher: read from the environment once, re-read by ``backend.refresh()``."""
import pytest
import torch

import spvit_kernels as K
from spvit_kernels import backend, ops, reference


@pytest.fixture
def fresh_env(monkeypatch):
    """A clean SPVIT_BACKEND, re-read before and after the test."""
    monkeypatch.delenv("SPVIT_BACKEND", raising=False)
    backend.refresh()
    yield monkeypatch
    monkeypatch.delenv("SPVIT_BACKEND", raising=False)
    backend.refresh()


def test_environment_is_read_once_and_refresh_reads_it_again(fresh_env):
    cpu = torch.device("cpu")
    x, w1, w2 = torch.randn(2, 5, 16), torch.randn(24, 16), torch.randn(16, 24)
    first = backend.resolve("pruned_ffn", cpu)
    y = ops.pruned_ffn(x, w1, None, w2, None)
    fresh_env.setenv("SPVIT_BACKEND", "not-a-backend")  # not read by later calls
    assert backend.resolve("pruned_ffn", cpu) is first
    torch.testing.assert_close(ops.pruned_ffn(x, w1, None, w2, None), y)
    with pytest.raises(ValueError, match="not-a-backend"):
        backend.refresh()
    fresh_env.setenv("SPVIT_BACKEND", "eager")
    backend.refresh()
    assert backend.resolve("pruned_ffn", cpu) is reference.pruned_ffn
    assert backend.resolve("shift_sum", cpu) is reference.shift_sum
    with K.use_backend("auto"):  # a use_backend block still wins over the environment
        assert backend.resolve("pruned_ffn", cpu) is first


def test_op_calls_do_not_read_the_environment(fresh_env):
    reads = []

    class Env(dict):
        def get(self, key, default=None):
            reads.append(key)
            return super().get(key, default)

        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    import os
    ops.shift_sum(torch.randn(1, 4, 9, 4), torch.randn(4), (2, 2), True)  # resolved here
    fresh_env.setattr(os, "environ", Env(os.environ))
    for _ in range(3):
        ops.shift_sum(torch.randn(1, 4, 9, 4), torch.randn(4), (2, 2), True)
    assert [k for k in reads if k.startswith(("SPVIT", "TRITON"))] == []
