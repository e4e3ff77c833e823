"""timm's own model tests as a gate: the generic per-model tests of timm's ``tests/test_models.py`` (forward,
backward, config / API contract on the meta device, TorchScript, forward_intermediates and features_only, torch.fx
forward / backward) run unchanged on every model spvit registers with timm.

timm's tests ship in its source distribution, not in the wheel, and nothing of them is copied here: ``.ci/run``
downloads the sdist of the installed timm version (``pip download --no-deps --no-binary :all: timm==<version>``) and
extracts it into ``$SPVIT_TIMM_SDIST_DIR`` (default ``~/.cache/spvit/timm-sdist``). The test runs pytest on that
file in a subprocess with the plugin ``tests/timm_gate/timm_gate_plugin.py``, which changes only which model names
timm's test lists hold (each spvit model is tested as the timm model it is built on). Every test of that file that is
parametrized by a model name runs on the spvit models, whatever pytest marker it carries (or none: timm's own CI jobs
leave unmarked tests such as fx-then-TorchScript out). Without the sdist the test skips, saying how to fetch it; under
``CI=true`` it fails instead.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "tests" / "timm_gate"
# the generic tests each spvit model must pass (those timm selects for the DeiT / ViT / Swin models they are built on)
EXPECTED = {"test_model_forward", "test_model_backward", "test_model_default_cfgs",
            "test_model_forward_torchscript", "test_model_forward_intermediates_features",
            "test_model_forward_intermediates", "test_model_forward_fx", "test_model_backward_fx",
            "test_model_forward_fx_torchscript"}
# timm checks the config on the standard or the non-standard list (ViTs at 224 px are "non-standard" there)
ALTERNATIVES = {"test_model_default_cfgs": ("test_model_default_cfgs", "test_model_default_cfgs_non_std")}


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def sdist_dir() -> Path:
    return Path(os.environ.get("SPVIT_TIMM_SDIST_DIR") or Path.home() / ".cache" / "spvit" / "timm-sdist")


def timm_source() -> Path:
    """The extracted source distribution of the installed timm version."""
    return sdist_dir() / f"timm-{timm.__version__}"


def _load_plugin():
    spec = importlib.util.spec_from_file_location("timm_gate_plugin_for_test", PLUGIN_DIR / "timm_gate_plugin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gate_selection_follows_the_base_models():
    """The plugin's list_models lists spvit models exactly for the queries that list their timm base models."""
    plugin = _load_plugin()
    assert timm.list_models is not plugin.list_models  # importing it changes nothing
    models = plugin.spvit_models()
    assert models["spvit_deit_small_patch16_224"] == "deit_small_patch16_224"
    assert set(models) >= {"spvit_deit_tiny_patch16_224", "spvit_deit_base_patch16_224", "spvit_demo_vit"}
    assert sorted(plugin.list_models()) == sorted(models)
    assert set(plugin.list_models(filter=["deit*"])) == {n for n, b in models.items() if b.startswith("deit")}
    assert set(plugin.list_models(module="deit")) == {n for n, b in models.items() if b.startswith("deit")}
    assert plugin.list_models(filter=["resnet*"]) == [] and plugin.list_models(module="resnet") == []
    assert "spvit_deit_tiny_patch16_224" not in plugin.list_models(exclude_filters=["deit*"])
    assert "spvit_deit_tiny_patch16_224" not in plugin.list_models(exclude_filters=["spvit_deit_t*"])
    assert plugin.list_models(pretrained=True) == [] and plugin.list_pretrained("test_*") == []  # no weights
    assert set(plugin.list_models(name_matches_cfg=True)) == set(models)


def _passed_cases(junit: Path):
    """(test function, model name) of every test case that passed."""
    out = set()
    for case in ET.parse(junit).getroot().iter("testcase"):
        if any(child.tag in ("failure", "error", "skipped") for child in case):
            continue
        name = case.get("name", "")
        func, _, params = name.partition("[")
        out.add((func, params.rstrip("]").split("-")[-1]))
    return out


def test_timm_model_tests_pass_on_spvit_models(tmp_path):
    src = timm_source()
    tests = src / "tests" / "test_models.py"
    if not tests.is_file():
        message = (f"timm's model tests for the installed timm {timm.__version__} are not at {tests}: run "
                   f"`pip download --no-deps --no-binary :all: timm=={timm.__version__}` and extract the archive "
                   f"into {sdist_dir()} (or point SPVIT_TIMM_SDIST_DIR at a folder holding timm-<version>/; "
                   ".ci/run does this)")
        if _truthy_env("CI"):
            pytest.fail(message)
        pytest.skip(message)
    junit = tmp_path / "timm.xml"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_DIR), str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    env.pop("GITHUB_ACTIONS", None)  # timm defines some of its model tests only outside GitHub Actions
    cmd = [sys.executable, "-m", "pytest", "-p", "timm_gate_plugin", "-p", "no:cacheprovider",
           "--import-mode=importlib", "-c", str(src / "pyproject.toml"), "--rootdir", str(src),
           "-W", "ignore::pytest.PytestUnknownMarkWarning", "-q", "-rfE", f"--junitxml={junit}",
           str(tests)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    output = (proc.stdout + proc.stderr)[-8000:]
    assert proc.returncode == 0, f"timm's model tests failed on spvit models:\n{output}"
    passed = _passed_cases(junit)
    models = _load_plugin().spvit_models()
    missing = sorted((f, m) for f in EXPECTED for m in models
                     if not any((alt, m) in passed for alt in ALTERNATIVES.get(f, (f,))))
    assert not missing, f"timm tests that did not run and pass: {missing}\n{output}"
