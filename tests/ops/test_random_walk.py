"""``random_walk`` on every face: the half-disk offsets, the dense reference by hand, each fused
face against the float64 reference, invariants (identity, constants, conserved mass), the CUDA
library's entry points, validation, torch.library and the autograd size limit. The IRN/PSA
refinement built on it is tested in tests/test_random_walk.py."""

import ctypes
import os
import subprocess

import pytest
import torch

from tests.helpers import assert_rel_close, poison_heap
from tests.ops.faces import HAS_TRITON, needs_nvcc
from wsss_fast.ops import _abi, _backend, random_walk, random_walk_reference
from wsss_fast.ops.random_walk import (GRAD_MAX_PIXELS, dense_affinity, half_disk_offsets,
                                       random_walk_op)
from wsss_fast.postprocess import upstream_random_walk as upstream  # IRN/PSA's own offsets

# --------------------------------------------------------- from tests/test_random_walk.py

O5 = 34  # offsets of radius 5


RTOL = 1e-5  # fp32 faces vs the float64 dense reference (observed ≤ 5e-7 here, 256 steps too)


def _weights(gen, *shape, zero_fraction=0.2):
    """Pair weights with some absent pairs (0); off-grid entries are random too (ignored)."""
    w = torch.rand(*shape, generator=gen) ** 4
    return w * (torch.rand(*shape, generator=gen) > zero_fraction)


def _walk(face, monkeypatch, x0, weights, steps, radius=5):
    """The public op on one face (forced through WSSS_FAST_BACKEND)."""
    if face == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if face == "cpu":
        assert _backend.cpu_extension_error() is None, _backend.cpu_extension_error()
    monkeypatch.setenv("WSSS_FAST_BACKEND", face)
    return random_walk(x0, weights, steps, radius=radius)


def test_half_disk_offsets_are_irn_and_psa_pairs():
    offsets = half_disk_offsets(5)
    assert len(offsets) == O5 and len(set(offsets)) == O5
    assert offsets[:4] == ((0, 1), (0, 2), (0, 3), (0, 4))
    assert offsets[4:9] == ((1, -4), (1, -3), (1, -2), (1, -1), (1, 0))
    brute = {(dy, dx) for dy in range(0, 5) for dx in range(-4, 5)
             if dx * dx + dy * dy < 25 and (dy > 0 or dx > 0)}
    assert set(offsets) == brute
    assert list(offsets) == upstream.search_directions(5)
    assert half_disk_offsets(2) == ((0, 1), (1, -1), (1, 0), (1, 1))
    with pytest.raises(ValueError, match="radius"):
        half_disk_offsets(1)


