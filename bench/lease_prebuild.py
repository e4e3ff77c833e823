"""Prebuilt artifacts for the GPU lease check, made on a machine without a GPU, so the lease spends no time compiling.

Packs into ``OUT/spvit_gpu_prebuilt.tar.gz`` (at most 20 MiB; ``bench/lease_check.sh`` looks for it in
``.lease_prebuilt/`` or at ``LEASE_PREBUILT``):

* ``_C.abi3.so``: the extension built against the torch of the Python running this script (the GPU machine's torch
  version and CUDA, e.g. 2.11.0+cu130), with the default GPU targets of setup.py (sm_80 and sm_90a cubins, compute_90
  PTX); an abi3 module, it loads on any CPython >= 3.10 with that torch;
* ``triton_cache/``: the Triton kernels compiled for sm_90 ahead of time (``bench/lease/aot.py``: the kernels' own JIT
  path against a GPUTarget("cuda", 90, 32); the binaries and their metadata only), keyed for the triton build of the
  GPU machine when its wheel is given (``--triton-wheel``: same triton version, the GPU machine's Python tag);
* ``manifest.json``: versions, the extension's GPU code (cuobjdump), the triton key, the compile counts, the result
  of the check below, and fingerprints of the sources it was made from (the lease builds the extension instead of
  using a prebuilt one made from other C++/CUDA sources, and reports changed Triton kernel sources).

Check (no GPU): the packed cache is unpacked elsewhere, relocated as the lease does, and every kernel is looked up
again through the JIT path: all must be cache hits. What a CPU cannot check: that the GPU machine's triton files are
those of the wheel given, and that the lease launches the instantiations compiled here; the lease reports its hits
and misses, so its first run tells.

    CUDA_HOME=/usr/local/cuda MAX_JOBS=2 /path/to/python-with-the-gpu-torch bench/lease_prebuild.py \\
        --out .lease_prebuilt --triton-wheel triton-3.6.0-cp312-...whl [--quick] [--jobs 2] [--ext-from SO]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
LIMIT_MIB = 20


def _say(msg: str) -> None:
    print(f"[prebuild {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_ext(stage: str, log: str) -> str:
    """Build the extension in a copy of the sources; returns the .so path."""
    src = os.path.join(stage, "src")
    os.makedirs(os.path.join(src, "spvit_kernels"), exist_ok=True)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(os.path.join(REPO, name), src)
    shutil.copytree(os.path.join(REPO, "csrc"), os.path.join(src, "csrc"), dirs_exist_ok=True)
    env = dict(os.environ)
    env.pop("TORCH_CUDA_ARCH_LIST", None)  # setup.py's default targets
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env.setdefault("MAX_JOBS", "2")
    for flag in ("SPVIT_SKIP_EXT", "SPVIT_SKIP_CUDA", "SPVIT_DEBUG_BUILD"):
        env.pop(flag, None)
    lib = os.path.join(stage, "lib")
    with open(log, "w") as f:
        cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", lib, "--build-temp", os.path.join(stage, "tmp")]
        rc = subprocess.run(cmd, cwd=src, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    so = os.path.join(lib, "spvit_kernels", "_C.abi3.so")
    if rc != 0 or not os.path.exists(so):
        raise SystemExit(f"lease_prebuild: error: the extension build failed (exit {rc}); see {log}")
    return so


def gpu_code(so: str) -> dict:
    """The cubins and PTX in the extension, listed by the cuobjdump that triton carries (or CUDA's)."""
    exe = shutil.which("cuobjdump")
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        exe = exe or (cand if os.path.exists(cand) else None)
    except ImportError:
        pass
    if not exe:
        return {"cuobjdump": "not found"}
    res = subprocess.run([exe, so], capture_output=True, text=True)
    out, kind = {"cubin": [], "ptx": []}, None
    for ln in res.stdout.splitlines():  # "Fatbin elf code:" / "Fatbin ptx code:", then "arch = sm_XX"
        if ln.startswith("Fatbin "):
            kind = "cubin" if " elf " in ln else "ptx"
        elif ln.startswith("arch = ") and kind:
            out[kind].append(ln.split("=", 1)[1].strip().replace("sm_", "compute_" if kind == "ptx" else "sm_"))
    return out


def unpack_triton_wheel(wheel: str, dest: str) -> tuple:
    """Unpack the ``triton/`` folder of a wheel; returns (folder, the wheel's extension suffix)."""
    with zipfile.ZipFile(wheel) as z:
        for m in z.namelist():
            if m.startswith("triton/") and ".." not in m.split("/"):
                z.extract(m, dest)
    tag = os.path.basename(wheel).split("-")[2]  # e.g. cp312
    return os.path.join(dest, "triton"), f".cpython-{tag[2:]}-x86_64-linux-gnu.so"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=os.path.join(REPO, ".lease_prebuilt"))
    ap.add_argument("--ext-from", default=None, help="an extension already built against this torch (skip the build)")
    ap.add_argument("--no-ext", action="store_true", help="pack no extension (the lease then builds it)")
    ap.add_argument("--triton-wheel", default=None, help="the GPU machine's triton wheel (same version; its Python "
                                                         "tag): the cache is keyed for that build")
    ap.add_argument("--triton-dir", default=None, help="or that triton installed/unpacked (the `triton` folder)")
    ap.add_argument("--ext-suffix", default=None, help="with --triton-dir: its Python's extension suffix")
    ap.add_argument("--archs", default="90")
    ap.add_argument("--quick", action="store_true", help="fewer instantiations (check_triton_compile.py --quick)")
    ap.add_argument("--only", default=None, help="a subset of the kernel groups (aot.py --only)")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)

    import torch
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    stage = tempfile.mkdtemp(prefix="spvit_prebuild_")
    pack_dir = os.path.join(stage, "pack")
    os.makedirs(pack_dir)
    from bench.lease.env_setup import source_fingerprints
    manifest = {"made": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda, "python_used": sys.version.split()[0],
                "sources": source_fingerprints(REPO)}
    _say(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {manifest['python_used']}")
    if not (torch.__version__.startswith("2.11.0") and torch.version.cuda == "13.0"):
        _say("note: this torch is not 2.11.0+cu130 (the GPU machine's): the extension is built against it anyway")

    if not args.no_ext:
        so = args.ext_from or build_ext(stage, os.path.join(out, "ext_build.log"))
        shutil.copy2(so, os.path.join(pack_dir, "_C.abi3.so"))
        manifest["ext"] = {"built_here": not args.ext_from, **gpu_code(so)}
        _say(f"extension: {manifest['ext']}")

    if not args.no_triton:
        from bench.lease import aot
        import triton
        if args.triton_wheel:
            tdir, suffix = unpack_triton_wheel(args.triton_wheel, os.path.join(stage, "wheel"))
            src = os.path.basename(args.triton_wheel)
        elif args.triton_dir:
            tdir, suffix, src = args.triton_dir, args.ext_suffix, args.triton_dir
        else:
            tdir, suffix, src = os.path.dirname(triton.__file__), None, "the triton running this script"
        key = aot.triton_key_of(tdir, suffix)
        manifest.update(triton=triton.__version__, triton_key_source=src, triton_key_short=aot.short(key),
                        ptxas=aot.ptxas_version(90))
        cache = os.path.join(pack_dir, "triton_cache")
        cmd = [sys.executable, "-m", "bench.lease.aot", "--cache", cache, "--archs", args.archs, "--triton-dir", tdir,
               "--jobs", str(args.jobs)] + (["--ext-suffix", suffix] if suffix else []) + \
            (["--quick"] if args.quick else []) + (["--only", args.only] if args.only else [])
        _say(f"compiling the Triton kernels for sm_{args.archs} (key {aot.short(key)} from {src}) ...")
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("aot: ")]
        manifest["aot"] = json.loads(line[-1][5:]) if line else {"error": res.stderr[-2000:]}
        if not line:
            print(res.stdout[-3000:], res.stderr[-3000:])
        _say(f"compiled: {manifest['aot'].get('instantiations')} instantiations, {manifest['aot'].get('failed')} "
             f"failed, {manifest['aot'].get('cache_entries')} cache entries in {manifest['aot'].get('seconds')} s")
        aot.relocate(cache)
        # the check: a copy elsewhere, relocated as the lease does, looked up again through the JIT path
        check = os.path.join(stage, "check_cache")
        shutil.copytree(cache, check)
        aot.relocate(check)
        events = os.path.join(stage, "events.jsonl")
        res = subprocess.run(cmd[:4] + [check] + cmd[5:] + ["--probe-events", events], cwd=REPO,
                             capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("aot: ")]
        probe = json.loads(line[-1][5:]).get("probe", {}) if line else {"error": res.stderr[-2000:]}
        manifest["check_moved_cache"] = probe
        _say(f"check of the moved cache (lookups through the JIT path): {probe}")

    with open(os.path.join(pack_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    pack = os.path.join(out, "spvit_gpu_prebuilt.tar.gz")
    with tarfile.open(pack + ".part", "w:gz") as tar:
        for name in sorted(os.listdir(pack_dir)):
            tar.add(os.path.join(pack_dir, name), arcname=name)
    os.replace(pack + ".part", pack)
    size = os.path.getsize(pack) / 2**20
    _say(f"wrote {pack} ({size:.1f} MiB)")
    shutil.rmtree(stage, ignore_errors=True)
    if size > LIMIT_MIB:
        print(f"lease_prebuild: error: {pack} is {size:.1f} MiB, over {LIMIT_MIB} MiB (use --quick)")
        return 1
    probe = manifest.get("check_moved_cache", {})
    if probe and (probe.get("misses") or not probe.get("hits")):
        print("lease_prebuild: error: the moved cache missed kernels it holds")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
