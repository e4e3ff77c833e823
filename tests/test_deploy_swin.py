"""Deployed Swin models (spvit.deploy of a SwinPrunedModel): equal to the pruned model in eval mode for every attention
choice, bf16, files, torch.export, ONNX, the `spvit deploy` path for original Swin checkpoints, errors."""
import copy
import importlib.util
import warnings

import pytest
import torch

import spvit
import spvit_kernels as K
from spvit.deploy import deploy, deploy_checkpoint, load_deployed
from spvit.deploy_swin import DeployedSwin

from .test_official_swin import (CFG, CHOICES, KEEP, images, original_forward, original_layout, randomise,
                                 swin_pruned, tiny_swin)

FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("backend", ["eager", "auto", "triton"])
@pytest.mark.parametrize("official_skip", [False, True])
def test_deployed_equals_pruned(backend, official_skip, device):
    pruned = swin_pruned(official_skip=official_skip).to(device)
    x = images(3).to(device)
    with torch.no_grad():
        ref = pruned(x)
    deployed = deploy(pruned)
    assert isinstance(deployed, DeployedSwin) and not deployed.training
    assert deployed.architecture.attn_choices == CHOICES
    kinds = ["skip_ln" if (c == "skip" and official_skip) else c for c in CHOICES]
    assert [b.kind for b in deployed.blocks] == kinds
    assert not hasattr(deployed.blocks[2], "mlp")  # FFN width 0: its output bias only
    assert deployed.blocks[3].attn.attn_bias.shape == (4, 4, 16, 16)  # shifted: (windows, heads, N, N)
    assert deployed.blocks[0].attn.attn_bias.shape == (1, 2, 16, 16)
    with K.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(deployed(x), ref, **FP32_TOL)


def test_all_msa_full_width_equals_timm():
    m = tiny_swin()
    arch = spvit.Architecture(m.__class__.__name__, spvit.models.signature_of(m),
                              [spvit.BlockArch("msa", tuple(range(h))) for h in (64, 64, 128, 128, 256, 256)])
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(deploy(spvit.prune(m, arch))(x), m(x), **FP32_TOL)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bf16_error_at_most_twice_eager(backend, device):
    pruned = swin_pruned().to(device)
    x = images(4).to(device)
    with torch.no_grad():
        ref = pruned(x)
        eager_err = max_err(copy.deepcopy(pruned).to(torch.bfloat16)(x.to(torch.bfloat16)), ref)
        deployed = deploy(pruned, dtype=torch.bfloat16)
        with K.use_backend(backend):
            out = deployed(x)
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref) <= 2 * eager_err + 1e-3, (max_err(out, ref), eager_err)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_export(backend, device, tmp_path):
    pruned = swin_pruned().to(device)
    deployed = deploy(pruned)
    x = images(2).to(device)
    with torch.no_grad():
        ref = pruned(x)
    with K.use_backend(backend):
        ep = torch.export.export(deployed, (x,))
        torch.testing.assert_close(ep.module()(x), ref, **FP32_TOL)
        path = str(tmp_path / "swin.pt2")
        torch.export.save(ep, path)
        torch.testing.assert_close(torch.export.load(path).module()(x), ref, **FP32_TOL)


def test_torch_compile_and_gflops():
    pruned = swin_pruned()
    deployed = deploy(pruned)
    assert spvit.gflops(deployed) == spvit.gflops(pruned)
    x = images()
    with torch.no_grad():
        ref = pruned(x)
        torch._dynamo.reset()
        compiled = torch.compile(deployed, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), ref, **FP32_TOL)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
                    reason="onnx / onnxruntime not installed")
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    import onnxruntime as ort

    deployed = deploy(swin_pruned())
    path = spvit.export_onnx(deployed, str(tmp_path / "swin.onnx"))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = images(b)
        out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(out, deployed(x), **FP32_TOL)


def test_original_checkpoint_deploys(tmp_path, capsys):
    """An original SPViT Swin fine-tune checkpoint -> deploy_checkpoint (the body of `spvit deploy --model`) -> the
    original's function; the CLI names a checkpoint of another model in one line."""
    from spvit import cli

    ours = swin_pruned()
    sd = original_layout(ours)
    path = tmp_path / "spvit_swin_ft.pth"
    torch.save({"model": sd}, path)
    x = images()
    with torch.no_grad():
        ref = original_forward(sd, x)
        deployed = deploy_checkpoint(str(path), str(tmp_path / "d.pt"), model=tiny_swin())
        assert [b.kind for b in deployed.blocks][4] == "skip_ln"  # the original's skip (quirk Q4)
        torch.testing.assert_close(deployed(x), ref, atol=2e-5, rtol=1e-5)
        assert torch.equal(load_deployed(str(tmp_path / "d.pt"))(x), deployed(x))
    with pytest.raises(ValueError, match="swin_tiny_patch4_window7_224"):
        deploy_checkpoint(str(path))  # no --model
    out = tmp_path / "dep"
    assert cli.main(["deploy", "--checkpoint", str(path), "--model", "swin_tiny_patch4_window7_224",
                     "--out", str(out)]) == 2
    assert "stage depths (2, 2, 2) but swin_tiny_patch4_window7_224 has (2, 2, 6, 2)" in capsys.readouterr().err
    assert not out.exists()


def test_cli_deploys_a_swin_finetune_checkpoint(tmp_path, capsys):
    """`spvit deploy` on a Swin fine-tune checkpoint of ours (best.pth layout): deployed.pth, arch.json, model.pt2."""
    import timm

    from spvit import cli

    kwargs = {k: v for k, v in CFG.items() if k != "num_classes"}
    base = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, **kwargs).eval()
    arch = spvit.Architecture("swin_tiny_patch4_window7_224", spvit.models.signature_of(base),
                              [spvit.BlockArch(a, tuple(k)) for a, k in zip(CHOICES, KEEP)])
    pruned = randomise(spvit.prune(base, arch)).eval()
    ckpt = tmp_path / "best.pth"
    torch.save({"model": pruned.state_dict(), "arch": arch.to_dict(), "model_name": "swin_tiny_patch4_window7_224",
                "model_kwargs": kwargs, "num_classes": 10}, ckpt)
    out = tmp_path / "deployed"
    assert cli.main(["deploy", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "model.pt2" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["arch.json", "deployed.pth", "model.pt2"]
    x = images()
    with torch.no_grad():
        ref = pruned(x)
        torch.testing.assert_close(load_deployed(str(out / "deployed.pth"))(x), ref, **FP32_TOL)
        # the CLI exports at batch 1 (a static program)
        torch.testing.assert_close(torch.export.load(str(out / "model.pt2")).module()(x[:1]), ref[:1], **FP32_TOL)


def test_errors():
    m = tiny_swin()
    with pytest.raises(TypeError, match="search mode"):
        deploy(spvit.supernet(m))
    deployed = deploy(swin_pruned())
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        deployed(torch.randn(2, 3, 64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "1x1" in repr(deployed)
