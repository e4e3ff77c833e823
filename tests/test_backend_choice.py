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


def test_backend_chooses_the_provider_and_the_dispatcher_overrides_its_kernel(fresh_env):
    """backend.py picks the provider per device type; a kernel registered with torch's dispatcher for ``spvit::<op>``
    and a device type then replaces what that provider runs there (docs/kernel-design.md)."""
    from spvit_kernels import pruned_ffn as module

    cpu = torch.device("cpu")
    x, w1, w2 = torch.randn(2, 5, 16), torch.randn(24, 16), torch.randn(16, 24)
    calls = []

    def override(x, w1, b1, w2, b2, approximate, fc2):
        calls.append(tuple(x.shape))
        return torch.full((x.shape[0], w2.shape[0]), 7.0)

    with K.use_backend("triton"), torch.no_grad():
        assert backend.resolve("pruned_ffn", cpu) is module.pruned_ffn
        torch.testing.assert_close(ops.pruned_ffn(x, w1, None, w2, None), reference.pruned_ffn(x, w1, None, w2, None),
                                   atol=1e-4, rtol=1e-4)
        torch.library.register_kernel("spvit::pruned_ffn", "cpu", override)
        try:
            y = ops.pruned_ffn(x, w1, None, w2, None)
        finally:  # the op's own body on the CPU again
            torch.library.register_kernel("spvit::pruned_ffn", "cpu", module._pruned_ffn_fwd)
        assert calls == [(10, 16)] and torch.equal(y, torch.full((2, 5, 16), 7.0))
        torch.testing.assert_close(ops.pruned_ffn(x, w1, None, w2, None), reference.pruned_ffn(x, w1, None, w2, None),
                                   atol=1e-4, rtol=1e-4)
