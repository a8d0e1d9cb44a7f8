"""Face selection: defaults by device, WSSS_FAST_BACKEND forcing, and a loud fallback (never a
crash) when the C++ build is missing or stale."""

import warnings

import pytest
import torch

from wsss_fast import ops
from wsss_fast.ops import _backend

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
    monkeypatch.setitem(ops.class_patch_reweight.__globals__["_RUNNERS"], "reference",
                        lambda *args: calls.append("reference") or args[0].clone())
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


def test_stale_abi_is_detected(monkeypatch):
    monkeypatch.setattr(_backend, "CPU_ABI_VERSION", _backend.CPU_ABI_VERSION + 1)
    _backend.cpu_extension_error.cache_clear()
    try:
        assert "stale" in _backend.cpu_extension_error()
    finally:
        monkeypatch.undo()
        _backend.cpu_extension_error.cache_clear()
    assert _backend.cpu_extension_error() is None


def test_autograd_inputs_take_the_differentiable_reference():
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    p2p = torch.zeros(1, 7, 7)
    out = ops.attention_stats(q, q.detach(), q.detach(), 0.5, 2, patch2patch=p2p)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
