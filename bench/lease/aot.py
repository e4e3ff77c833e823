"""Triton kernels compiled ahead of time into a Triton cache folder, on a machine without a GPU.

The kernels go through their own JIT path (``JITFunction.warmup``: the launcher's argument specialisation, options
and cache key), with the runtime made to believe the active device is an NVIDIA GPU of the given compute capability
(:class:`FakeCudaDriver`: ``GPUTarget("cuda", cc, 32)``, the target the CUDA driver reports for such a GPU). Each
kernel is compiled to a cubin by the ptxas that triton carries and stored in ``TRITON_CACHE_DIR`` under the key a GPU
run of the same triton build computes for the same launch, so that run loads it instead of compiling.

The instantiations are those of ``bench/check_triton_compile.py`` (the block sizes and constexprs the CUDA launchers
choose, at DeiT-like shapes, in fp32 / bf16 / fp16; every ``deploy_conv`` autotune config).

The cache key begins with ``triton_key()``, a hash of the installed triton's files, its compiled library among them,
which differs between the builds of one triton version for different Python versions. :func:`triton_key_of` computes
it for another installation's files (e.g. the wheel the GPU machine has, unpacked), and :func:`use_triton_key` makes
this process use it, so that the cache is keyed for that build; the compiler itself is the same source and ptxas.

    python -m bench.lease.aot --cache DIR [--archs 90] [--quick] [--triton-dir UNPACKED_TRITON] [--jobs N]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def triton_key_of(triton_dir: str, ext_suffix: Optional[str] = None) -> str:
    """``triton.runtime.cache.triton_key()`` as the triton installation in ``triton_dir`` (the ``triton`` package
    folder) computes it: its version, then the hashes of runtime/cache.py, the compiler and backends modules, the
    compiled library and the language modules, in the same order."""
    import pkgutil
    import sysconfig

    version = None
    with open(os.path.join(triton_dir, "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("'\"")
    contents = []
    with open(os.path.join(triton_dir, "runtime", "cache.py"), "rb") as f:
        contents.append(hashlib.sha256(f.read()).hexdigest())
    for sub, prefix in (("compiler", "triton.compiler."), ("backends", "triton.backends.")):
        for lib in pkgutil.walk_packages([os.path.join(triton_dir, sub)], prefix=prefix):
            with open(lib.module_finder.find_spec(lib.name).origin, "rb") as f:
                contents.append(hashlib.sha256(f.read()).hexdigest())
    ext = (ext_suffix or sysconfig.get_config_var("EXT_SUFFIX")).split(".")[-1]
    h = hashlib.sha256()
    with open(os.path.join(triton_dir, "_C", f"libtriton.{ext}"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    contents.append(h.hexdigest())
    for lib in pkgutil.walk_packages([os.path.join(triton_dir, "language")], prefix="triton.language."):
        with open(lib.module_finder.find_spec(lib.name).origin, "rb") as f:
            contents.append(hashlib.sha256(f.read()).hexdigest())
    return f"{version}" + "-".join(contents)


def short(key: str) -> str:
    """The first 16 hex digits of the key's sha256 (what the lease prints and compares)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def ptxas_version(cc: int = 90) -> str:
    """The version of the ptxas triton uses for sm_<cc> (part of every CUDA cache key), or "-"."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        return str(get_ptxas_version(cc)).strip().splitlines()[-1]
    except Exception:  # noqa: BLE001
        return "-"


def use_triton_key(key: str) -> None:
    """Make this process key its Triton cache with ``key`` instead of its own installation's."""
    from triton.runtime import autotuner, cache

    cache.triton_key = lambda: key
    autotuner.triton_key = lambda: key


