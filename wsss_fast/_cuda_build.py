"""Building the C-ABI CUDA library (csrc/cuda) with nvcc. Used by setup.py (loaded by path, so
no package import happens during the build) and by the link test. No torch import here."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

LIBRARY_NAME = "libwsss_fast_cuda.so"
DEFAULT_ARCHS = ("80", "90")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc() -> str | None:
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(explicit, "bin", "nvcc")] if explicit else []
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def cuda_sources(root: str = REPO_ROOT) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))


def build_command(nvcc: str, output: str, archs=DEFAULT_ARCHS, root: str = REPO_ROOT) -> list[str]:
    """Plain CUDA C, no torch headers; cudart linked statically so the library loads (and its
    symbols can be checked) on machines without a GPU driver."""
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the newest arch as well, so later GPUs can JIT-compile the kernels.
    newest = max(archs, key=int)
    gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
            "-I", os.path.join(root, "csrc"), *gencode, "-o", output, *cuda_sources(root)]


def build_library(output: str, archs=DEFAULT_ARCHS, root: str = REPO_ROOT) -> None:
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not cuda_sources(root):
        raise FileNotFoundError(f"no CUDA sources under {root}/csrc/cuda")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    subprocess.run(build_command(nvcc, output, archs, root), check=True)
