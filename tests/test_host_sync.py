"""Host synchronisations of the GPU fast path, counted on a CPU: the calls that read a tensor back to the host
(``item`` / ``tolist`` / ``cpu`` / ``numpy`` / ``__bool__``) made while a step or a forward runs, recorded with a
``TorchFunctionMode``. On a GPU each is a synchronisation (and breaks CUDA-graph capture)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import spvit
import spvit_kernels as K
from spvit.deploy import deploy
from tests.helpers import tiny_swin, tiny_vit

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__")


class HostReads(TorchFunctionMode):
    """Records the name of every host-reading tensor call made inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _training_step_reads(sn, x, y):
    sn.train()
    with K.use_backend("triton"), HostReads() as reads:
        loss = torch.nn.functional.cross_entropy(sn(x), y) + sn.flops_loss(0.8 * sn.dense_gflops(), 2.0)
        loss.backward()
    return reads.calls


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_supernet_step_reads_the_host_at_most_once_whatever_the_depth(family):
    counts = {}
    for depth in (2, 4):
        if family == "vit":
            model, img = tiny_vit(img=32, patch=8, dim=32, depth=depth, heads=2, mlp_ratio=1.5), 32
        else:
            model, img = tiny_swin(img_size=28, patch_size=2, window_size=7, embed_dim=16, mlp_ratio=4.0,
                                   depths=(depth // 2, depth // 2), num_heads=(1, 2)), 28
        sn = spvit.supernet(model)
        x, y = torch.randn(2, 3, img, img), torch.randint(0, 10, (2,))
        counts[depth] = _training_step_reads(sn, x, y)
    assert len(counts[2]) <= 1 and len(counts[4]) <= 1, counts


def test_eager_supernet_step_does_not_read_the_host():
    sn = spvit.supernet(tiny_vit(img=32, patch=8, dim=32, depth=2, heads=2, mlp_ratio=1.5)).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with K.use_backend("eager"), HostReads() as reads:
        torch.nn.functional.cross_entropy(sn(x), y).backward()
    assert reads.calls == []


def test_deployed_forward_reads_nothing_back():
    from tests.test_deploy import images, mixed_pruned
    from tests.test_deploy_swin import images as swin_images, swin_pruned

    for pruned, x in ((mixed_pruned(), images(2)), (swin_pruned(), swin_images(2))):
        deployed = deploy(pruned)
        with K.use_backend("triton"), torch.no_grad(), HostReads() as reads:
            deployed(x)
        assert reads.calls == [], (type(deployed).__name__, reads.calls)
