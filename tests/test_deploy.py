"""Deployed models (spvit.deploy): equal to the pruned model in eval mode on every backend; files; export; errors."""
import copy
import os
import warnings

import pytest
import torch

import spvit
import spvit_kernels as K
from spvit.arch import Architecture
from spvit.deploy import FORMAT_VERSION, deploy, deploy_checkpoint, load_deployed
from spvit.models.convert import model_name_of, signature_of
from spvit_kernels import reference as R
from tests.helpers import FAMILIES, randomise_conv_state

# (dtype, atol, rtol) of a deployed model against its pruned model (fp32: rounding of the folded weights only).
FP32_TOL = (torch.float32, 1e-5, 1e-5)
BACKENDS = ["eager", "auto", "triton"]
# every attention choice; FFN widths uneven, odd, full (64) and 0
CHOICES, KEEP = FAMILIES["vit"].choices, FAMILIES["vit"].keep


def tiny_vit(layer_scale=False, **kw):
    """img 32, patch 8 (4x4 grid), dim 32, depth 4, heads 2, FFN 64, 10 classes; random biases (eval mode)."""
    return FAMILIES["vit"].model(layer_scale=layer_scale, **kw)


def randomise(model):
    """Non-trivial BatchNorm statistics and head mixing, so that folding matters."""
    return randomise_conv_state(model, 0.02)


def mixed_pruned(layer_scale=False, choices=CHOICES, keep=KEEP, official_skip=False):
    vit = tiny_vit(layer_scale)
    arch = Architecture.from_choices(model_name_of(vit), signature_of(vit), choices, keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official-skip notice
        return randomise(spvit.prune(vit, arch, official_skip=official_skip)).eval()


def images(b=3):
    return torch.randn(b, 3, 32, 32)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_scale", [False, True])
def test_deployed_equals_pruned(backend, layer_scale, device):
    pruned = mixed_pruned(layer_scale).to(device)
    x = images().to(device)
    with torch.no_grad():
        ref = pruned(x)
    deployed = deploy(pruned)
    assert deployed.architecture.attn_choices == CHOICES
    assert deployed.architecture.ffn_widths == [32, 0, 3, 63]
    assert [b.kind for b in deployed.blocks] == CHOICES
    assert not hasattr(deployed.blocks[3], "attn") and not hasattr(deployed.blocks[1], "mlp")  # skip gone, FFN 0
    _, atol, rtol = FP32_TOL
    with K.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(deployed(x), ref, atol=atol, rtol=rtol)
    assert spvit.gflops(deployed) == spvit.gflops(pruned)


def test_official_skip_semantics_and_all_msa():
    """x + LN1(x) skips (quirk Q4) survive deployment; an all-MSA full-width model equals the timm model."""
    pruned = mixed_pruned(True, official_skip=True)
    x = images()
    deployed = deploy(pruned)
    assert deployed.blocks[3].kind == "skip_ln"
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), pruned(x), atol=1e-5, rtol=1e-5)
    vit = tiny_vit()
    arch = Architecture.from_choices(model_name_of(vit), signature_of(vit), ["msa"] * 4, [range(64)] * 4)
    with torch.no_grad():
        torch.testing.assert_close(deploy(spvit.prune(vit, arch))(x), vit(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bf16_error_at_most_twice_eager(backend, device):
    pruned = mixed_pruned(True).to(device)
    x = images(4).to(device)
    with torch.no_grad():
        ref = pruned(x)  # fp32 reference
        eager_err = max_err(copy.deepcopy(pruned).to(torch.bfloat16)(x.to(torch.bfloat16)), ref)
        deployed = deploy(pruned, dtype=torch.bfloat16)
        assert deployed.dtype == torch.bfloat16
        with K.use_backend(backend):
            out = deployed(x)  # fp32 images are cast to the model's dtype
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref) <= 2 * eager_err + 1e-3, (max_err(out, ref), eager_err)


def test_errors(tmp_path):
    vit = tiny_vit()
    with pytest.raises(TypeError, match="search mode"):
        deploy(spvit.supernet(vit))
    with pytest.raises(TypeError, match="PrunedModel"):
        deploy(vit)
    deployed = deploy(mixed_pruned())
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        deployed(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="shape"):
        deployed(torch.randn(2, 1, 32, 32))
    with pytest.raises(RuntimeError, match="inference-only"):
        deployed.train()
    deployed.eval()  # accepted

    with pytest.raises(FileNotFoundError):
        load_deployed(str(tmp_path / "nope.pt"))
    obj = deployed.to_file_dict()
    bad = str(tmp_path / "bad.pt")
    torch.save({**obj, "format_version": FORMAT_VERSION + 1, "spvit_version": "9.9.9"}, bad)
    with pytest.raises(ValueError, match="format version 2 .*9.9.9"):
        load_deployed(bad)
    sd = dict(obj["state_dict"])
    del sd["blocks.0.attn.w_planes"]
    torch.save({**obj, "state_dict": sd}, bad)
    with pytest.raises(ValueError, match="missing keys .*blocks.0.attn.w_planes"):
        load_deployed(bad)
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match="not a deployed SPViT model"):
        load_deployed(bad)
    with open(bad, "w") as f:
        f.write("not torch")
    with pytest.raises(ValueError, match="cannot read"):
        load_deployed(bad)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_export(backend, device):
    pruned = mixed_pruned().to(device)
    deployed = deploy(pruned)
    x = images(2).to(device)
    with torch.no_grad():
        ref = pruned(x)
    with K.use_backend(backend):
        ep = torch.export.export(deployed, (x,))
        torch.testing.assert_close(ep.module()(x), ref, atol=1e-5, rtol=1e-5)