class FakeCudaDriver:
    """The parts of triton's active driver that the JIT compile path asks for, for an NVIDIA GPU of capability
    ``cc`` that is not there (device 0, stream 0). Launching is impossible: use ``warmup`` only."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", cc, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


KEEP = ("json", "cubin")  # what a cache hit loads: the metadata and the binary (the IR files are left out)


def relocate(cache_dir: str, keep=KEEP) -> int:
    """Make a Triton cache folder valid where it now lies: each entry's group file names its files by absolute path
    (a moved cache would miss on every kernel), so rewrite them to this folder, keeping only the files whose suffix
    is in ``keep`` (others are deleted). Returns the number of entries."""
    import json

    n = 0
    for entry in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, entry)
        if not os.path.isdir(d):
            continue
        n += 1
        for name in os.listdir(d):
            if not name.startswith("__grp__") and name.rsplit(".", 1)[-1] not in keep:
                os.remove(os.path.join(d, name))
        for name in os.listdir(d):
            if not name.startswith("__grp__"):
                continue
            path = os.path.join(d, name)
            with open(path) as f:
                grp = json.load(f)
            children = {c: os.path.join(d, c) for c in grp.get("child_paths", {})
                        if os.path.exists(os.path.join(d, c))}
            with open(path, "w") as f:
                json.dump({"child_paths": children}, f)
    return n


def _load_cases(groups: List[str], quick: bool):
    import importlib

    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "0")
    ctc = importlib.import_module("bench.check_triton_compile")
    os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
    out = []
    for g in groups:
        out.extend(ctc.GROUPS[g](quick))
    return out


def _warm_args(case):
    import torch
    from triton.runtime.jit import MockTensor

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    args = []
    for name in case.fn.arg_names:
        if name in case.constexprs:
            continue
        spec = case.args[name]
        args.append(MockTensor(dt[spec[1:]]) if isinstance(spec, str) else spec[1])
    return args


_CASES: list = []  # read by forked workers (cases hold JIT functions, which do not pickle)


def _compile_one(job):
    """Warm case ``job[0]`` for sm_``job[1]``; returns None, or the error line."""
    from triton.runtime.driver import driver

    i, cc = job
    case = _CASES[i]
    driver.set_active(FakeCudaDriver(cc))
    try:
        case.fn.warmup(*_warm_args(case), grid=(1,), num_warps=case.num_warps, num_stages=case.num_stages,
                       **case.constexprs)
        return None
    except Exception as exc:  # noqa: BLE001 - reported, the rest still compiles
        return f"sm_{cc} {case.kernel_name} {case.label} {case.dtype} {case.config_str()}: " \
               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def compile_all(cache_dir: str, archs: List[int], groups: List[str], quick: bool, key: Optional[str],
                jobs: int = 1) -> Dict[str, object]:
    """Warm every case for every arch into ``cache_dir``; returns counts (and the failures)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    sys.path.insert(0, REPO)
    if key:
        use_triton_key(key)
    _CASES[:] = _load_cases(groups, quick)
    cases = _CASES
    jobs_list = [(i, cc) for cc in archs for i in range(len(cases))]
    t0 = time.perf_counter()
    failures = []
    done = 0
    one = _compile_one

    if jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(jobs) as pool:
            for res in pool.imap_unordered(one, jobs_list):
                done += 1
                if res:
                    failures.append(res)
                if done % 20 == 0:
                    print(f"[{done}/{len(jobs_list)}] {time.perf_counter() - t0:.0f} s", flush=True)
    else:
        for job in jobs_list:
            res = one(job)
            done += 1
            if res:
                failures.append(res)
            if done % 20 == 0:
                print(f"[{done}/{len(jobs_list)}] {time.perf_counter() - t0:.0f} s", flush=True)
    entries = len([d for d in os.listdir(cache_dir)]) if os.path.isdir(cache_dir) else 0
    return {"instantiations": len(jobs_list), "failed": len(failures), "failures": failures[:50],
            "cache_entries": entries, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="the Triton cache folder to fill")
    ap.add_argument("--archs", default="90")
    ap.add_argument("--only", default=None, help="comma-separated subset of gated_attn_conv, masked_ffn, shift_sum, "
                                                 "deploy_conv")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--triton-dir", default=None, help="an unpacked triton package folder whose key to use")
    ap.add_argument("--ext-suffix", default=".so")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--probe-events", default=None, help="count cache hits and misses into this file (a check run)")
    args = ap.parse_args(argv)
    if args.probe_events:
        os.environ["LEASE_TRITON_EVENTS"] = args.probe_events
        sys.path.insert(0, REPO)
        from bench.lease import triton_probe
        triton_probe.install()
    key = triton_key_of(args.triton_dir, args.ext_suffix) if args.triton_dir else None
    groups = args.only.split(",") if args.only else ["gated_attn_conv", "masked_ffn", "shift_sum", "deploy_conv"]
    res = compile_all(os.path.abspath(args.cache), [int(a) for a in args.archs.split(",")], groups, args.quick, key,
                      args.jobs)
    if args.probe_events:
        from bench.lease import triton_probe
        res["probe"] = triton_probe.tally(args.probe_events)
    import json
    print("aot: " + json.dumps(res))
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
