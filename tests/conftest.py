"""Test setup: the Triton interpreter must be chosen before triton is first imported, and no test
may reach a model hub."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from wsss_fast import _cuda_build  # noqa: E402


@pytest.fixture
def gen(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests pick faces explicitly; an exported WSSS_FAST_BACKEND must not leak in."""
    monkeypatch.delenv("WSSS_FAST_BACKEND", raising=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _build_cuda_library(path: str, archs) -> str:
    try:
        _cuda_build.build_library(path, archs=archs)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building the CUDA library failed: {exc}")
    return path


@pytest.fixture(scope="session")
def built_library(tmp_path_factory):
    """The CUDA library built once for sm_80 from csrc/cuda (a link/ABI check: nothing runs on a
    GPU)."""
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    path = str(tmp_path_factory.mktemp("cuda_lib") / _cuda_build.LIBRARY_NAME)
    return _build_cuda_library(path, ("80",))


@pytest.fixture(scope="session")
def loaded(built_library):
    """``built_library`` loaded through ctypes with every signature declared (no GPU needed)."""
    from wsss_fast.ops import _cuda_lib

    return _cuda_lib.load_library(built_library)


@pytest.fixture(scope="session")
def cuda_library(built_library, loaded):
    return built_library, loaded


@pytest.fixture(scope="session")
def gpu_lib(tmp_path_factory):
    """The cuda face on this GPU: built fresh from csrc/cuda for the device's arch when nvcc is
    available (loaded through WSSS_FAST_CUDA_LIB), else the installed library."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from wsss_fast.ops import _cuda_lib

    with pytest.MonkeyPatch.context() as mp:
        if _cuda_build.find_nvcc() is not None:
            major, minor = torch.cuda.get_device_capability()
            path = str(tmp_path_factory.mktemp("cuda_gpu") / _cuda_build.LIBRARY_NAME)
            mp.setenv(_cuda_lib.ENV_VAR, _build_cuda_library(path, (f"{major}{minor}",)))
        _cuda_lib.reset()
        reason = _cuda_lib.load_error()
        if reason is not None:
            pytest.skip(f"cuda library unavailable: {reason}")
        yield _cuda_lib
    _cuda_lib.reset()