def test_reference_matches_hand_computed_walks(gen):
    # 1×3 grid: pairs (0,1) a, (1,2) b [offset (0, 1)] and (0,2) c [offset (0, 2)].
    a, b, c = 0.5, 0.25, 0.125
    weights = torch.zeros(O5, 1, 3, dtype=torch.float64)
    weights[0, 0, 0], weights[0, 0, 1], weights[1, 0, 0] = a, b, c
    weights[0, 0, 2] = weights[1, 0, 1] = 7.0  # partners off the grid: ignored
    x0 = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    # A = [[1,a,c],[a,1,b],[c,b,1]]; T = A / column sums; x0 @ T = row 0 of T.
    d = [1 + a + c, 1 + a + b, 1 + b + c]
    expected = torch.tensor([[[1 / d[0], a / d[1], c / d[2]]]], dtype=torch.float64)
    torch.testing.assert_close(random_walk_reference(x0, weights, 1), expected, rtol=1e-14, atol=0)
    # 1×2 grid, one pair of weight a: T = [[1, a], [a, 1]] / (1 + a).
    weights = torch.zeros(O5, 1, 2, dtype=torch.float64)
    weights[0, 0, 0] = a
    x0 = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    two_steps = torch.tensor([[[1 + a * a, 2 * a]]], dtype=torch.float64) / (1 + a) ** 2
    torch.testing.assert_close(random_walk_reference(x0, weights, 2), two_steps, rtol=1e-14,
                               atol=0)
    # 3 steps (repeated products) equal 1 step then 2 steps (squaring)
    x0 = torch.rand(2, 4, 5, generator=gen, dtype=torch.float64)
    weights = torch.rand(O5, 4, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(random_walk_reference(x0, weights, 3),
                               random_walk_reference(random_walk_reference(x0, weights, 1),
                                                     weights, 2), rtol=1e-12, atol=0)


def test_dense_affinity_is_symmetric_with_unit_diagonal():
    gen = torch.Generator().manual_seed(3)
    weights = _weights(gen, O5, 6, 7).double()
    affinity = dense_affinity(weights)
    torch.testing.assert_close(affinity, affinity.t(), rtol=0, atol=0)
    assert torch.equal(affinity.diagonal(), torch.ones(42, dtype=torch.float64))
    # pair ((2, 3), (2 + 3, 3 − 1)) is offset (3, -1)
    o = half_disk_offsets(5).index((3, -1))
    assert affinity[2 * 7 + 3, 5 * 7 + 2] == weights[o, 2, 3]


FACE_CASES = [
    # B (None: unbatched), K, h, w, steps
    (None, 2, 7, 9, 1),
    (None, 3, 7, 9, 3),
    (None, 1, 13, 17, 256),
    (None, 2, 1, 12, 3),     # one row
    (None, 2, 12, 1, 3),     # one column
    (None, 3, 1, 1, 3),      # one pixel
    (None, 4, 3, 4, 5),      # smaller than the radius; steps not a power of two
    (2, 3, 6, 11, 256),
    (None, 5, 20, 23, 64),
]


TRITON_CASES = [(None, 2, 7, 9, 3), (None, 1, 1, 6, 3), (None, 2, 5, 1, 2), (2, 1, 3, 4, 1),
                (None, 1, 5, 7, 256)]


def _inputs(gen, batch, k, h, w, signed=False):
    lead = () if batch is None else (batch,)
    x0 = torch.randn(*lead, k, h, w, generator=gen) if signed else \
        torch.rand(*lead, k, h, w, generator=gen)
    return x0, _weights(gen, *lead, O5, h, w)


@pytest.mark.parametrize("face", ["reference", "cpu"])
@pytest.mark.parametrize("case", FACE_CASES, ids=str)
def test_faces_match_dense_float64_reference(face, case, gen, monkeypatch):
    batch, k, h, w, steps = case
    x0, weights = _inputs(gen, batch, k, h, w, signed=steps == 3)
    expected = random_walk_reference(x0.double(), weights.double(), steps)
    poison_heap(x0.numel())
    got = _walk(face, monkeypatch, x0, weights, steps)
    assert got.dtype == torch.float32 and got.shape == x0.shape
    assert_rel_close(got.double(), expected, RTOL, what=face)


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_face_matches_dense_float64_reference(case, gen, monkeypatch):
    batch, k, h, w, steps = case
    x0, weights = _inputs(gen, batch, k, h, w, signed=steps == 3)
    expected = random_walk_reference(x0.double(), weights.double(), steps)
    poison_heap(x0.numel())
    got = _walk("triton", monkeypatch, x0, weights, steps)
    assert_rel_close(got.double(), expected, RTOL, what="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("block_p, block_t", [(16, 16), (16, 128)])
def test_triton_tiles_smaller_than_the_problem(block_p, block_t, gen):
    from wsss_fast.kernels.random_walk import random_walk_triton

    x0, weights = _inputs(gen, 1, 2, 6, 7)  # 42 pixels: 3 pixel blocks, 5 or 1 tap chunks
    got = random_walk_triton(x0, weights, 2, half_disk_offsets(5), block_p=block_p,
                             block_t=block_t)
    expected = random_walk_reference(x0.double(), weights.double(), 2)
    assert_rel_close(got.double(), expected, RTOL)


@pytest.mark.parametrize("face", ["cpu", "triton"])
@pytest.mark.parametrize("steps", [3, 256])
def test_fp16_inputs(face, steps, gen, monkeypatch):
    x0, weights = _inputs(gen, None, 2, 5, 6)
    x0, weights = x0.half(), weights.half()
    got = _walk(face, monkeypatch, x0, weights, steps)
    assert got.dtype == torch.float16 and got.shape == x0.shape
    expected = random_walk_reference(x0.double(), weights.double(), steps)
    assert_rel_close(got.double(), expected, 3e-3)


def test_radius_other_than_five(gen, monkeypatch):
    o3 = len(half_disk_offsets(3))
    x0 = torch.rand(2, 6, 8, generator=gen)
    weights = _weights(gen, o3, 6, 8)
    expected = random_walk_reference(x0.double(), weights.double(), 4, radius=3)
    for face in ("cpu", "reference"):
        got = _walk(face, monkeypatch, x0, weights, 4, radius=3)
        assert_rel_close(got.double(), expected, RTOL, what=face)


@pytest.mark.parametrize("face", ["reference", "cpu", "triton"])
def test_zero_weights_walk_is_the_identity(face, gen, monkeypatch):
    x0 = torch.randn(3, 4, 9, generator=gen)
    got = _walk(face, monkeypatch, x0, torch.zeros(O5, 4, 9), 3)
    assert torch.equal(got, x0)


@pytest.mark.parametrize("face", ["cpu", "triton"])
def test_constant_maps_stay_exactly_constant(face, gen, monkeypatch):
    x0 = torch.full((2, 6, 7), 0.37)
    got = _walk(face, monkeypatch, x0, torch.rand(O5, 6, 7, generator=gen), 3)
    assert torch.equal(got, x0)


@pytest.mark.parametrize("face", ["reference", "cpu"])
def test_degree_weighted_mass_is_conserved(face, gen, monkeypatch):
    x0, weights = _inputs(gen, None, 3, 11, 13)
    degree = dense_affinity(weights.double()).sum(dim=0).view(11, 13)
    got = _walk(face, monkeypatch, x0, weights, 256)
    mass_in = (x0.double() * degree).sum(dim=(1, 2))
    mass_out = (got.double() * degree).sum(dim=(1, 2))
    torch.testing.assert_close(mass_out, mass_in, rtol=1e-6, atol=0)
    assert not torch.allclose(got, x0, rtol=1e-2)  # and the walk did move the maps


def test_default_dispatch_and_the_autograd_fallback(gen, monkeypatch):
    x0, weights = _inputs(gen, None, 2, 5, 6)
    assert random_walk_op.choose(x0[None], weights[None], 4, 5) == "cpu"
    leaf = x0.clone().requires_grad_()
    out = random_walk(leaf, weights, 4)
    assert out.grad_fn is not None
    out.sum().backward()
    affinity = dense_affinity(weights.double())
    walk4 = torch.linalg.matrix_power(affinity / affinity.sum(dim=0), 4)
    assert_rel_close(leaf.grad.double(), walk4.sum(dim=1).view(5, 6).expand(2, 5, 6), RTOL)
    assert_rel_close(out.detach(), random_walk(x0, weights, 4), RTOL)


def test_opcheck(gen):
    x0, weights = _inputs(gen, 2, 3, 5, 6)
    torch.library.opcheck(torch.ops.wsss_fast.random_walk.default, (x0, weights, 3, 5),
                          test_utils=("test_schema", "test_faketensor"))


def _bad_calls():
    x0, w = torch.rand(2, 5, 6), torch.rand(O5, 5, 6)
    return [
        (lambda: random_walk(x0[0], w, 3), r"x0 \(K, h, w\)"),
        (lambda: random_walk(x0, w[:33], 3), r"\(34, 5, 6\).*\(33, 5, 6\)"),
        (lambda: random_walk(x0[None].expand(2, 2, 5, 6), w[None], 3), r"\(2, 34, 5, 6\)"),
        (lambda: random_walk(x0, w[:, :, :5], 3), r"\(34, 5, 6\).*\(34, 5, 5\)"),
        (lambda: random_walk(x0, w, 0), "steps"),
        (lambda: random_walk(x0, w, True), "steps"),
        (lambda: random_walk(x0, w, 2.0), "steps"),
        (lambda: random_walk(x0, w, 3, radius=1), "radius"),
        (lambda: random_walk(x0, -w, 3), r"finite and >= 0"),
        (lambda: random_walk(x0.masked_fill(x0 > 0.5, float("nan")), w, 3), "finite"),
        (lambda: random_walk(x0.double(), w, 3), "dtype"),
        (lambda: random_walk((x0 * 10).long(), w, 3), "dtype"),
        (lambda: random_walk(x0[:0], w, 3), "non-empty"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_random_walk_rejects(index):
    call, pattern = _bad_calls()[index]
    with pytest.raises(ValueError, match=pattern):
        call()


def _cuda_message(lib) -> str:
    return (lib.wsss_fast_cuda_last_error() or b"").decode()


@needs_nvcc
def test_cuda_library_exports_random_walk(cuda_library):
    path, lib = cuda_library
    listing = subprocess.run(["nm", "-D", "--defined-only", path], check=True,
                             capture_output=True, text=True).stdout
    defined = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    assert {"wsss_fast_random_walk", "wsss_fast_random_walk_workspace_bytes"} <= defined
    assert lib.wsss_fast_cuda_abi_version() == _abi.value("CUDA_ABI_VERSION")


@needs_nvcc
def test_cuda_workspace_size(cuda_library):
    _, lib = cuda_library
    b, k, h, w = 2, 3, 5, 7
    taps, padded = 2 * O5, (h + 8) * (w + 8)
    expected = 4 * (b * taps * h * w + 2 * b * k * padded)
    assert lib.wsss_fast_random_walk_workspace_bytes(b, k, h, w, 5) == expected
    assert lib.wsss_fast_random_walk_workspace_bytes(b, k, h, w, 1) == -1
    assert "radius" in _cuda_message(lib)


@needs_nvcc
def test_cuda_random_walk_rejects_bad_arguments_before_any_cuda_call(cuda_library):
    _, lib = cuda_library
    fake = ctypes.c_void_p(0x1000)  # never dereferenced: validation comes first
    size = lib.wsss_fast_random_walk_workspace_bytes(1, 2, 5, 7, 5)

    def call(**overrides):
        args = dict(x0=fake, weights=fake, out=fake, workspace=fake, workspace_size=size, batch=1,
                    classes=2, h=5, w=7, radius=5, steps=3, dtype=0, stream=None)
        args.update(overrides)
        return lib.wsss_fast_random_walk(*args.values())

    cases = {"dtype": dict(dtype=3), "radius": dict(radius=1), "steps": dict(steps=0),
             "negative": dict(h=-1), "too small": dict(workspace_size=size - 4),
             "NULL": dict(weights=None)}
    for expected, overrides in cases.items():
        status = call(**overrides)
        assert status < 0, (expected, status)
        assert expected in _cuda_message(lib), (expected, _cuda_message(lib))
    # empty problems succeed without a device and clear the message
    assert call(x0=None, weights=None, out=None, workspace=None, batch=0) == 0
    assert _cuda_message(lib) == ""


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", FACE_CASES, ids=str)
def test_cuda_face_matches_reference(gpu_lib, dtype, case, gen):
    batch, k, h, w, steps = case
    x0, weights = _inputs(gen, batch or 1, k, h, w)
    expected = random_walk_reference(x0.to(dtype).double(), weights.double(), steps)
    out = torch.full(x0.shape, float("nan"), dtype=dtype, device="cuda")
    got = gpu_lib.random_walk(x0.to(dtype).cuda(), weights.cuda(), steps, 5, out=out)
    assert got.data_ptr() == out.data_ptr()
    tol = {torch.float32: RTOL, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert_rel_close(got.cpu().double(), expected, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("face", ["cuda", "triton"])
def test_gpu_faces_through_the_public_op(face, gpu_lib, gen, monkeypatch):
    if face == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the triton GPU run needs TRITON_INTERPRET=0")
    x0, weights = _inputs(gen, 2, 3, 94, 125)
    expected = _walk("cpu", monkeypatch, x0, weights, 256)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = _walk(face, monkeypatch, x0.cuda(), weights.cuda(), 256)
    stream.synchronize()
    assert_rel_close(got.cpu(), expected, RTOL)


def test_gradients_above_the_dense_size_are_refused_not_silently_dense(gen):
    side = int(GRAD_MAX_PIXELS ** 0.5) + 1
    x0, weights = _inputs(gen, None, 1, side, side)
    with pytest.raises(ValueError, match=rf"gradients need the dense .* {GRAD_MAX_PIXELS} pixels"):
        random_walk(x0.requires_grad_(), weights, 2)
    with torch.no_grad():  # the same call without autograd runs a fused face
        assert random_walk(x0, weights, 2).shape == x0.shape
    assert random_walk(x0.detach(), weights, 2).grad_fn is None
