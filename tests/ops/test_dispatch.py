"""The op helper (wsss_fast/ops/_op.py) and face selection: defaults by device, fallback past a
face that declines the inputs, WSSS_FAST_BACKEND forcing, the one combined error, a loud
fallback when the C++ build is missing or stale, and torch.compile over the custom ops."""

import warnings

import pytest
import torch

from tests.ops.faces import assert_close_scaled, needs_triton
from wsss_fast import ops
from wsss_fast.ops import _abi, _backend
from wsss_fast.ops._op import Face, define_op
from wsss_fast.ops.class_patch_reweight import class_patch_reweight_op
from wsss_fast.ops.multiscale_merge import multiscale_merge_op

# ----------------------------------------------------- triton face (the interpreter on CPU tensors)


@needs_triton
def test_public_ops_dispatch_to_triton(monkeypatch):
    monkeypatch.setenv("WSSS_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.choose_face("propagate", ("reference", "triton"), torch.device("cpu")) == "triton"
    torch.manual_seed(21)
    q, k, v = (torch.randn(1, 2, 3 + 26, 16) for _ in range(3))
    cls2patch, expected_cls2patch = torch.zeros(1, 3, 26), torch.zeros(1, 3, 26)
    out = ops.attention_stats(q, k, v, 0.25, 3, cls2patch=cls2patch)
    expected = ops.attention_stats_reference(q, k, v, 0.25, 3, expected_cls2patch, 1.0)
    assert_close_scaled(out, expected, 1e-5)
    assert_close_scaled(cls2patch, expected_cls2patch, 1e-5)

    attn = torch.rand(2, 3, 20)
    patchcam = torch.randn(2, 3, 4, 5)
    assert_close_scaled(ops.class_patch_reweight(attn, 2.0, patchcam=patchcam, sqrt=True),
                        ops.class_patch_reweight_reference(attn, 2.0, patchcam.reshape(attn.shape),
                                                           True), 1e-5)

    affinity, cam = torch.rand(1, 26, 26), torch.randn(1, 26, 2)
    assert_close_scaled(ops.propagate(affinity, cam), ops.propagate_reference(affinity, cam), 1e-5)
    stacked_q, stacked_k = torch.stack([q, k]), torch.stack([k, q])
    assert_close_scaled(
        ops.propagate_streaming(stacked_q, stacked_k, cam, scale=0.25, num_cls=3, weights=[1, 0.5]),
        ops.propagate_streaming_reference(stacked_q, stacked_k, cam, 0.25, 3, [1.0, 0.5]), 1e-5)

    maps = [torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 6)]
    assert_close_scaled(
        ops.multiscale_merge(maps, (9, 11), flips=[False, True], merge="max_flip", norm="minmax"),
        ops.multiscale_merge_reference(maps, [False, True], 9, 11, False, None, "max_flip",
                                       "minmax", 1e-8), 1e-5)

# ----------------------------------------------------------------------------------------- dispatch

ALL = ("reference", "cpu", "triton", "cuda")


