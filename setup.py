"""Builds wsss_fast._C (C++17 + OpenMP CPU ops from csrc/cpu) and, where nvcc exists, the CUDA
library libwsss_fast_cuda.so (csrc/cuda, plain CUDA C with a C ABI); installs kernels/ as the
package wsss_fast.kernels.

    pip install --no-build-isolation -e .        # torch must already be installed (pinned)

WSSS_FAST_NO_CUDA=1 skips the CUDA library; WSSS_FAST_CUDA_ARCHS overrides "80;90".
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_LIBRARY = "libwsss_fast_cuda.so"


def _cpu_extension():
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    return CppExtension(
        "wsss_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )


def find_nvcc():
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(explicit, "bin", "nvcc")] if explicit else []
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def cuda_build_command(nvcc, output, archs=("80", "90")):
    """nvcc command for the C-ABI CUDA library (no torch headers: it must compile anywhere)."""
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
            "-I", os.path.join(ROOT, "csrc"), *gencode, "-o", output,
            *sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]


class BuildWithCuda(BuildExtension):
    """The C++ extension, then (best effort) the CUDA library next to it."""

    def run(self):
        super().run()
        if os.environ.get("WSSS_FAST_NO_CUDA") == "1":
            return
        nvcc = find_nvcc()
        if nvcc is None or not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
            print("wsss_fast: nvcc not found; skipping the CUDA library", file=sys.stderr)
            return
        archs = tuple(os.environ.get("WSSS_FAST_CUDA_ARCHS", "80;90").split(";"))
        package_dir = os.path.join(ROOT, "wsss_fast") if self.inplace else os.path.join(
            self.build_lib, "wsss_fast")
        os.makedirs(package_dir, exist_ok=True)
        output = os.path.join(package_dir, CUDA_LIBRARY)
        try:
            subprocess.run(cuda_build_command(nvcc, output, archs), check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            # The CPU package stays usable; the cuda face then reports itself unavailable.
            print(f"wsss_fast: building the CUDA library failed ({exc}); continuing without it",
                  file=sys.stderr)


setup(
    name="wsss-fast",
    version="0.1.0",
    description="Kernel-accelerated Class Activation Maps for weakly supervised segmentation",
    python_requires=">=3.10",
    packages=find_packages(include=["wsss_fast", "wsss_fast.*"]) + ["wsss_fast.kernels"],
    package_dir={"wsss_fast.kernels": "kernels"},
    ext_modules=[_cpu_extension()],
    cmdclass={"build_ext": BuildWithCuda.with_options(use_ninja=True)},
    zip_safe=False,
)
