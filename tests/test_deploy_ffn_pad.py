"""Deployed FFNs padded with zero hidden units to a multiple of 64 (on by default on CUDA): same outputs, same files."""
import pytest
import torch

import spvit_kernels as K
from spvit.deploy import CompactFFN, deploy, load_deployed

from .test_deploy import images, mixed_pruned
from .test_deploy_swin import images as swin_images
from .test_deploy_swin import swin_pruned


def _ffns(model):
    return [m for m in model.modules() if isinstance(m, CompactFFN)]


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_padded_ffn_gives_the_same_output(family, backend, tmp_path):
    pruned, x = (mixed_pruned(), images(2)) if family == "vit" else (swin_pruned(), swin_images(2))
    plain = deploy(pruned)
    padded = deploy(pruned, pad_ffn=True)
    assert all(f.padded_width == f.width for f in _ffns(plain))  # off by default on CPU
    widths = [(f.width, f.padded_width) for f in _ffns(padded)]
    assert all(p % 64 == 0 and 0 <= p - w < 64 for w, p in widths) and any(p != w for w, p in widths), widths
    with K.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(padded(x), plain(x), atol=1e-6, rtol=1e-6)
    # the padded units are exact zeros, and files hold the kept width
    for f in _ffns(padded):
        k = f.width
        assert not f.fc1.weight[k:].any() and not f.fc1.bias[k:].any() and not f.fc2.weight[:, k:].any()
    sd, sd_plain = padded.state_dict(), plain.state_dict()
    assert sd.keys() == sd_plain.keys() and all(torch.equal(sd[k], sd_plain[k]) for k in sd)
    padded.save(str(tmp_path / "m.pt"))
    again = load_deployed(str(tmp_path / "m.pt"), pad_ffn=True)
    assert [(f.width, f.padded_width) for f in _ffns(again)] == widths
    back = load_deployed(str(tmp_path / "m.pt"))
    assert all(f.padded_width == f.width for f in _ffns(back))
    with torch.no_grad():
        torch.testing.assert_close(again(x), plain(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(back(x), plain(x), atol=1e-6, rtol=1e-6)
