"""The C-ABI CUDA library (csrc/cuda) and its ctypes wrapper (wsss_fast/ops/_cuda_lib.py).

Without a GPU: the library builds with nvcc, exports its C symbols, reports the ABI of
csrc/common/abi.h, loads through ctypes (cudart is static) and rejects bad arguments before
touching the GPU; ``load_error()`` explains itself. With a GPU (``-m gpu``): streams and devices.
Each op's own CUDA tests live in tests/ops/test_<op>.py; the fixtures in tests/conftest.py.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from tests.ops.faces import rel_err
from wsss_fast import _cuda_build
from wsss_fast.ops import _abi, _backend, _cuda_lib
from wsss_fast.ops.class_patch_reweight import class_patch_reweight_reference

SYMBOLS = ("wsss_fast_cuda_abi_version", "wsss_fast_cuda_max_passes",
           "wsss_fast_cuda_last_error", "wsss_fast_cuda_probe",
           "wsss_fast_class_patch_reweight", "wsss_fast_propagate",
           "wsss_fast_multiscale_merge", "wsss_fast_random_walk",
           "wsss_fast_random_walk_workspace_bytes")


needs_nvcc = pytest.mark.skipif(_cuda_build.find_nvcc() is None,
                                reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _last_error(lib) -> str:
    return (lib.wsss_fast_cuda_last_error() or b"").decode()


@needs_nvcc
def test_build_exports_every_symbol(built_library):
    assert os.path.getsize(built_library) > 0
    listing = subprocess.run(["nm", "-D", "--defined-only", built_library], check=True,
                             capture_output=True, text=True).stdout
    defined = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    missing = [name for name in SYMBOLS if name not in defined]
    assert not missing, f"not exported: {missing}"


@needs_nvcc
def test_library_loads_and_reports_abi(loaded):
    assert loaded.wsss_fast_cuda_abi_version() == _abi.value("CUDA_ABI_VERSION")
    # ctypes signatures were declared for every symbol
    for name, (restype, argtypes) in _cuda_lib.SIGNATURES.items():
        assert getattr(loaded, name).argtypes == argtypes
        assert getattr(loaded, name).restype == restype


@needs_nvcc
def test_bad_dtype_is_rejected_before_any_cuda_call(loaded):
    fake = ctypes.c_void_p(0x1000)  # never dereferenced: validation comes first
    for dtype in (3, -1, 7):
        status = loaded.wsss_fast_class_patch_reweight(fake, None, fake, 4, 5, dtype, 1.0, 0, None)
        assert status < 0, status  # negative = argument error (a CUDA call would give cudaError_t)
        message = _last_error(loaded)
        assert "dtype" in message and str(dtype) in message, message
    status = loaded.wsss_fast_propagate(fake, fake, fake, 1, 4, 3, 5, None)
    assert status < 0 and "dtype" in _last_error(loaded)


@needs_nvcc
def test_bad_arguments_are_rejected_before_any_cuda_call(loaded):
    fake = ctypes.c_void_p(0x1000)
    status = loaded.wsss_fast_class_patch_reweight(fake, None, fake, 4, 5, 0, -1.0, 0, None)
    assert status < 0 and "gamma" in _last_error(loaded)
    status = loaded.wsss_fast_class_patch_reweight(fake, None, fake, -4, 5, 0, 1.0, 0, None)
    assert status < 0 and "negative" in _last_error(loaded)
    status = loaded.wsss_fast_propagate(None, fake, fake, 1, 4, 3, 0, None)
    assert status < 0 and "NULL" in _last_error(loaded)
    # empty problems succeed without a device and clear the message
    assert loaded.wsss_fast_class_patch_reweight(None, None, None, 0, 5, 0, 1.0, 0, None) == 0
    assert _last_error(loaded) == ""
    assert loaded.wsss_fast_propagate(None, None, None, 2, 0, 3, 1, None) == 0


@needs_nvcc
def test_probe_reports_a_missing_device(loaded):
    status = loaded.wsss_fast_cuda_probe()
    if status != 0:
        assert status > 0 and "wsss_fast_cuda_probe" in _last_error(loaded)
    if not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/nvidiactl"):
        assert status != 0, "probe found a CUDA device on a machine without one"


def test_load_error_explains_missing_cuda():
    _cuda_lib.reset()
    try:
        reason = _cuda_lib.load_error()
    finally:
        _cuda_lib.reset()
    if torch.cuda.is_available():
        assert reason is None or isinstance(reason, str)
    else:
        assert isinstance(reason, str) and "CUDA is not available" in reason, reason
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            _cuda_lib.library()
        # the cuda face is reported unavailable, never chosen, and forcing it falls back
        assert _backend.cuda_library_error() == reason


def test_library_path_override(monkeypatch, tmp_path):
    target = tmp_path / "elsewhere.so"
    monkeypatch.setenv(_cuda_lib.ENV_VAR, str(target))
    assert _cuda_lib.library_path() == str(target)
    monkeypatch.delenv(_cuda_lib.ENV_VAR)
    import wsss_fast

    assert _cuda_lib.library_path() == os.path.join(
        os.path.dirname(os.path.abspath(wsss_fast.__file__)), _cuda_lib.LIBRARY_NAME)


def test_library_is_not_loaded_at_import():
    code = ("import sys, wsss_fast, wsss_fast.ops; "
            "assert 'wsss_fast.ops._cuda_lib' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@needs_gpu
def test_ops_run_on_the_current_stream_and_a_second_device(gpu_lib):
    stream = torch.cuda.Stream()
    attn = torch.rand(4, 300, device="cuda")
    with torch.cuda.stream(stream):
        got = gpu_lib.class_patch_reweight(attn, 2.0, None, False)
    stream.synchronize()
    assert rel_err(got, class_patch_reweight_reference(attn, 2.0)) <= 1e-5
    if torch.cuda.device_count() > 1:
        x = torch.rand(2, 40, 40, device="cuda:1")
        c = torch.randn(2, 40, 7, device="cuda:1")
        got = gpu_lib.propagate(x, c)
        assert got.device == x.device
        assert rel_err(got, torch.bmm(x.double(), c.double())) <= 1e-5
