"""Build script for the optional C++/CUDA extension ``spvit_kernels._C``.

Environment switches (read at build time):
  SPVIT_SKIP_EXT=1       do not build the extension at all (pure Python install; Triton/eager paths only).
  SPVIT_SKIP_CUDA=1      build only the C++ (CPU) kernels even when nvcc is available. Without nvcc (no CUDA_HOME,
                         no ``nvcc`` on PATH) the build is CPU-only as well.
  SPVIT_DEBUG_BUILD=1    build with -O0 -g (and -G for the CUDA code). Formerly SPVIT_DEBUG, which no longer changes
                         the build (the command line's traceback switch is SPVIT_TRACEBACK).
  CUDA_HOME              where nvcc lives (e.g. /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST   GPU architectures to build the CUDA code for, in torch's syntax (e.g. "8.0;9.0a;9.0+PTX",
                         "8.6", "Hopper" or "native"). When set, it replaces the default list below and torch's
                         cpp_extension turns it into the -gencode flags.
  MAX_JOBS               parallel compile jobs (torch's cpp_extension, with ninja).

Default GPU architectures (TORCH_CUDA_ARCH_LIST unset or empty): sm_80 cubin (A100), sm_90a cubin (H100/H200) and
compute_90 PTX, which the driver JIT-compiles for newer GPUs (Blackwell and later).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# (virtual arch, real arch) pairs compiled when TORCH_CUDA_ARCH_LIST is not set; code == arch means PTX.
DEFAULT_CUDA_ARCHS = (
    ("compute_80", "sm_80"),  # Ampere (A100)
    ("compute_90a", "sm_90a"),  # Hopper (H100/H200), with the sm_90a-only instructions
    ("compute_90", "compute_90"),  # PTX, JIT-compiled by the driver on later GPUs
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def cuda_arch_flags() -> list[str]:
    """nvcc -gencode flags for the default GPU architectures, or none when TORCH_CUDA_ARCH_LIST is set.

    torch's cpp_extension adds its own flags from TORCH_CUDA_ARCH_LIST only when the extension's nvcc flags name no
    architecture, so none may be passed in that case.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return []
    return [f"-gencode=arch={virtual},code={real}" for virtual, real in DEFAULT_CUDA_ARCHS]


def _extensions():
    if _env_flag("SPVIT_SKIP_EXT"):
        return [], {}
    if "SPVIT_DEBUG" in os.environ and "SPVIT_DEBUG_BUILD" not in os.environ:
        print("spvit: SPVIT_DEBUG no longer selects a debug build; set SPVIT_DEBUG_BUILD=1 for -O0 -g")
    try:
        from torch.utils import cpp_extension
    except ImportError:  # torch is needed to build the extension; without it install Python-only
        print("spvit: torch not importable at build time; skipping the C++/CUDA extension")
        return [], {}

    debug = _env_flag("SPVIT_DEBUG_BUILD")
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}
    cuda_home = cpp_extension.CUDA_HOME
    use_cuda = (
        not _env_flag("SPVIT_SKIP_CUDA")
        and cuda_home is not None
        and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
        and bool(cuda_sources)
    )
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 for older torch, C++20 for
    # torch >= 2.12) when none is given. Py_LIMITED_API is defined by BuildExtension for py_limited_api builds.
    cxx += ["-fopenmp"]
    extra = {"cxx": cxx}
    libs = ["gomp"]
    if use_cuda:
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]
        arch_flags = cuda_arch_flags()
        nvcc += arch_flags + ["-DSPVIT_WITH_CUDA"]
        extra["cxx"] = extra["cxx"] + ["-DSPVIT_WITH_CUDA"]
        extra["nvcc"] = nvcc
        ext = cpp_extension.CUDAExtension(
            "spvit_kernels._C", cpp_sources + cuda_sources, extra_compile_args=extra, libraries=libs,
            py_limited_api=True,
        )
        archs = (
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST'].strip()}" if not arch_flags
            else ", ".join(real for _, real in DEFAULT_CUDA_ARCHS)
        )
        print(f"spvit: building spvit_kernels._C with CUDA ({cuda_home}; {archs})")
    else:
        ext = cpp_extension.CppExtension(
            "spvit_kernels._C", cpp_sources, extra_compile_args=extra, libraries=libs, py_limited_api=True,
        )
        print("spvit: building spvit_kernels._C (CPU only)")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules, cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
