"""The GPU lease command (bench/lease_check.sh) end to end on the CPU in its smoke mode.

One run covers every step (setup, op tests, ratios, sanitizer cases, fill) with step c made to wait after its first
measured row until its time limit kills it (LEASE_TEST_STALL): the killed step must still leave its partial log in
the archive and its rows in rows.jsonl, the later steps must still run, and the output folder must never hold more than
8 files (watched while the command runs). A second, cheap run checks the deadline arithmetic and bad input.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "lease_check.sh")
MAX_FILES = 8

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _env(**extra):
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("LEASE_") or k in ("OUT", "TRITON_CACHE_DIR"):
            env.pop(k)
    env.pop("TRITON_INTERPRET", None)  # the command sets it itself in smoke mode
    env.update(PYTHON=sys.executable, **extra)
    return env


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def _run_watched(args, env, out, timeout):
    """Run the command, polling ``out``; returns (returncode, stdout, the most files seen there at once)."""
    proc = subprocess.Popen(["bash", SCRIPT, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    most = 0
    t_end = time.monotonic() + timeout
    while proc.poll() is None:
        if os.path.isdir(out):
            most = max(most, len(_files(out)))
        if time.monotonic() > t_end:
            proc.kill()
            pytest.fail(f"the lease command ran past {timeout} s: {proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    return proc.returncode, proc.stdout.read(), max(most, len(_files(out)))


def _ext_loads():
    try:
        from spvit_kernels import _ext
        return _ext.has_op("shift_sum")
    except Exception:  # noqa: BLE001
        return False


def _fake_pack(tmp_path):
    """A prebuilt pack as bench/lease_prebuild.py writes it, with one Triton cache entry whose group file names its
    files by absolute path under the folder where it was made (no extension: the local one is used)."""
    made = tmp_path / "made" / "triton_cache" / "ENTRY"
    made.mkdir(parents=True)
    children = {}
    for name in ("k.json", "k.cubin", "k.ptx", "k.llir"):
        (made / name).write_text(name)
        children[name] = str(made / name)
    (made / "__grp__k.json").write_text(json.dumps({"child_paths": children}))
    from bench.lease.env_setup import source_fingerprints
    manifest = {"triton_key_short": "0123456789abcdef", "sources": source_fingerprints(REPO)}
    (tmp_path / "made" / "manifest.json").write_text(json.dumps(manifest))
    pack = tmp_path / "pack.tar.gz"
    with tarfile.open(pack, "w:gz") as tar:
        for name in ("triton_cache", "manifest.json"):
            tar.add(tmp_path / "made" / name, arcname=name)
    shutil.rmtree(tmp_path / "made")
    return pack


def test_smoke_run_end_to_end_with_a_step_killed_by_its_limit(tmp_path):
    out = tmp_path / "out"
    # generous caps but c's (a loaded 2-core machine is slow; c is killed at its cap whatever the load)
    env = _env(LEASE_TEST_STALL="c", LEASE_CAP_C="30", LEASE_CAP_A="120", LEASE_CAP_B="150", LEASE_CAP_D="150",
               LEASE_CAP_E="300", LEASE_DEADLINE_S="900", LEASE_PREBUILT=str(_fake_pack(tmp_path)))
    rc, text, most = _run_watched(["--smoke", str(out)], env, str(out), timeout=900)
    assert most <= MAX_FILES, f"{most} files in OUT at once"
    files = _files(str(out))
    assert files == ["lease_results.tar.gz", "rows.jsonl", "summary.json", "summary.md"], files
    assert rc == 1, text[-3000:]  # step c was killed

    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert list(status) == ["a", "b", "c", "d", "e"], text[-3000:]
    assert status["c"].startswith("killed (time limit"), status
    for step in ("b", "d", "e"):
        assert status[step] == "pass", (step, text[-4000:])
    assert status["a"] == ("pass" if _ext_loads() else "FAIL"), text[-3000:]
    assert summary["overall"] == "FAIL" and summary["smoke"] is True
    # one status line per step on stdout
    for step, name in (("a", "setup"), ("b", "ops"), ("c", "ratios"), ("d", "sanitize"), ("e", "fill")):
        assert sum(f"step {step} {name}:" in line for line in text.splitlines()) == 1, text[-3000:]

    with tarfile.open(out / "lease_results.tar.gz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
        logs = {n: tar.extractfile(n).read().decode() for n in tar.getnames()
                if n.endswith(".log") and tar.getmember(n).isfile()}
    for name in ("env.txt", "steps.tsv", "rows.jsonl", "junit_ops.xml"):
        assert name in names, names
    by_step = {os.path.basename(n).split("_")[1]: text_ for n, text_ in logs.items()
               if os.path.basename(n).startswith("step_")}
    assert sorted(by_step) == ["a", "b", "c", "d", "e"], sorted(logs)
    assert "PASSED" in by_step["b"] and "SKIPPED" in by_step["b"]  # -v: every finished test is named
    assert "cases matched the reference" in by_step["d"]
    # the prebuilt pack: unpacked, its cache relocated and used, its key compared with this triton's
    assert "prebuilt Triton cache: 1 entries, made for triton key 0123456789abcdef" in by_step["a"], by_step["a"]
    assert "NO MATCH" in by_step["a"]
    assert "prebuilt sources: extension same as this checkout; Triton kernels same as this checkout" in by_step["a"]
    with tarfile.open(out / "lease_results.tar.gz") as tar:
        env_txt = tar.extractfile("./env.txt").read().decode()
    assert "prebuilt/triton_cache (from step a on)" in env_txt
    assert "per-test time limit: 60 s (" in env_txt  # pytest-timeout, else bench/lease/per_test_timeout.py
    log_c = by_step["c"]
    assert "LEASE_TEST_STALL=c: waiting for the time limit" in log_c and "exit 124" in log_c, log_c[-2000:]

    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    printed = [json.loads(line[len("row: "):]) for line in log_c.splitlines() if line.startswith("row: ")]
    assert printed, log_c[-2000:]
    assert all(r in rows for r in printed)  # every row the killed step measured is kept
    assert [r for r in rows if r["step"] in ("plan", "step", "infer")] == printed
    assert printed[0]["item"] == "plan"  # written before the slow imports: the killed step always has a row
    # the steps after the killed one measured their rows; the summary carries their ratios
    assert any(r.get("item") == "kernel" and "ratio" in r for r in rows)
    assert any(r.get("item") == "infer_b1" and r.get("ratio") for r in summary["ratios"])
    assert summary["rows"] == len(rows)
    md = (out / "summary.md").read_text()
    assert "killed (time limit" in md and "| e | fill | pass |" in md


def test_deadline_and_bad_input(tmp_path):
    out = tmp_path / "late"
    rc, text, most = _run_watched(["--smoke", "--deadline", "5", str(out)], _env(), str(out), timeout=120)
    assert rc == 1 and most <= MAX_FILES
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["not run (deadline)"] * 5, text
    assert "step a setup: not run, the deadline is reached" in text

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    res = subprocess.run(["bash", SCRIPT, "--smoke", str(taken)], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "is not empty" in res.stderr
    assert _files(str(taken)) == ["mine.txt"] and (taken / "mine.txt").read_text() == "keep"
    for args in (["--deadline", "soon", str(tmp_path / "x")], ["--frobnicate", str(tmp_path / "y")], []):
        res = subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 2 and res.stderr.startswith("lease_check: error:"), (args, res.stderr)


def test_moved_triton_cache_is_relocated(tmp_path):
    from bench.lease.aot import relocate

    made = tmp_path / "elsewhere" / "E1"
    made.mkdir(parents=True)
    for name in ("k.json", "k.cubin", "k.ptx", "k.ttir"):
        (made / name).write_text(name)
    grp = {"child_paths": {n: str(made / n) for n in ("k.json", "k.cubin", "k.ptx", "k.ttir")}}
    (made / "__grp__k.json").write_text(json.dumps(grp))
    moved = tmp_path / "cache"
    shutil.copytree(tmp_path / "elsewhere", moved)
    shutil.rmtree(tmp_path / "elsewhere")
    assert relocate(str(moved)) == 1
    children = json.loads((moved / "E1" / "__grp__k.json").read_text())["child_paths"]
    assert children == {"k.json": str(moved / "E1" / "k.json"), "k.cubin": str(moved / "E1" / "k.cubin")}
    assert sorted(os.listdir(moved / "E1")) == ["__grp__k.json", "k.cubin", "k.json"]


def _tiny_repo(root):
    for rel, text in (("setup.py", "flags = 1\n"), ("csrc/op.cpp", "int f();\n"), ("csrc/cuda/op.cu", "// k\n"),
                      ("spvit_kernels/k.py", "K = 1\n"), ("README.md", "not a source\n")):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_source_fingerprints_follow_the_compiled_sources(tmp_path):
    from bench.lease.env_setup import pack_freshness, source_fingerprints

    repo = _tiny_repo(tmp_path / "repo")
    made = source_fingerprints(str(repo))
    assert sorted(made) == ["extension", "triton_kernels"] and all(len(v) == 16 for v in made.values())
    manifest = {"sources": made}
    assert pack_freshness(manifest, str(repo)) == {"extension": "same", "triton_kernels": "same"}
    # built files, caches and files outside the sources change nothing
    (repo / "spvit_kernels" / "_C.abi3.so").write_bytes(b"ELF")
    (repo / "spvit_kernels" / "_C.abi3.so.before-lease-20260101-000000").write_bytes(b"ELF")
    (repo / "csrc" / "op.o").write_bytes(b"obj")
    (repo / "spvit_kernels" / "__pycache__").mkdir()
    (repo / "spvit_kernels" / "__pycache__" / "k.cpython-311.pyc").write_bytes(b"pyc")
    (repo / "README.md").write_text("changed\n")
    assert source_fingerprints(str(repo)) == made
    # a CUDA source, a new C++ file, the build flags: the extension part only
    (repo / "csrc" / "cuda" / "op.cu").write_text("// k2\n")
    assert pack_freshness(manifest, str(repo)) == {"extension": "changed", "triton_kernels": "same"}
    (repo / "csrc" / "cuda" / "op.cu").write_text("// k\n")
    assert pack_freshness(manifest, str(repo))["extension"] == "same"
    (repo / "csrc" / "new.cpp").write_text("")
    assert pack_freshness(manifest, str(repo))["extension"] == "changed"
    (repo / "csrc" / "new.cpp").unlink()
    (repo / "setup.py").write_text("flags = 2\n")
    assert pack_freshness(manifest, str(repo))["extension"] == "changed"
    (repo / "setup.py").write_text("flags = 1\n")
    (repo / "spvit_kernels" / "k.py").write_text("K = 2\n")
    assert pack_freshness(manifest, str(repo)) == {"extension": "same", "triton_kernels": "changed"}
    # a pack made before packs recorded fingerprints
    assert pack_freshness({}, str(repo)) == {"extension": "unknown", "triton_kernels": "unknown"}


@pytest.mark.parametrize("case", ["same sources", "same sources, does not load", "csrc changed"])
def test_a_prebuilt_extension_from_other_sources_is_not_used(tmp_path, monkeypatch, capsys, case):
    """Step a installs the pack's extension only when it was made from the checkout's C++/CUDA sources; else the
    extension is built (need_build), and the checkout's files are untouched. The checkout's own extension is moved
    aside, never deleted, when the prebuilt one replaces it."""
    from bench.lease import env_setup

    csrc_changed, loads = case == "csrc changed", case == "same sources"

    repo = _tiny_repo(tmp_path / "repo")
    made = env_setup.source_fingerprints(str(repo))
    if csrc_changed:
        (repo / "csrc" / "op.cpp").write_text("int f(int);\n")
    mine = repo / "spvit_kernels" / "_C.abi3.so"
    mine.write_bytes(b"the user's own build")
    content = tmp_path / "content"
    content.mkdir()
    (content / "_C.abi3.so").write_bytes(b"prebuilt")
    (content / "manifest.json").write_text(json.dumps({"sources": made}))
    pack = tmp_path / "pack.tar.gz"
    with tarfile.open(pack, "w:gz") as tar:
        for name in ("_C.abi3.so", "manifest.json"):
            tar.add(content / name, arcname=name)
    monkeypatch.setattr(env_setup, "REPO", str(repo))
    monkeypatch.setattr(env_setup, "ext_check", lambda cpu: 1)  # the checkout's extension does not load
    monkeypatch.setattr(env_setup, "report", lambda: 0)
    checked = []
    monkeypatch.setattr(env_setup.subprocess, "run", lambda args, **kw: checked.append(args) or
                        subprocess.CompletedProcess(args, 0 if loads else 1))  # the installed one loads?
    work = tmp_path / "work"
    work.mkdir()
    assert env_setup.setup(str(work), str(pack), cpu=True) == (0 if loads else 1)
    text = capsys.readouterr().out
    assert (work / "need_build").exists() == (not loads)
    kept = [p for p in os.listdir(repo / "spvit_kernels") if p.startswith("_C.abi3.so.before-lease-")]
    if csrc_changed:
        assert "prebuilt sources: extension CHANGED since the pack was made; its extension is not used" in text
        assert "made from other C++/CUDA sources (csrc/, setup.py): not used" in text
        assert mine.read_bytes() == b"the user's own build" and not checked
        assert sorted(os.listdir(repo / "spvit_kernels")) == ["_C.abi3.so", "k.py"]
    else:
        assert "prebuilt sources: extension same as this checkout" in text
        assert len(checked) == 1  # installed, then checked in a new process
        # used when it loads; else the copy is removed (the build replaces it), never the user's file
        assert mine.read_bytes() == b"prebuilt" if loads else not mine.exists()
        assert len(kept) == 1 and f"is kept as spvit_kernels/{kept[0]}" in text  # the user's build: never deleted
        assert (repo / "spvit_kernels" / kept[0]).read_bytes() == b"the user's own build"


def test_triton_key_of_matches_the_installed_triton():
    triton = pytest.importorskip("triton")
    from triton.runtime.cache import triton_key

    from bench.lease.aot import short, triton_key_of

    key = triton_key_of(os.path.dirname(triton.__file__))
    assert key == triton_key()
    assert len(short(key)) == 16


_HANGING_TESTS = '''
import time

def test_first():
    pass

def test_hangs():
    time.sleep(120)

def test_after():
    pass
'''


def _pytest_with_limit(tmp_path, limit, *extra, tests=_HANGING_TESTS):
    (tmp_path / "test_hanging.py").write_text(tests)
    env = _env(LEASE_TEST_TIMEOUT=str(limit), PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "bench.lease.per_test_timeout",
           *extra, str(tmp_path / "test_hanging.py")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)


def test_per_test_timeout_ends_a_hanging_test_and_names_it(tmp_path):
    """Without pytest-timeout the lease's per-test limit comes from faulthandler's watchdog: the hanging test's
    process ends with the stacks on stderr, and the -v log's last test line names it."""
    t0 = time.monotonic()
    proc = _pytest_with_limit(tmp_path, 2)
    assert time.monotonic() - t0 < 60, "the limit did not end the hanging test"
    assert proc.returncode == 1
    assert "test_first PASSED" in proc.stdout
    last_test_line = [ln for ln in proc.stdout.splitlines() if "test_hanging.py::" in ln][-1]
    assert last_test_line.rstrip().endswith("::test_hangs"), proc.stdout
    assert "Timeout (0:00:02)!" in proc.stderr and "in test_hangs" in proc.stderr, proc.stderr
    # a limit that is not reached changes nothing; a bad value is named
    quick = "def test_quick():\n    pass\n"
    assert _pytest_with_limit(tmp_path, 30, tests=quick).returncode == 0
    bad = _pytest_with_limit(tmp_path, "ninety", tests=quick)
    assert bad.returncode == 4 and "LEASE_TEST_TIMEOUT must be a number of seconds, got 'ninety'" in bad.stderr


def test_per_test_timeout_under_xdist_ends_only_that_worker(tmp_path):
    pytest.importorskip("xdist")
    proc = _pytest_with_limit(tmp_path, 3, "-n", "2")
    assert proc.returncode == 1
    assert "worker 'gw" in proc.stdout and "crashed while running 'test_hanging.py::test_hangs'" in proc.stdout
    assert "1 failed, 2 passed" in proc.stdout, proc.stdout
