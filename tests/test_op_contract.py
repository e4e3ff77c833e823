"""The op contract of spvit_kernels: one name stem per op (file, torch.library op, dispatcher, test, benchmark), loud
registration failures, and the version-dependent settings read in one place."""
import ast
import importlib
import inspect
import os
import pydoc

import pytest
import torch

import spvit_kernels
from spvit_kernels import _compat, _ext, ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEMS = ("gated_attn_conv", "masked_ffn", "pruned_ffn", "shift_sum", "deploy_conv")


@pytest.mark.parametrize("stem", STEMS)
def test_one_stem_per_op(stem):
    module = importlib.import_module(f"spvit_kernels.{stem}")
    assert inspect.ismodule(getattr(spvit_kernels, stem)), "a package attribute shadows the op's module"
    assert module is getattr(spvit_kernels, stem)
    assert callable(getattr(ops, stem)) and callable(getattr(reference, stem))
    assert os.path.exists(os.path.join(ROOT, "tests", f"test_{stem}.py"))
    from bench import cases
    assert stem in cases.OPS, "the op has no benchmark cases in bench/cases.py (run by bench/test_kernels.py)"
    if stem == "shift_sum" and not _ext.has_op("shift_sum"):
        pytest.skip(f"spvit::shift_sum comes from the extension, not built here: {_ext.error()}")
    assert hasattr(torch.ops.spvit, stem), f"torch.ops.spvit.{stem} is not registered"


def test_each_op_owns_its_providers():
    """Every provider of an op lives in the op's own module (``spvit_kernels/<op>.py`` or package)."""
    from spvit_kernels.backend import _PROVIDERS
    assert set(_PROVIDERS) == set(STEMS)
    for stem, providers in _PROVIDERS.items():
        for backend, spec in providers.items():
            assert spec.split(":")[0] == f"spvit_kernels.{stem}", (stem, backend, spec)


def _op_sources():
    """(op module name, path) of every file of the op modules."""
    for stem in STEMS:
        path = os.path.join(ROOT, "spvit_kernels", stem)
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.endswith(".py"):
                    yield stem, os.path.join(path, name)
        else:
            yield stem, path + ".py"


def test_ops_import_no_private_names_of_other_ops():
    """An op module takes shared code from the private helper modules (``spvit_kernels/_*.py``), never a private name
    of another op's module."""
    bad = []
    for stem, path in _op_sources():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = (node.module or "").split(".")
            other = next((m for m in mod if m in STEMS and m != stem), None)
            if other is None:
                continue
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private:
                bad.append(f"{os.path.relpath(path, ROOT)} imports {private} from {other}")
    assert not bad, bad


def test_dispatcher_signatures_follow_the_reference():
    """Every provider has the signature of the reference function of the same name."""
    from spvit_kernels.backend import _PROVIDERS, _load
    for stem, providers in _PROVIDERS.items():
        ref = inspect.signature(getattr(reference, stem))
        for backend, spec in providers.items():
            fn = _load(spec)
            if fn is None:
                continue
            ours = inspect.signature(fn)
            assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
                [(p.name, p.kind, p.default) for p in ref.parameters.values()], (stem, backend)


@pytest.mark.parametrize("stem", STEMS)
def test_entry_point_has_the_reference_signature_and_docstring(stem):
    """``ops.<op>`` shows its real parameters (not ``*args, **kwargs``) and the reference's documentation."""
    fn, ref = getattr(ops, stem), getattr(reference, stem)
    assert inspect.signature(fn) == inspect.signature(ref)
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in inspect.signature(fn).parameters.values())
    assert fn.__doc__.startswith(ref.__doc__.rstrip())
    shown = pydoc.render_doc(fn, renderer=pydoc.plaintext)  # what help(ops.<op>) prints
    header = next(line for line in shown.splitlines() if line.startswith(f"{stem}("))
    for name in inspect.signature(ref).parameters:
        assert f"{name}: " in header, (stem, name, header)
    assert ref.__doc__.strip().splitlines()[0] in shown


def test_registration_failure_is_loud():
    """A registration that fails raises and names the op (no silent fallback to an unregistered function)."""
    def no_types(x, scale):  # no type hints: no schema can be inferred
        return x * scale

    with pytest.raises(RuntimeError, match="spvit::test_contract_untyped"):
        _compat.define_op("test_contract_untyped", no_types, lambda x, scale: torch.empty_like(x))


@pytest.fixture
def restore_precision():
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)
    legacy = None if new not in (None, "none") else matmul.allow_tf32
    yield
    if new is not None:
        matmul.fp32_precision = new
    if legacy is not None:
        matmul.allow_tf32 = legacy


def test_allow_tf32_reads_the_new_setting(restore_precision):
    """With torch's fp32_precision API set, reading the legacy flag raises; our switch must not."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision setting")
    matmul.fp32_precision = "tf32"
    assert _compat.allow_tf32() is True
    assert _compat.dot_precision(torch.float32) == "tf32"
    matmul.fp32_precision = "ieee"
    assert _compat.allow_tf32() is False
    assert _compat.dot_precision(torch.float32) == "ieee"
    assert _compat.dot_precision(torch.bfloat16) == "tf32"


def test_kernels_run_with_the_new_precision_setting(restore_precision, device):
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision setting")
    matmul.fp32_precision = "ieee"
    x, w1 = torch.randn(8, 16, device=device), torch.randn(12, 16, device=device)
    w2 = torch.randn(16, 12, device=device)
    with torch.no_grad():
        y = ops.pruned_ffn(x, w1, None, w2, None) if device.type == "cuda" else \
            spvit_kernels.pruned_ffn.pruned_ffn(x, w1, None, w2, None)
    torch.testing.assert_close(y, reference.pruned_ffn(x, w1, None, w2, None), atol=1e-5, rtol=1e-5)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _compat.require_triton_device("masked_ffn", torch.device("cpu"))


def test_gated_op_names_its_inputs_and_outputs():
    """The named inputs / outputs of ``spvit::gated_attn_conv`` are its schema, argument by argument."""
    from spvit_kernels.gated_attn_conv.forward import OpInputs, OpOutputs
    schema = torch.ops.spvit.gated_attn_conv.default._schema
    assert [a.name for a in schema.arguments] == list(OpInputs._fields)
    assert len(schema.returns) == len(OpOutputs._fields)


def test_kernel_modules_stay_small():
    """No module of spvit_kernels is over 600 lines."""
    sizes = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "spvit_kernels")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    sizes[os.path.relpath(os.path.join(folder, name), ROOT)] = sum(1 for _ in f)
    assert sizes and max(sizes.values()) <= 600, {k: v for k, v in sizes.items() if v > 600}