def test_cpu_tensors_default_to_the_cpu_face():
    assert _backend.cpu_extension_error() is None
    assert _backend.choose_face("op", ALL, torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("face", ["reference", "cpu", "triton"])
def test_forced_face_is_used(monkeypatch, face):
    monkeypatch.setenv("WSSS_FAST_BACKEND", face)
    assert _backend.choose_face("op", ALL, torch.device("cpu")) == face  # triton: interpreter


def test_forced_face_runs_that_face(monkeypatch):
    calls = []
    op = class_patch_reweight_op
    monkeypatch.setitem(op.faces, "reference", Face(
        "reference", lambda *args: calls.append("reference") or args[0].clone()))
    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    ops.class_patch_reweight(torch.rand(2, 3), 2.0)
    assert calls == ["reference"]


def test_unknown_forced_face_is_an_error(monkeypatch):
    monkeypatch.setenv("WSSS_FAST_BACKEND", "metal")
    with pytest.raises(ValueError, match="metal"):
        _backend.choose_face("op", ALL, torch.device("cpu"))


def test_forced_cuda_face_on_cpu_tensors_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WSSS_FAST_BACKEND", "cuda")
    with pytest.raises(_backend.BackendUnavailable, match="needs CUDA tensors"):
        _backend.choose_face("op", ALL, torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WSSS_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(_backend.BackendUnavailable, match="TRITON_INTERPRET"):
        _backend.choose_face("op", ALL, torch.device("cpu"))


def test_forcing_a_face_the_op_lacks_warns_and_uses_the_default(monkeypatch):
    monkeypatch.setenv("WSSS_FAST_BACKEND", "cuda")
    _backend._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="has no cuda face"):
        face = _backend.choose_face("attention_stats", ("reference", "cpu", "triton"),
                                    torch.device("cpu"))
    assert face == "cpu"


@pytest.mark.parametrize("reason", ["the C++ extension wsss_fast._C is not built (x)",
                                    "the C++ extension wsss_fast._C is stale (ABI 0, expected 1)"])
def test_missing_or_stale_build_falls_back_to_reference_with_one_warning(monkeypatch, reason):
    monkeypatch.setattr(_backend, "cpu_extension_error", lambda: reason)
    _backend._warn_once.cache_clear()
    attn = torch.rand(3, 7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ops.class_patch_reweight(attn, 2.0)
        ops.class_patch_reweight(attn, 2.0)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and reason in messages[0] and "reference" in messages[0]
    torch.testing.assert_close(out, ops.class_patch_reweight_reference(attn, 2.0))


def test_stale_abi_is_detected(monkeypatch, tmp_path):
    """A header newer than the build (the ABI bumped, the extension not rebuilt) is stale."""
    header = open(_abi.HEADER).read()
    built = _abi.value("CPU_ABI_VERSION")
    bumped = tmp_path / "abi.h"
    bumped.write_text(header.replace(f"#define WSSS_FAST_CPU_ABI_VERSION {built}",
                                     f"#define WSSS_FAST_CPU_ABI_VERSION {built + 1}"))
    monkeypatch.setattr(_abi, "HEADER", str(bumped))
    _backend.cpu_extension_error.cache_clear()
    try:
        assert "stale" in _backend.cpu_extension_error()
        assert f"expected {built + 1}" in _backend.cpu_extension_error()
    finally:
        monkeypatch.undo()
        _backend.cpu_extension_error.cache_clear()
    assert _backend.cpu_extension_error() is None


# ----------------------------------------------------------------------- torch.library registration

def test_torch_compile_traces_the_ops_without_graph_breaks():
    def cam_step(q, k, v, patchcam, p2p):
        o = ops.attention_stats(q, k, v, 0.35, 3, patch2patch=p2p)
        cams = ops.class_patch_reweight(o[:, 0, :3, :], 2.0, patchcam=patchcam)
        return o, cams

    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    patchcam = torch.randn(1, 3, 8)
    eager_p2p, compiled_p2p = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    expected = cam_step(q, k, v, patchcam, eager_p2p)
    compiled = torch.compile(cam_step, fullgraph=True, backend="eager")
    got = compiled(q, k, v, patchcam, compiled_p2p)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(compiled_p2p, eager_p2p)


# --------------------------------------------------------------------------- the op helper

def _toy_op(name, cpu_limits=None, reference_limits=None):
    """An op in a test namespace whose faces record that they ran."""
    calls = []

    def face(kind):
        return lambda x, scale: calls.append(kind) or x * scale

    faces = [Face("reference", face("reference"), **({"limits": reference_limits}
                                                      if reference_limits else {})),
             Face("cpu", face("cpu"), **({"limits": cpu_limits} if cpu_limits else {})),
             Face("cuda", face("cuda"))]

    @define_op(name, faces=faces, namespace="wsss_fast_test")
    def toy(x: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.empty_like(x)

    return toy, calls


def test_define_op_registers_a_custom_op_with_its_fake():
    toy, calls = _toy_op("scale_plain")
    x = torch.rand(3, 4)
    torch.testing.assert_close(torch.ops.wsss_fast_test.scale_plain(x, 2.0), 2 * x)
    assert calls == ["cpu"]
    torch.library.opcheck(torch.ops.wsss_fast_test.scale_plain.default, (x, 2.0),
                          test_utils=("test_schema", "test_faketensor"))
    assert toy.__name__ == "toy" and tuple(toy.faces) == ("reference", "cpu", "cuda")


def test_a_face_that_declines_the_inputs_is_skipped():
    toy, calls = _toy_op("scale_limited", cpu_limits=lambda x, scale: (
        [f"the cpu face takes at most 8 rows, got {x.shape[0]}"] if x.shape[0] > 8 else []))
    toy(torch.rand(8, 2), 1.0)
    toy(torch.rand(9, 2), 1.0)
    assert calls == ["cpu", "reference"]
    assert toy.supports("cpu", torch.rand(9, 2), 1.0) == [
        "the cpu face takes at most 8 rows, got 9"]
    assert toy.supports("cpu", torch.rand(8, 2), 1.0) == []
    assert "needs CUDA tensors" in toy.supports("cuda", torch.rand(8, 2), 1.0)[0]


def test_a_forced_face_that_declines_is_one_error_listing_every_face(monkeypatch):
    toy, calls = _toy_op("scale_forced", cpu_limits=lambda x, scale: ["too many rows"])
    monkeypatch.setenv("WSSS_FAST_BACKEND", "cpu")
    with pytest.raises(_backend.BackendUnavailable) as error:
        toy(torch.rand(9, 2), 1.0)
    message = str(error.value)
    assert message.startswith("WSSS_FAST_BACKEND=cpu cannot run scale_forced: too many rows")
    assert "reference: can run" in message and "cuda: the cuda face needs CUDA tensors" in message
    assert "\n" not in message and calls == []


def test_no_face_left_is_one_error_listing_every_face():
    toy, calls = _toy_op("scale_nothing", cpu_limits=lambda x, scale: ["cpu says no"],
                         reference_limits=lambda x, scale: ["reference says no"])
    with pytest.raises(_backend.BackendUnavailable) as error:
        toy(torch.rand(2, 2), 1.0)
    message = str(error.value)
    assert message.startswith("no face of scale_nothing can run these inputs")
    for reason in ("cpu: cpu says no", "reference: reference says no",
                   "cuda: the cuda face needs CUDA tensors"):
        assert reason in message
    assert calls == []


def test_the_cuda_pass_limit_is_a_reason_not_an_error(monkeypatch):
    """More passes than the CUDA library takes: the cuda face declines (the op falls back)."""
    from wsss_fast.ops import _cuda_lib

    monkeypatch.setattr(_cuda_lib, "max_passes", lambda: 2)
    face = multiscale_merge_op.faces["cuda"]
    maps = [torch.rand(1, 1, 2, 2)] * 3
    assert face.limits(maps, [False] * 3, 4, 4, False, None, "sum", "none", 0.0) == [
        "the cuda face merges at most 2 passes, got 3"]
    assert face.limits(maps[:2], [False] * 2, 4, 4, False, None, "sum", "none", 0.0) == []


def test_faces_need_known_kinds_and_a_reference():
    with pytest.raises(ValueError, match="unknown face kind"):
        Face("metal", lambda x: x)
    with pytest.raises(ValueError, match="including 'reference'"):
        define_op("no_reference", faces=[Face("cpu", lambda x: x)],
                  namespace="wsss_fast_test")(lambda x: x)


# --------------------------------------------------------------------- one source, no cycles

def test_abi_constants_come_from_the_header_the_builds_report():
    assert torch.ops.wsss_fast_C.abi_version() == _abi.value("CPU_ABI_VERSION")
    assert _abi.codes("NORM", ("none", "minmax", "max", "transcam")) == {
        "none": 0, "minmax": 1, "max": 2, "transcam": 3}
    assert _abi.value("CUDA_MAX_PASSES") > 0
    with pytest.raises(KeyError, match="abi.h"):
        _abi.value("NO_SUCH_NUMBER")


def _imported_modules(path):
    import ast

    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_kernels_never_import_the_ops_and_the_cuda_wrapper_not_the_backend():
    import glob
    import os

    import wsss_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(wsss_fast.__file__)))
    for path in glob.glob(os.path.join(root, "kernels", "*.py")):
        assert not any(m.startswith("wsss_fast.ops") for m in _imported_modules(path)), path
    cuda_lib = _imported_modules(os.path.join(root, "wsss_fast", "ops", "_cuda_lib.py"))
    assert not any("_backend" in m or "_op" in m.split(".")[-1] for m in cuda_lib), cuda_lib
    abi = _imported_modules(os.path.join(root, "wsss_fast", "ops", "_abi.py"))
    assert not any(m.startswith("wsss_fast") for m in abi), abi
