"""The built extension carries device code for the GPU architectures setup.py promises.

Reads spvit_kernels/_C*.so directly: an ELF section parser tells whether CUDA code was compiled in at all (a
``.nv_fatbin`` section), and ``cuobjdump`` lists the cubin (SASS) and PTX architectures inside it. ``cuobjdump`` is
looked up on PATH, in CUDA_HOME/bin, and in the ``nvidia-cuda-cuobjdump`` wheel (the test extra installs it).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux ELF binaries")

# What setup.py builds when TORCH_CUDA_ARCH_LIST is not set.
DEFAULT_CUBINS = {"sm_80", "sm_90a"}
DEFAULT_PTX = {"compute_90"}


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("spvit_kernels._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def elf_section_names(path: Path) -> set[str]:
    """Names of the sections of a 64-bit little-endian ELF file.

    Args:
        path: The shared object to read.

    Returns:
        The section names (e.g. ``{".text", ".nv_fatbin", ...}``).

    Raises:
        ValueError: If the file is not a 64-bit little-endian ELF file.
    """
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size) of section i
        base = shoff + i * shentsize
        name = struct.unpack_from("<I", data, base)[0]
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    strtab = data[str_off:str_off + str_size]
    names = set()
    for i in range(shnum):
        name_off = header(i)[0]
        names.add(strtab[name_off:strtab.index(b"\0", name_off)].decode("ascii", "replace"))
    return names


def find_cuobjdump() -> str | None:
    """Path of a cuobjdump executable: PATH, then CUDA_HOME/bin (default /usr/local/cuda), then the PyPI wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for home in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")):
        candidate = Path(home) / "bin" / "cuobjdump"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    try:
        files = importlib.metadata.files("nvidia-cuda-cuobjdump") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == "cuobjdump":
            candidate = Path(entry.locate())
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def list_device_archs(cuobjdump: str, path: Path) -> tuple[set[str], set[str]]:
    """Architectures of the cubins and of the PTX embedded in a binary, as ``sm_XY[a]`` and ``compute_XY[a]``.

    Args:
        cuobjdump: The cuobjdump executable.
        path: The binary to inspect.

    Returns:
        (cubin architectures, PTX architectures).
    """
    def listing(flag: str, suffix: str) -> set[str]:
        proc = subprocess.run([cuobjdump, flag, str(path)], capture_output=True, text=True, timeout=120)
        text = proc.stdout + proc.stderr
        found = set(re.findall(rf"\.(sm_\d+[a-z]?)\.{suffix}\s*$", text, flags=re.MULTILINE))
        if proc.returncode != 0 and "does not contain device code" not in text:
            raise RuntimeError(f"{cuobjdump} {flag} {path} failed ({proc.returncode}): {text.strip()}")
        return found

    cubins = listing("--list-elf", "cubin")
    ptx = {arch.replace("sm_", "compute_") for arch in listing("--list-ptx", "ptx")}
    return cubins, ptx


def expected_archs() -> tuple[set[str], set[str]] | None:
    """The cubin and PTX architectures the build should hold, from TORCH_CUDA_ARCH_LIST or setup.py's defaults.

    Returns:
        (cubins, PTX), or None when TORCH_CUDA_ARCH_LIST holds entries this test does not expand (named families
        such as "Hopper", or "native").
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not value:
        return set(DEFAULT_CUBINS), set(DEFAULT_PTX)
    cubins, ptx = set(), set()
    for entry in filter(None, re.split(r"[;\s]+", value)):
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if match is None:
            return None
        num = f"{match[1]}{match[2]}{match[3]}"
        cubins.add(f"sm_{num}")
        if match[4]:
            ptx.add(f"compute_{num}")
    return cubins, ptx


def test_elf_reader_sees_sections_of_a_known_binary(tmp_path):
    """The section parser reads the running Python executable (.text, .dynsym, no device code) and rejects non-ELF."""
    names = elf_section_names(Path(os.path.realpath(sys.executable)))
    assert {".text", ".dynsym", ".shstrtab"} <= names and ".nv_fatbin" not in names
    not_elf = tmp_path / "not_elf.so"
    not_elf.write_bytes(b"#!/bin/sh\n" + bytes(64))
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        elf_section_names(not_elf)


def test_arch_parsing_of_torch_cuda_arch_list(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 9.0+PTX")
    assert expected_archs() == ({"sm_80", "sm_90a", "sm_90"}, {"compute_90"})
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    assert expected_archs() is None
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert expected_archs() == (DEFAULT_CUBINS, DEFAULT_PTX)


def test_extension_device_architectures():
    """sm_80 + sm_90a cubins and compute_90 PTX (or what TORCH_CUDA_ARCH_LIST asks for) are in spvit_kernels._C."""
    path = _extension_path()
    if path is None:
        pytest.skip("spvit_kernels._C is not built")
    if ".nv_fatbin" not in elf_section_names(path):
        pytest.skip(f"{path.name} is a CPU-only build (no CUDA device code)")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        message = (f"{path.name} holds CUDA code but no cuobjdump was found (PATH, CUDA_HOME/bin, "
                   "or `pip install nvidia-cuda-cuobjdump`)")
        if _truthy_env("CI"):
            pytest.fail(message)
        pytest.skip(message)
    expected = expected_archs()
    if expected is None:
        pytest.skip(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} is not a plain list of versions")
    cubins, ptx = list_device_archs(cuobjdump, path)
    want_cubins, want_ptx = expected
    assert want_cubins <= cubins, f"{path.name}: cubins {sorted(cubins)} lack {sorted(want_cubins - cubins)}"
    assert want_ptx <= ptx, f"{path.name}: PTX {sorted(ptx)} lacks {sorted(want_ptx - ptx)}"
