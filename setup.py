"""Builds wsss_fast._C (C++17 + OpenMP CPU ops from csrc/cpu) and, where nvcc exists, the CUDA
library libwsss_fast_cuda.so (csrc/cuda, plain CUDA C with a C ABI); installs kernels/ as the
package wsss_fast.kernels.

    pip install --no-build-isolation -e .        # torch must already be installed (pinned)

WSSS_FAST_NO_CUDA=1 skips the CUDA library; WSSS_FAST_CUDA_ARCHS overrides "80;90".
"""

import glob
import importlib.util
import os
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_extension():
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    return CppExtension(
        "wsss_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )


def _load_cuda_build():
    """wsss_fast/_cuda_build.py, loaded by path: importing the package mid-build is avoided."""
    spec = importlib.util.spec_from_file_location(
        "_wsss_fast_cuda_build", os.path.join(ROOT, "wsss_fast", "_cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithCuda(BuildExtension):
    """The C++ extension, then (best effort) the CUDA library next to it."""

    def run(self):
        super().run()
        if os.environ.get("WSSS_FAST_NO_CUDA") == "1":
            return
        cuda_build = _load_cuda_build()
        if cuda_build.find_nvcc() is None or not cuda_build.cuda_sources(ROOT):
            print("wsss_fast: nvcc not found; skipping the CUDA library", file=sys.stderr)
            return
        archs = tuple(os.environ.get("WSSS_FAST_CUDA_ARCHS", "80;90").split(";"))
        package_dir = os.path.join(ROOT, "wsss_fast") if self.inplace else os.path.join(
            self.build_lib, "wsss_fast")
        os.makedirs(package_dir, exist_ok=True)
        output = os.path.join(package_dir, cuda_build.LIBRARY_NAME)
        try:
            cuda_build.build_library(output, archs, ROOT)
        except (subprocess.CalledProcessError, OSError) as exc:  # FileNotFoundError is an OSError
            # The CPU package stays usable; the cuda face then reports itself unavailable.
            print(f"wsss_fast: building the CUDA library failed ({exc}); continuing without it",
                  file=sys.stderr)


class BuildPyWithAbiHeader(build_py):
    """Also ships csrc/common/abi.h as wsss_fast/ops/abi.h: wsss_fast.ops._abi reads the ABI
    numbers from it when the source tree is not beside the package (a wheel install)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "wsss_fast", "ops", "abi.h")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self.copy_file(os.path.join(ROOT, "csrc", "common", "abi.h"), target)


setup(
    name="wsss-fast",
    version="0.1.0",
    description="Kernel-accelerated Class Activation Maps for weakly supervised segmentation",
    python_requires=">=3.10",
    packages=find_packages(include=["wsss_fast", "wsss_fast.*"]) + ["wsss_fast.kernels"],
    package_dir={"wsss_fast.kernels": "kernels"},
    ext_modules=[_cpu_extension()],
    cmdclass={"build_ext": BuildWithCuda.with_options(use_ninja=True),
              "build_py": BuildPyWithAbiHeader},
    entry_points={"console_scripts": ["wsss-fast = wsss_fast.cli:main"]},
    zip_safe=False,
)
