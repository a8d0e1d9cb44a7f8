"""Markers and face parameters shared by the per-op tests (tests/ops/test_<op>.py)."""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import pytest
import torch

from wsss_fast import _cuda_build

HAS_TRITON = importlib.util.find_spec("triton") is not None

needs_triton = pytest.mark.skipif(not HAS_TRITON,
                                  reason="triton is not installed (the Triton faces need it)")
needs_nvcc = pytest.mark.skipif(_cuda_build.find_nvcc() is None,
                                reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FaceCase(NamedTuple):
    """A face and the device of the tensors it is tested on."""

    name: str
    device: str

    def __str__(self) -> str:
        return self.name if self.device == "cpu" else f"{self.name}-{self.device}"


def face_params(*names: str) -> list:
    """``pytest.param`` s for the faces ``names`` of an op: reference, cpu and triton (the
    interpreter) on CPU tensors; triton and cuda on a GPU, marked ``gpu``."""
    params = []
    for name in names:
        if name in ("reference", "cpu", "triton"):
            params.append(pytest.param(FaceCase(name, "cpu"), id=name))
        if name in ("triton", "cuda"):
            params.append(pytest.param(FaceCase(name, "cuda"), id=f"{name}-cuda",
                                       marks=pytest.mark.gpu))
    return params


# Tolerances of a fused face against the reference, relative to the output's scale.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3}   # the Triton interpreter (no bf16)
TF32_TOL = 3e-3   # DESIGN §10


def fp32_tol(face: FaceCase) -> float:
    """fp32 tolerance of ``face``: Triton on a GPU runs fp32 dots in TF32 unless
    ``WSSS_FAST_FP32_DOTS=ieee`` (the kernels' ``dot_precision``)."""
    import os

    ieee = os.environ.get("WSSS_FAST_FP32_DOTS", "").strip().lower() == "ieee"
    return TF32_TOL if face.name == "triton" and face.device == "cuda" and not ieee else 1e-5


def assert_close_scaled(actual, expected, rtol):
    """Elementwise |a − e| ≤ rtol·(|e| + max|e|): relative to the output's scale, never on zeros."""
    assert not torch.isnan(actual).any(), "NaN in the output"
    assert actual.dtype == expected.dtype
    scale = expected.float().abs().max().item()
    assert scale > 0, "the expected output is all zeros: a useless comparison"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * scale)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| / max |ref|; fails on non-finite outputs (an element not written?)."""
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), "non-finite output (an element not written?)"
    scale = ref.abs().max().item()
    assert scale > 0, "comparing on zeros"
    return ((got - ref).abs().max().item()) / scale
