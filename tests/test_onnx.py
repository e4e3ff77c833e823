"""ONNX export of deployed models (spvit.export_onnx): standard operators only, dynamic batch, onnxruntime equal to the
deployed model; errors; the user's file and model settings are left intact."""
import importlib.util
import os

import pytest
import torch

import spvit
from spvit.deploy import deploy
from spvit.export import INPUT_NAME, dynamo_exporter_available, export_onnx

from .test_deploy import mixed_pruned

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'spvit[test]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'spvit[test]')")

EXPORTERS = [
    pytest.param(True, id="dynamo", marks=pytest.mark.skipif(
        not dynamo_exporter_available(), reason="the dynamo ONNX exporter needs onnxscript (not installed)")),
    pytest.param(False, id="torchscript"),
]


@pytest.fixture(scope="module")
def deployed():
    """Mixed msa / 3x3 / 1x1 / skip blocks, FFN widths 32, 0, 3, 63, LayerScale, random BN statistics."""
    torch.manual_seed(1)
    return deploy(mixed_pruned(layer_scale=True))


def run_ort(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_onnxruntime_equals_deployed_at_two_batch_sizes(deployed, dynamo, tmp_path):
    path = str(tmp_path / "model.onnx")
    assert export_onnx(deployed, path, dynamo=dynamo) == path
    assert os.listdir(tmp_path) == ["model.onnx"]  # self-contained, no temporary left behind
    graph = onnx.load(path).graph
    onnx.checker.check_model(path)
    domains = {n.domain for n in graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operator domains in the graph: {domains}"
    assert not any("spvit" in n.op_type.lower() for n in graph.node)
    assert deployed.kernels_when_tracing  # the model's setting is restored
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        with torch.no_grad():
            ref = deployed(x)  # the deployed model on its default kernels
        out = run_ort(path, x)
        assert out.shape == (b, 10)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fixed_batch(deployed, tmp_path):
    path = str(tmp_path / "fixed.onnx")
    export_onnx(deployed, path, batch=3, dynamo=False)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_ort(path, x), deployed(x), atol=1e-5, rtol=1e-5)
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 3, 32, 32]
    assert spvit.export_onnx is export_onnx


def test_errors_leave_the_users_file_alone(deployed, tmp_path):
    pruned = mixed_pruned()
    with pytest.raises(TypeError, match="deploy it first"):
        export_onnx(pruned, str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        export_onnx(deployed, str(tmp_path / "m.onnx"), batch=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(deployed, str(tmp_path / "no" / "m.onnx"))
    # a failing export (an opset no exporter supports) keeps the existing file and leaves no temporary
    path = tmp_path / "keep.onnx"
    path.write_bytes(b"user data")
    with pytest.raises(Exception):
        export_onnx(deployed, str(path), opset=1, dynamo=False)
    assert path.read_bytes() == b"user data"
    assert sorted(os.listdir(tmp_path)) == ["keep.onnx"]
    assert deployed.kernels_when_tracing


def test_dynamo_without_onnxscript_is_a_clear_error(deployed, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match="onnxscript"):
        export_onnx(deployed, str(tmp_path / "m.onnx"), dynamo=True)
    assert not os.listdir(tmp_path)


def test_deploy_format_hook(deployed, tmp_path, capsys):
    """The `spvit deploy --format onnx` pieces: the argument, and the export into the output folder."""
    from spvit.cli_parser import build_parser
    from spvit.export import export_for_format

    base = ["deploy", "--checkpoint", "best.pth", "--out", "o"]
    parser = build_parser()
    assert parser.parse_args(base).format == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--format", "tflite"])
    assert export_for_format(parser.parse_args(base), deployed, str(tmp_path)) is None
    assert not os.listdir(tmp_path)
    path = export_for_format(parser.parse_args([*base, "--format", "onnx"]), deployed, str(tmp_path))
    assert path == str(tmp_path / "model.onnx") and "model.onnx" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_ort(path, x), deployed(x), atol=1e-5, rtol=1e-5)


def test_torchscript_is_refused_clearly(deployed):
    with pytest.raises(RuntimeError, match="TorchScript.*torch.export"):
        torch.jit.script(deployed)


def test_bfloat16_is_refused_before_writing(tmp_path, capsys):
    """A bfloat16 model would give an ONNX file no runtime loads (Conv takes no bfloat16): one clear error, no file,
    from the function and from `spvit deploy --dtype bf16 --format onnx` (exit 2, before anything is written)."""
    from spvit import cli

    torch.manual_seed(1)
    bf16 = deploy(mixed_pruned(), dtype=torch.bfloat16)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"user data")
    for dynamo in (False, True) if dynamo_exporter_available() else (False,):
        with pytest.raises(ValueError, match="bfloat16.*float32 or float16"):
            export_onnx(bf16, str(path), dynamo=dynamo)
    assert path.read_bytes() == b"user data" and os.listdir(tmp_path) == ["m.onnx"]
    out = tmp_path / "deployed"
    rc = cli.main(["deploy", "--checkpoint", str(tmp_path / "ft.pth"), "--out", str(out), "--dtype", "bf16",
                   "--format", "onnx"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("spvit: error:") and "bfloat16" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_float16_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(1)
    fp16 = deploy(mixed_pruned(), dtype=torch.float16)
    path = str(tmp_path / "m.onnx")
    export_onnx(fp16, path, dynamo=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = fp16(x)
    out = run_ort(path, x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not dynamo_exporter_available(), reason="the dynamo ONNX exporter needs onnxscript (not installed)")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_plain_torch_onnx_export(deployed, backend, tmp_path):
    """``torch.onnx.export(deployed, (x,), dynamo=True)``, the call a PyTorch user makes first, lowers the spvit ops
    to standard operators by itself and gives spvit.export_onnx's result; ``torch.export`` still keeps the ops."""
    from spvit_kernels import backend_of, use_backend

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    x = torch.randn(3, 3, 32, 32)
    ours = str(tmp_path / "spvit.onnx")
    export_onnx(deployed, ours, dynamo=True)
    with use_backend(backend), torch.no_grad():
        if backend == "triton":
            assert backend_of("deploy_conv", x.device) == "triton" and backend_of("pruned_ffn", x.device) == "triton"
        program = torch.export.export(deployed, (x,))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any(t.startswith("spvit.") for t in targets), targets  # the saved program runs the fused ops
        onnx_program = torch.onnx.export(deployed, (x,), dynamo=True)
    path = str(tmp_path / "plain.onnx")
    onnx_program.save(path)
    graph = onnx.load(path).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(out, deployed(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, run_ort(ours, x), atol=1e-6, rtol=1e-6)
