"""The C-ABI CUDA library (csrc/cuda) and its ctypes wrapper (wsss_fast/ops/_cuda_lib.py).

Without a GPU: the library builds with nvcc, exports its C symbols, loads through ctypes (cudart is
static) and rejects bad arguments before touching the GPU; ``load_error()`` explains itself.
With a GPU (``-m gpu``): every op against its reference face.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from wsss_fast import _cuda_build
from wsss_fast.ops import _backend, _cuda_lib
from wsss_fast.ops.class_patch_reweight import class_patch_reweight_reference
from wsss_fast.ops.multiscale_merge import DEFAULT_EPS, multiscale_merge_reference
from wsss_fast.ops.propagate import propagate_reference

SYMBOLS = ("wsss_fast_cuda_abi_version", "wsss_fast_cuda_last_error", "wsss_fast_cuda_probe",
           "wsss_fast_class_patch_reweight", "wsss_fast_propagate",
           "wsss_fast_multiscale_merge", "wsss_fast_random_walk",
           "wsss_fast_random_walk_workspace_bytes")

needs_nvcc = pytest.mark.skipif(_cuda_build.find_nvcc() is None,
                                reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _build(path: str, archs) -> str:
    try:
        _cuda_build.build_library(path, archs=archs)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building the CUDA library failed: {exc}")
    return path


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    """The library built once for sm_80 (a link/ABI check: nothing runs on a GPU)."""
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return _build(str(tmp_path_factory.mktemp("cuda_lib") / _cuda_build.LIBRARY_NAME), ("80",))


@pytest.fixture(scope="module")
def loaded(built_library):
    return _cuda_lib.load_library(built_library)


def _last_error(lib) -> str:
    return (lib.wsss_fast_cuda_last_error() or b"").decode()


# ---------------------------------------------------------------------------------------------
# No GPU needed


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
    assert loaded.wsss_fast_cuda_abi_version() == _backend.CUDA_ABI_VERSION
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


def _merge_args(n, **overrides):
    ptrs = (ctypes.c_void_p * n)(*[0x1000 + 64 * i for i in range(n)])
    heights = (ctypes.c_int64 * n)(*[3 + i for i in range(n)])
    widths = (ctypes.c_int64 * n)(*[4 + i for i in range(n)])
    flips = (ctypes.c_int * n)(*[i % 2 for i in range(n)])
    args = dict(maps=ptrs, heights=heights, widths=widths, flips=flips, num_passes=n, batch=2,
                classes=3, labels=None, out=ctypes.c_void_p(0x2000), out_h=7, out_w=9, relu=0,
                merge=0, norm=1, eps=1e-8, stream=None)
    args.update(overrides)
    return list(args.values())


@needs_nvcc
def test_too_many_passes_is_rejected_before_any_cuda_call(loaded):
    n = _cuda_lib.MAX_PASSES + 1
    status = loaded.wsss_fast_multiscale_merge(*_merge_args(n))
    assert status < 0, status
    message = _last_error(loaded)
    assert "too many passes" in message and str(n) in message, message


@needs_nvcc
def test_merge_argument_errors(loaded):
    cases = {
        "num_passes": _merge_args(2, num_passes=0),
        "max_flip": _merge_args(3, merge=1),
        "merge must be": _merge_args(2, merge=2),
        "norm must be": _merge_args(2, norm=4),
        "negative": _merge_args(2, out_h=-1),
        "empty map": _merge_args(2, heights=(ctypes.c_int64 * 2)(0, 3)),
        "out must not be NULL": _merge_args(2, out=None),
    }
    for expected, args in cases.items():
        status = loaded.wsss_fast_multiscale_merge(*args)
        assert status < 0, (expected, status)
        assert expected in _last_error(loaded), (expected, _last_error(loaded))


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


# ---------------------------------------------------------------------------------------------
# GPU runtime


@pytest.fixture(scope="module")
def gpu_lib(tmp_path_factory):
    """The cuda face on this GPU: built fresh from csrc/cuda for the device's arch when nvcc is
    available (loaded through WSSS_FAST_CUDA_LIB), else the installed library."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.MonkeyPatch.context() as mp:
        if _cuda_build.find_nvcc() is not None:
            major, minor = torch.cuda.get_device_capability()
            path = str(tmp_path_factory.mktemp("cuda_gpu") / _cuda_build.LIBRARY_NAME)
            mp.setenv(_cuda_lib.ENV_VAR, _build(path, (f"{major}{minor}",)))
        _cuda_lib.reset()
        reason = _cuda_lib.load_error()
        if reason is not None:
            pytest.skip(f"cuda library unavailable: {reason}")
        yield _cuda_lib
    _cuda_lib.reset()


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite output (an element not written?)"
    scale = ref.abs().max().item()
    assert scale > 0, "comparing on zeros"
    return ((got - ref).abs().max().item()) / scale


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(7, 733), (3, 1), (5, 4097), (64, 196), (1, 31)])
@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5, 3.7])
def test_class_patch_reweight_matches_reference(gpu_lib, dtype, rows, cols, gamma):
    gen = torch.Generator(device="cuda").manual_seed(rows * 1000 + cols)
    attn = torch.rand(rows, cols, device="cuda", generator=gen) - 0.1  # some negative entries
    attn[0, : max(1, cols // 3)] = 0.0
    if rows > 2:
        attn[2] = -1.0  # a zero row after ReLU maps to 0
    patchcam = torch.randn(rows, cols, device="cuda", generator=gen)
    attn, patchcam = attn.to(dtype), patchcam.to(dtype)
    for pc, sq in ((None, False), (patchcam, False), (patchcam, True), (None, True)):
        out = torch.full_like(attn, float("nan"))  # poisoned: every element must be written
        got = gpu_lib.class_patch_reweight(attn, gamma, pc, sq, out=out)
        assert got.data_ptr() == out.data_ptr()
        ref = class_patch_reweight_reference(attn, gamma, pc, sq)
        assert _rel_err(got, ref) <= TOL[dtype], (pc is not None, sq)
        if rows > 2:
            assert (got[2] == 0).all()
    fresh = gpu_lib.class_patch_reweight(attn, gamma, None, False)
    assert fresh.shape == attn.shape and fresh.dtype == dtype


@pytest.mark.gpu
@needs_gpu
def test_class_patch_reweight_public_op_on_cuda_face(gpu_lib, monkeypatch):
    from wsss_fast.ops import class_patch_reweight

    monkeypatch.setenv("WSSS_FAST_BACKEND", "cuda")
    attn = torch.rand(2, 3, 50, device="cuda")
    patchcam = torch.randn(2, 3, 5, 10, device="cuda")
    got = class_patch_reweight(attn, 2.0, patchcam=patchcam, sqrt=True)
    ref = class_patch_reweight_reference(attn, 2.0, patchcam.reshape(attn.shape), True)
    assert _rel_err(got, ref) <= 1e-5


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,p,k", [(2, 733, 21), (1, 1, 1), (3, 64, 32), (2, 97, 81),
                                   (1, 1850, 5)])
