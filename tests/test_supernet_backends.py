"""Whole supernet: the fused (Triton) backend against the eager reference: same loss, gradients and step."""
import copy

import pytest
import torch

import spvit
import spvit_kernels as K
from tests.helpers import randomise_head_probs, tiny_vit


def _step(sn, backend, x, y, seed):
    sn = copy.deepcopy(sn).train()
    opt = torch.optim.SGD(sn.parameters(), lr=0.1)  # (Adam would amplify rounding on ~0 grads)
    torch.manual_seed(seed)  # same gate samples for both backends
    with K.use_backend(backend):
        assert K.backend_of("gated_attn_conv", x.device) == backend
        assert K.backend_of("masked_ffn", x.device) == backend
        logits = sn(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + sn.flops_loss(0.8 * sn.dense_gflops(), 2.0)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in sn.named_parameters() if p.grad is not None}
    opt.step()
    return loss.detach(), grads, sn


@pytest.mark.parametrize("seed", [0, 3])
def test_triton_supernet_step_equals_eager(seed, device):
    torch.manual_seed(100 + seed)
    sn = spvit.supernet(tiny_vit(img=32, patch=8, dim=32, depth=2, heads=2, mlp_ratio=1.5)).to(device)
    randomise_head_probs(sn, seed)
    x = torch.randn(2, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (2,), device=device)
    le, ge, sne = _step(sn, "eager", x, y, seed)
    lt, gt, snt = _step(sn, "triton", x, y, seed)
    torch.testing.assert_close(lt, le, rtol=1e-4, atol=1e-5)
    assert ge.keys() == gt.keys()
    for n in ge:
        torch.testing.assert_close(gt[n], ge[n], rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")
    for (n, a), (_, b) in zip(sne.state_dict().items(), snt.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")
