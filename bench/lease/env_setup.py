"""Step a of the lease check: the environment report, the extension check and the prebuilt artifacts.

    python -m bench.lease.env_setup report            # GPU, driver, versions, TRITON_* variables (stdout)
    python -m bench.lease.env_setup ext-check [--cpu]  # exit 0 when spvit_kernels._C loads with its CUDA kernel
                                                       # (--cpu: with its CPU kernel)
    python -m bench.lease.env_setup unpack PACK DEST   # unpack prebuilt artifacts; prints what they hold and
                                                       # writes DEST/lease_env.sh (TRITON_CACHE_DIR, ...)
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

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
    except Exception as exc:  # noqa: BLE001
        print(f"triton_key: - ({type(exc).__name__})")
    for k, v in sorted(os.environ.items()):
        if k.startswith(("TRITON_", "SPVIT_", "LEASE_", "CUDA_HOME", "PYTORCH_")):
            print(f"env {k}={v}")
    print(f"cpus: {os.cpu_count()}")
    return 0


def _short(key: str) -> str:
    import hashlib
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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


def unpack(pack: str, dest: str) -> int:
    """Unpack ``pack`` (made by bench/lease_prebuild.py) into ``dest``; print its manifest and whether its Triton cache
    was made for this triton build; write ``dest/lease_env.sh``."""
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(pack) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]  # no links, devices
        for m in members:
            if m.name.startswith("/") or ".." in m.name.split("/"):
                print(f"refusing the member {m.name!r} of {pack}")
                return 1
        tar.extractall(dest, members=members)
    man_path = os.path.join(dest, "manifest.json")
    manifest = json.load(open(man_path)) if os.path.exists(man_path) else {}
    print(f"prebuilt: {pack}: {json.dumps({k: v for k, v in manifest.items() if k != 'kernels'})}")
    env_lines = []
    cache = os.path.join(dest, "triton_cache")
    if os.path.isdir(cache):
        n = len(os.listdir(cache))
        try:
            from triton.runtime.cache import triton_key
            here = _short(triton_key())
        except Exception:  # noqa: BLE001
            here = "-"
        made = manifest.get("triton_key_short", "?")
        print(f"prebuilt Triton cache: {n} entries, made for triton key {made}; this triton: {here} "
              f"({'match' if made == here else 'NO MATCH: expect misses'})")
        env_lines.append(f"export TRITON_CACHE_DIR={cache}")
    with open(os.path.join(dest, "lease_env.sh"), "w") as f:
        f.write("\n".join(env_lines) + "\n")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "report":
        return report()
    if cmd == "ext-check":
        return ext_check("--cpu" in rest)
    if cmd == "unpack" and len(rest) == 2:
        return unpack(*rest)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