def test_propagate_matches_reference(gpu_lib, dtype, b, p, k):
    gen = torch.Generator(device="cuda").manual_seed(b * 100000 + p * 100 + k)
    affinity = (torch.rand(b, p, p, device="cuda", generator=gen) / p).to(dtype)
    cam = torch.randn(b, p, k, device="cuda", generator=gen).to(dtype)
    out = torch.full((b, p, k), float("nan"), dtype=dtype, device="cuda")
    got = gpu_lib.propagate(affinity, cam, out=out)
    exact = torch.bmm(affinity.double(), cam.double())
    assert _rel_err(got, exact) <= TOL[dtype]
    if dtype == torch.float32:
        assert _rel_err(got, propagate_reference(affinity, cam)) <= 1e-5
    assert gpu_lib.propagate(affinity, cam).dtype == dtype


def _passes(b, k, sizes, gen):
    return [torch.randn(b, k, h, w, device="cuda", generator=gen) for h, w in sizes]


MERGE_CASES = [
    # sizes, flips, merge
    ([(13, 17), (7, 9), (26, 34), (5, 5)], [False, True, False, True], "sum"),
    ([(13, 17), (13, 17), (26, 35), (26, 35)], [False, True, False, True], "max_flip"),
    ([(50, 61)], [False], "sum"),            # down-sampling
    ([(1, 1), (3, 2)], [True, False], "sum"),  # degenerate maps
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", range(len(MERGE_CASES)))
@pytest.mark.parametrize("norm", ["none", "minmax", "max", "transcam"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_labels", [False, True])
def test_multiscale_merge_matches_reference(gpu_lib, case, norm, relu, with_labels):
    sizes, flips, merge = MERGE_CASES[case]
    b, k, out_h, out_w = 2, 3, 37, 53
    gen = torch.Generator(device="cuda").manual_seed(case * 31 + len(norm))
    maps = _passes(b, k, sizes, gen)
    labels = None
    if with_labels:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]], device="cuda")
    eps = DEFAULT_EPS[norm]
    out = torch.full((b, k, out_h, out_w), float("nan"), device="cuda")
    got = gpu_lib.multiscale_merge(maps, flips, out_h, out_w, relu, labels, merge, norm, eps,
                                   out=out)
    ref = multiscale_merge_reference(maps, flips, out_h, out_w, relu, labels, merge, norm, eps)
    assert got.shape == ref.shape and got.dtype == torch.float32
    if with_labels and norm == "max":
        # zeroed planes: 0 / (0 + eps) on both sides
        assert (got[0, 1] == 0).all() and (got[1, 0] == 0).all()
    assert _rel_err(got, ref) <= 1e-5


@pytest.mark.gpu
@needs_gpu
def test_multiscale_merge_many_passes_and_large_batch(gpu_lib):
    gen = torch.Generator(device="cuda").manual_seed(7)
    sizes = [(9 + i, 11 + 2 * i) for i in range(_cuda_lib.MAX_PASSES)]
    maps = _passes(3, 21, sizes, gen)
    flips = [bool(i % 2) for i in range(len(maps))]
    got = gpu_lib.multiscale_merge(maps, flips, 97, 131, True, None, "max_flip", "minmax", 1e-8)
    ref = multiscale_merge_reference(maps, flips, 97, 131, True, None, "max_flip", "minmax", 1e-8)
    assert _rel_err(got, ref) <= 1e-5
    with pytest.raises(ValueError, match="at most"):
        gpu_lib.multiscale_merge(maps + maps[:1], flips + [False], 9, 9, False, None, "sum",
                                 "none", 0.0)


@pytest.mark.gpu
@needs_gpu
def test_ops_run_on_the_current_stream_and_a_second_device(gpu_lib):
    stream = torch.cuda.Stream()
    attn = torch.rand(4, 300, device="cuda")
    with torch.cuda.stream(stream):
        got = gpu_lib.class_patch_reweight(attn, 2.0, None, False)
    stream.synchronize()
    assert _rel_err(got, class_patch_reweight_reference(attn, 2.0)) <= 1e-5
    if torch.cuda.device_count() > 1:
        x = torch.rand(2, 40, 40, device="cuda:1")
        c = torch.randn(2, 40, 7, device="cuda:1")
        got = gpu_lib.propagate(x, c)
        assert got.device == x.device
        assert _rel_err(got, torch.bmm(x.double(), c.double())) <= 1e-5