def test_export_with_reference_ops(device):
    deployed = deploy(mixed_pruned().to(device))
    deployed.kernels_when_tracing = False
    x = images(2).to(device)
    with K.use_backend("triton"):
        ep = torch.export.export(deployed, (x,))
    assert not any("spvit" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), deployed(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torch_compile(backend, device):
    pruned = mixed_pruned().to(device)
    deployed = deploy(pruned)
    x = images(2).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(deployed, backend="aot_eager", fullgraph=True)
    with K.use_backend(backend), torch.no_grad():
        torch.testing.assert_close(compiled(x), pruned(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_first_call_in_a_fresh_process(tmp_path):
    # The first call of a freshly built deployed model happens inside the trace: the kernel providers must already
    # be imported (DeployedModel's constructor preloads them), or dynamo would have to trace an import.
    import subprocess
    import sys

    code = (
        "import torch, spvit\n"
        "from tests.test_deploy import mixed_pruned, images\n"
        "pruned = mixed_pruned(); deployed = spvit.deploy(pruned); x = images(2)\n"
        "compiled = torch.compile(deployed, backend='aot_eager', fullgraph=True)\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(compiled(x), pruned(x), atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def _official_finetune_state_dict(pruned):
    """The original fine-tune layout (docs/method.md §5.7, §6) of our pruned model: qk/v split for MSA, head_probs + bn_* for
    block 0, the parameter-optimised ``bconv`` form for block 2, nothing for the skip block 3."""
    sd = {}
    for k, v in pruned.state_dict().items():
        k = k[len("vit."):]
        if k.startswith("blocks.2.attn."):
            continue
        if ".attn.qkv." in k:
            c = v.shape[0] // 3
            sd[k.replace("qkv", "qk")], sd[k.replace("qkv", "v")] = v[:2 * c].clone(), v[2 * c:].clone()
        else:
            sd[k] = v.clone()
    conv = pruned.vit.blocks[2].attn
    taps, tap_bias, out_map = conv.conv_params()
    p = "blocks.2.attn.bconv."
    sd[p + "0.weight"], sd[p + "0.bias"] = R.taps_to_conv_weight(taps).detach().clone(), tap_bias.detach().clone()
    sd[p + "3.weight"], sd[p + "3.bias"] = out_map[:, :, None, None].detach().clone(), conv.proj.bias.detach().clone()
    for k, v in conv.bn.state_dict().items():
        sd[p + "1." + k] = v.clone()
    return sd


def test_official_finetune_checkpoint_deploys(tmp_path):
    pruned = mixed_pruned()
    path = str(tmp_path / "official.pth")
    torch.save({"model": _official_finetune_state_dict(pruned)}, path)
    with pytest.warns(UserWarning, match="skip"):
        official = spvit.load_official(path, tiny_vit()).eval()
    assert official.architecture.attn_choices == CHOICES
    x = images()
    with torch.no_grad():
        ref = official(x)
        deployed = deploy(official)
        assert deployed.blocks[3].kind == "skip_ln"
        torch.testing.assert_close(deployed(x), ref, atol=1e-5, rtol=1e-5)
        # the CLI path: the original file -> deployed file
        out = str(tmp_path / "deployed.pt")
        via_file = deploy_checkpoint(path, out, model=tiny_vit())
        torch.testing.assert_close(load_deployed(out)(x), via_file(x), atol=0, rtol=0)
        torch.testing.assert_close(via_file(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="timm model it was trained from"):
        deploy_checkpoint(path)


def test_deploy_checkpoint_of_our_finetune_file(tmp_path):
    """``spvit finetune``'s best.pth ({"model", "arch", "model_name", "model_kwargs", "num_classes"})."""
    import timm

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs).eval()
    arch = Architecture.from_choices(model_name_of(vit), signature_of(vit), CHOICES, KEEP)
    pruned = randomise(spvit.prune(vit, arch)).eval()
    path = str(tmp_path / "best.pth")
    torch.save({"model": pruned.state_dict(), "epoch": 3, "model_name": "deit_tiny_patch16_224",
                "model_kwargs": kwargs, "num_classes": 10, "arch": arch.to_dict()}, path)
    deployed = deploy_checkpoint(path, str(tmp_path / "d.pt"), dtype=torch.float32)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), pruned(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_deployed(str(tmp_path / "d.pt"))(x), deployed(x), atol=0, rtol=0)
