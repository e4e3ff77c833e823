"""Build script for the optional C++/CUDA extension ``spvit_kernels._C``.

Environment switches:
  SPVIT_SKIP_EXT=1    do not build the extension at all (pure Python install; Triton/eager paths only)
  SPVIT_SKIP_CUDA=1   build only the C++ (CPU) kernels even when nvcc is available
  SPVIT_DEBUG=1       build with -O0 -g
  CUDA_HOME           where nvcc lives (e.g. /usr/local/cuda)
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("SPVIT_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:  # torch is needed to build the extension; without it install Python-only
        print("spvit: torch not importable at build time; skipping the C++/CUDA extension")
        return [], {}

    debug = os.environ.get("SPVIT_DEBUG", "0") == "1"
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}
    cuda_home = cpp_extension.CUDA_HOME
    use_cuda = (
        os.environ.get("SPVIT_SKIP_CUDA", "0") != "1"
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
        nvcc += [
            "-gencode=arch=compute_90a,code=sm_90a",  # Hopper (H100/H200)
            "-gencode=arch=compute_90,code=compute_90",  # PTX for later GPUs
            "-DSPVIT_WITH_CUDA",
        ]
        extra["cxx"] = extra["cxx"] + ["-DSPVIT_WITH_CUDA"]
        extra["nvcc"] = nvcc
        ext = cpp_extension.CUDAExtension(
            "spvit_kernels._C", cpp_sources + cuda_sources, extra_compile_args=extra, libraries=libs,
            py_limited_api=True,
        )
        print(f"spvit: building spvit_kernels._C with CUDA ({cuda_home})")
    else:
        ext = cpp_extension.CppExtension(
            "spvit_kernels._C", cpp_sources, extra_compile_args=extra, libraries=libs, py_limited_api=True,
        )
        print("spvit: building spvit_kernels._C (CPU only)")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
