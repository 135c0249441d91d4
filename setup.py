"""Builds sap_kernels._C: C++ CPU kernels always, CUDA kernels when possible.

SAP_KERNELS_CUDA=auto (default) adds csrc/cuda when both a CUDA toolkit and a
CUDA-enabled torch are present; =1 requires them; =0 never builds them.
The CPU kernels pick AVX-512 / AVX2 / baseline code at run time (GCC
target_clones), so the default build runs on any x86-64 CPU.
If the extension fails to compile, the package still installs: it then warns
on import and offers only the pure-PyTorch reference backend.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def cuda_wanted() -> bool:
    choice = os.environ.get("SAP_KERNELS_CUDA", "auto").lower()
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if choice in ("0", "off", "false", "no"):
        return False
    if choice in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError("SAP_KERNELS_CUDA=1 but no CUDA toolkit or no CUDA-enabled torch")
        return True
    return available


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -Wno-psabi: the CPU kernels pass 64-byte GCC vectors between always-inlined
    # functions inside one file; GCC still warns that the AVX-512 ABI differs.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    kwargs = dict(
        name="sap_kernels._C",
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.abspath("csrc")],
        optional=os.environ.get("SAP_KERNELS_REQUIRE_EXTENSION", "0") != "1",
    )
    if not cuda_wanted():
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    archs = os.environ.get("SAP_KERNELS_CUDA_ARCHS", "80;90").split(";")
    for arch in archs:
        nvcc.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    # PTX of the newest target too, so that newer GPUs can JIT-compile it
    nvcc.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return CUDAExtension(
        sources=sources,
        extra_compile_args={"cxx": [*cxx, "-DSAP_KERNELS_WITH_CUDA"], "nvcc": nvcc},
        **kwargs,
    )


setup(
    ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)}
)
