"""Step a of the lease check: the environment report, the extension check and the prebuilt artifacts.

    python -m bench.lease.env_setup report            # GPU, driver, versions, TRITON_* variables (stdout)
    python -m bench.lease.env_setup ext-check [--cpu]  # exit 0 when spvit_kernels._C loads with its CUDA kernel
                                                       # (--cpu: with its CPU kernel)
    python -m bench.lease.env_setup keep-aside          # move spvit_kernels/_C.abi3.so aside before it is replaced
    python -m bench.lease.env_setup unpack PACK DEST   # unpack prebuilt artifacts; prints what they hold and
                                                       # writes DEST/lease_env.sh (TRITON_CACHE_DIR, ...)
    python -m bench.lease.env_setup setup WORK [PACK] [--cpu]
        # all of step a in one process: unpack PACK into WORK/prebuilt, check the extension (when it does not load
        # with its kernel and PACK holds one, install that and check again), write WORK/env.txt; exit 0 when the
        # extension is ready, else 1 with WORK/need_build written

A pack records fingerprints of the sources it was made from (``source_fingerprints``); step a compares them with the
checkout's. A prebuilt extension made from other C++/CUDA sources is not used (it is built instead), so a pack carried
across a change of ``csrc/`` never measures old code; changed Triton kernel sources only mean cache misses (Triton's
own keys hash the kernel sources), which the lease reports.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def report() -> int:
    print(f"python: {sys.version.split()[0]} ({sys.executable})")
    for name in ("torch", "triton", "timm", "numpy", "pytest", "xdist", "pytest_timeout", "ninja"):
        try:
            mod = importlib.import_module(name)
            print(f"{name}: {getattr(mod, '__version__', 'installed')}")
        except Exception as exc:  # noqa: BLE001 - report, the steps say what it breaks
            print(f"{name}: MISSING ({type(exc).__name__})")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            print(f"gpu: {res.stdout.strip() or res.stderr.strip()}")
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"gpu: nvidia-smi failed ({exc})")
    else:
        print("gpu: nvidia-smi not found")
    try:
        import torch
        cuda = torch.cuda.is_available()
        print(f"torch.cuda: {torch.version.cuda}; available: {cuda}")
        if cuda:
            p = torch.cuda.get_device_properties(0)
            print(f"device: {p.name}; capability {p.major}.{p.minor}; {p.multi_processor_count} SMs; "
                  f"{p.total_memory / 2**30:.0f} GiB")
    except Exception as exc:  # noqa: BLE001
        print(f"torch.cuda: {exc}")
    try:
        from triton.runtime.cache import triton_key
        print(f"triton_key: {_short(triton_key())}")
        from bench.lease.aot import ptxas_version
        print(f"ptxas (sm_90): {ptxas_version(90)}")
    except Exception as exc:  # noqa: BLE001
        print(f"triton_key: - ({type(exc).__name__})")
    for k, v in sorted(os.environ.items()):
        if k.startswith(("TRITON_", "SPVIT_", "LEASE_", "CUDA_HOME", "PYTORCH_")):
            print(f"env {k}={v}")
    print(f"cpus: {os.cpu_count()}")
    return 0


def _short(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# what each part of a pack is compiled from: (paths relative to the repository, the file name endings read there): the
# extension from its C++/CUDA sources and setup.py (its flags); the Triton cache from the kernels' Python sources
SOURCES = {"extension": (("setup.py", "csrc"), (".py", ".cpp", ".cc", ".c", ".h", ".hpp", ".cu", ".cuh")),
           "triton_kernels": (("spvit_kernels",), (".py",))}


def source_fingerprints(repo: str = "") -> dict:
    """``{part: sha256 (16 hex digits) over the relative paths and bytes of its sources}`` (see ``SOURCES``: built
    files, caches and other files beside the sources are not read)."""
    repo = repo or REPO
    out = {}
    for part, (roots, endings) in SOURCES.items():
        files = []
        for root in roots:
            path = os.path.join(repo, root)
            if os.path.isfile(path):
                files.append(root)
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                files += [os.path.relpath(os.path.join(dirpath, f), repo) for f in filenames if f.endswith(endings)]
        h = hashlib.sha256()
        for rel in sorted(files):
            h.update(rel.replace(os.sep, "/").encode() + b"\0")
            with open(os.path.join(repo, rel), "rb") as f:
                h.update(f.read() + b"\0")
        out[part] = h.hexdigest()[:16]
    return out


def pack_freshness(manifest: dict, repo: str = "") -> dict:
    """``{part: "same" | "changed" | "unknown"}``: the pack's source fingerprints against the checkout's ("unknown"
    for a pack made before packs recorded them)."""
    made = manifest.get("sources") or {}
    here = source_fingerprints(repo)
    return {part: ("unknown" if part not in made else "same" if made[part] == fp else "changed")
            for part, fp in here.items()}


def ext_check(cpu: bool) -> int:
    import torch

    from spvit_kernels import _ext
    ok = _ext.available() and _ext.has_op("shift_sum")
    key = "CPU" if cpu else "CUDA"
    kernel = ok and torch._C._dispatch_has_kernel_for_dispatch_key("spvit::shift_sum", key)
    print(f"spvit_kernels._C: loaded {_ext.available()} {_ext.error() or ''}; {key} kernel: {bool(kernel)}")
    if not kernel:
        return 1
    from spvit_kernels import reference
    from spvit_kernels.shift_sum import shift_sum_ext
    dev = "cpu" if cpu else "cuda"
    x = torch.randn(2, 12, 9, 8, device=dev)
    torch.testing.assert_close(shift_sum_ext(x, None, (3, 4), True), reference.shift_sum(x, None, (3, 4), True))
    print(f"shift_sum on {dev} matches the reference")
    return 0


def unpack(pack: str, dest: str):
    """Unpack ``pack`` (made by bench/lease_prebuild.py) into ``dest``; print its manifest, whether it was made from
    this checkout's sources and whether its Triton cache was made for this triton build; write ``dest/lease_env.sh``.
    Returns ``pack_freshness`` of its manifest, or None when the pack is refused."""
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(pack) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]  # no links, devices
        for m in members:
            if m.name.startswith("/") or ".." in m.name.split("/"):
                print(f"refusing the member {m.name!r} of {pack}")
                return None
        tar.extractall(dest, members=members)
    man_path = os.path.join(dest, "manifest.json")
    manifest = json.load(open(man_path)) if os.path.exists(man_path) else {}
    print(f"prebuilt: {pack}: {json.dumps({k: v for k, v in manifest.items() if k != 'kernels'})}")
    fresh = pack_freshness(manifest)
    words = {"same": "same as this checkout", "unknown": "unknown (the pack records no fingerprints)",
             "changed": "CHANGED since the pack was made"}
    print(f"prebuilt sources: extension {words[fresh['extension']]}"
          + ("; its extension is not used, it is built" if fresh["extension"] == "changed" else "")
          + f"; Triton kernels {words[fresh['triton_kernels']]}"
          + ("; expect cache misses (they compile on first use)" if fresh["triton_kernels"] == "changed" else ""))
    env_lines = []
    cache = os.path.join(dest, "triton_cache")
    if os.path.isdir(cache):
        from bench.lease.aot import relocate
        n = relocate(cache)
        try:
            from triton.runtime.cache import triton_key
            here = _short(triton_key())
        except Exception:  # noqa: BLE001
            here = "-"
        made = manifest.get("triton_key_short", "?")
        print(f"prebuilt Triton cache: {n} entries, made for triton key {made}; this triton: {here} "
              f"({'match' if made == here else 'NO MATCH: expect misses'})")
        try:
            from bench.lease.aot import ptxas_version
            ptx_here = ptxas_version(90)
        except Exception:  # noqa: BLE001
            ptx_here = "-"
        print(f"prebuilt Triton cache: ptxas {manifest.get('ptxas', '?')}; here {ptx_here}")
        env_lines.append(f"export TRITON_CACHE_DIR={cache}")
    with open(os.path.join(dest, "lease_env.sh"), "w") as f:
        f.write("\n".join(env_lines) + "\n")
    return fresh


def setup(work: str, pack: str, cpu: bool) -> int:
    prebuilt = os.path.join(work, "prebuilt")
    fresh = {}
    if pack and os.path.exists(pack):
        fresh = unpack(pack, prebuilt)
        if fresh is None:
            print(f"prebuilt: could not unpack {pack}")
    else:
        print(f"prebuilt: none ({pack or '-'} not found): the Triton kernels compile on first use")
    sys.stdout.flush()
    env_path = os.path.join(work, "env.txt")
    with open(env_path, "w") as f, _redirect(f):
        report()
    print(open(env_path).read(), end="")
    try:
        ok = ext_check(cpu) == 0
    except Exception as exc:  # noqa: BLE001 - a broken extension is reported, then replaced or rebuilt
        print(f"extension check failed: {type(exc).__name__}: {exc}")
        ok = False
    target = _ext_target()
    so = os.path.join(prebuilt, "_C.abi3.so")
    stale = (fresh or {}).get("extension") == "changed"
    if ok:
        print("extension: the one in spvit_kernels/ loads with its kernel")
    elif os.path.exists(so) and stale:
        print("extension: the prebuilt one was made from other C++/CUDA sources (csrc/, setup.py): not used")
    elif os.path.exists(so):
        keep_aside()
        shutil.copy2(so, target)
        args = [sys.executable, "-m", "bench.lease.env_setup", "ext-check"] + (["--cpu"] if cpu else [])
        ok = subprocess.run(args, cwd=REPO).returncode == 0
        print("extension: prebuilt" if ok else "extension: the prebuilt one does not load with its kernel")
        if not ok:
            os.remove(target)  # the pack's copy, not the user's (that one was kept aside)
    if not ok:
        open(os.path.join(work, "need_build"), "w").write("build\n")
        print("extension: to be built")
    return 0 if ok else 1


def keep_aside() -> int:
    """Before the lease replaces the checkout's ``spvit_kernels/_C.abi3.so`` (with the prebuilt one, or a build), move
    it to ``_C.abi3.so.before-lease-<time>`` beside it (a name Python does not import): nothing is deleted."""
    target = _ext_target()
    if not os.path.exists(target):
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept, n = f"{target}.before-lease-{stamp}", 1
    while os.path.exists(kept):
        kept, n = f"{target}.before-lease-{stamp}-{n}", n + 1
    os.replace(target, kept)
    print(f"extension: the checkout's {os.path.relpath(target, REPO)} (it does not load with its kernel) is kept as "
          f"{os.path.relpath(kept, REPO)}")
    return 0


def _ext_target() -> str:
    return os.path.join(REPO, "spvit_kernels", "_C.abi3.so")


class _redirect:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        self.old = sys.stdout
        sys.stdout = self.f

    def __exit__(self, *exc):
        sys.stdout = self.old


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "report":
        return report()
    if cmd == "keep-aside":
        return keep_aside()
    if cmd == "ext-check":
        return ext_check("--cpu" in rest)
    if cmd == "setup" and rest:
        pos = [a for a in rest if not a.startswith("--")]
        return setup(pos[0], pos[1] if len(pos) > 1 else "", "--cpu" in rest)
    if cmd == "unpack" and len(rest) == 2:
        return 0 if unpack(*rest) is not None else 1
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
