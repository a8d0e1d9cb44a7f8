"""``random_walk`` (DESIGN §3.5) and the IRN/PSA refinement built on it.

* Every face (reference in fp32, cpu, triton in the interpreter) against the dense float64
  reference ``x0 @ T^steps`` on fresh random inputs: odd, 1-row, 1-column, 1×1 and
  smaller-than-radius grids, several K, steps 1/3/5/64/256, batched, fp16; poisoned heaps.
* The reference itself against hand-computed tiny walks (column normalization, 2 steps).
* Properties: zero weights → identity, constant maps stay constant, degree-weighted mass kept.
* ``irn_affinity`` / ``psa_affinity`` + walk against the dense upstream-faithful reproductions
  (``upstream_random_walk``: IRN's padded build + crop, PSA's from-region pairs), hand-computed
  path maxima and PSA's missing border pairs; ``refine_irn`` / ``refine_psa`` label maps against
  the upstream pipelines.
* The CUDA library: built with nvcc, symbols, argument checks without a GPU; GPU runtime tests are
  marked ``gpu``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import subprocess

import numpy as np
import pytest
import torch

from tests.helpers import assert_rel_close, poison_heap
from wsss_fast import _cuda_build
from wsss_fast.ops import _backend, _cuda_lib, random_walk, random_walk_reference
from wsss_fast.ops.random_walk import FACES, dense_affinity, half_disk_offsets
from wsss_fast.postprocess import upstream_random_walk as upstream
from wsss_fast.postprocess.random_walk import (RANDOM_WALK_PRESETS, image_edge_map, irn_affinity,
                                               irn_path, psa_affinity, refine_irn, refine_psa)

HAS_TRITON = importlib.util.find_spec("triton") is not None
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


# ------------------------------------------------------------------------------ offsets, reference

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


# ------------------------------------------------------------------------------ faces vs reference

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
    got = random_walk_triton(x0, weights, 2, 5, block_p=block_p, block_t=block_t)
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


# ------------------------------------------------------------------------------ properties

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
    assert _backend.choose_face("random_walk", FACES, torch.device("cpu")) == "cpu"
    x0, weights = _inputs(gen, None, 2, 5, 6)
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


# ------------------------------------------------------------------------------ validation

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


def test_refinement_rejects():
    cams, edge = torch.rand(2, 5, 6), torch.rand(5, 6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        irn_affinity(edge + 1)
    with pytest.raises(ValueError, match="2-dimensional"):
        irn_affinity(edge[None])
    with pytest.raises(ValueError, match="beta"):
        irn_affinity(edge, beta=0)
    with pytest.raises(ValueError, match="3 keys for 2"):
        refine_irn(cams, [1, 2, 3], edge, (20, 24))
    with pytest.raises(ValueError, match="distinct"):
        refine_irn(cams, [1, 1], edge, (20, 24))
    with pytest.raises(ValueError, match="at most 4"):
        refine_irn(cams, [1, 2], edge, (21, 24))
    with pytest.raises(ValueError, match="does not match"):
        refine_irn(cams, [1, 2], edge[:4], (16, 24))
    with pytest.raises(ValueError, match=r"\(C, 2, 3\)"):
        refine_psa(torch.rand(2, 16, 17), [1, 2], torch.rand(4, 2, 2))
    with pytest.raises(ValueError, match="uint8"):
        image_edge_map(np.zeros((8, 8, 3), np.float32), (2, 2))


# ------------------------------------------------------------------------------ IRN

def test_irn_paths_hand_computed():
    assert irn_path(0, 1) == ((0, 0), (0, 1))
    assert set(irn_path(1, 1)) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert set(irn_path(4, 0)) == {(y, 0) for y in range(5)}
    assert set(irn_path(1, -3)) == {(y, x) for y in (0, 1) for x in range(-3, 1)}
    assert set(irn_path(3, 3)) == {(y, x) for y in range(4) for x in range(4) if abs(x - y) <= 1}
    assert set(irn_path(4, 2)) == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2),
                                   (3, 1), (3, 2), (4, 1), (4, 2)}
    lengths = [len(irn_path(dy, dx)) for dy, dx in half_disk_offsets(5)]
    assert min(lengths) == 2 and max(lengths) == 11
    for dy, dx in half_disk_offsets(5):
        assert set(irn_path(dy, dx)) == set(upstream.path_cells(dy, dx))


def test_irn_affinity_hand_computed_path_max():
    edge = torch.zeros(3, 3)
    edge[1, 1] = 0.5
    weights = irn_affinity(edge, beta=2)
    at = {offset: weights[o] for o, offset in enumerate(half_disk_offsets(5))}
    assert at[(1, 1)][0, 0] == 0.25    # the 2×2 box holds the centre
    assert at[(1, 1)][1, 0] == 0.25    # (1,0)-(2,1): so does this one
    assert at[(1, 0)][0, 0] == 1.0     # (0,0)-(1,0)
    assert at[(0, 2)][0, 0] == 1.0     # the top row avoids the centre
    assert at[(2, 0)][0, 1] == 0.25    # straight down through it
    assert at[(2, 2)][0, 0] == 0.25    # the diagonal
    assert at[(2, -1)][0, 2] == 0.25   # (0,2)-(2,1): the centre is 1/√5 from the segment
    assert at[(0, 1)][2, 0] == 1.0
    assert at[(0, 1)][0, 2] == 0.0     # partner off the grid
    assert at[(1, 0)][2, 1] == 0.0
    assert at[(4, 0)].abs().sum() == 0  # no pair of length 4 fits in 3 rows
    # A cell of the bounding box far from the segment is not on the path.
    edge = torch.zeros(4, 4)
    edge[0, 3] = 0.9
    at = {offset: w for offset, w in zip(half_disk_offsets(5), irn_affinity(edge, beta=2))}
    assert at[(3, 3)][0, 0] == 1.0     # (0,3) is 3/√2 from the diagonal
    assert math.isclose(at[(0, 3)][0, 0].item(), 0.01, rel_tol=1e-5)


@pytest.mark.parametrize("h, w", [(13, 17), (1, 12), (12, 1), (2, 3), (9, 31)])
@pytest.mark.parametrize("beta, exp_times", [(10, 8), (8, 6)])
def test_irn_affinity_walk_equals_propagate_to_edge(h, w, beta, exp_times, gen):
    edge = torch.rand(h, w, generator=gen) ** 2
    cams = torch.rand(3, h, w, generator=gen)
    oracle = upstream.propagate_to_edge(cams, edge, beta=beta, exp_times=exp_times,
                                        dtype=torch.float64)
    # exact semantics: float64 affinities through the dense reference
    exact = random_walk_reference(cams.double() * (1 - edge.double()),
                                  irn_affinity(edge.double(), beta), 2 ** exp_times)
    assert_rel_close(exact, oracle, 1e-12, what="float64")
    # the fused fp32 path (upstream's own fp32 dense walk is only within ~5e-5 here)
    fused = random_walk(cams * (1 - edge), irn_affinity(edge, beta), 2 ** exp_times)
    assert_rel_close(fused.double(), oracle, 2e-5, what="fused")


def test_irn_walk_equals_propagate_to_edge_at_40x50(gen):
    edge = torch.rand(40, 50, generator=gen) ** 2
    cams = torch.rand(2, 40, 50, generator=gen)
    oracle = upstream.propagate_to_edge(cams, edge, dtype=torch.float64)
    fused = random_walk(cams * (1 - edge), irn_affinity(edge), 256)
    assert_rel_close(fused.double(), oracle, 2e-5)


@pytest.mark.parametrize("image_size, keys, exp_times", [((50, 66), [2, 7, 14], 8),
                                                         ((29, 35), [0, 19], 6),
                                                         ((7, 13), [5], 8)])
def test_refine_irn_labels_equal_upstream(image_size, keys, exp_times, gen):
    height, width = image_size
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    cams = torch.rand(len(keys), h, w, generator=gen) ** 2
    edge = torch.rand(h, w, generator=gen) ** 3
    got = refine_irn(cams, keys, edge, image_size, steps=2 ** exp_times)
    expected = upstream.irn_sem_seg_labels(cams, keys, edge, image_size, exp_times=exp_times,
                                           dtype=torch.float64)
    assert got.dtype == np.uint8 and got.shape == image_size
    assert set(np.unique(expected)) <= {0, *(k + 1 for k in keys)}
    assert len(np.unique(expected)) >= 2, "a one-label map cannot tell pipelines apart"
    np.testing.assert_array_equal(got, expected)


def test_refine_irn_presets_and_no_classes():
    preset = RANDOM_WALK_PRESETS["irn"]
    assert (preset.beta, preset.steps, preset.radius, preset.bg_threshold) == (10, 256, 5, 0.25)
    psa = RANDOM_WALK_PRESETS["psa"]
    assert (psa.beta, psa.steps, psa.radius, psa.alpha) == (8, 256, 5, 16)
    labels = refine_irn(torch.zeros(0, 3, 4), [], torch.rand(3, 4), (10, 13))
    assert labels.shape == (10, 13) and not labels.any()
    labels = refine_irn(torch.zeros(1, 3, 4), [6], torch.rand(3, 4), (10, 13))
    assert not labels.any()  # an all-zero walk: background (upstream would divide by 0)


# ------------------------------------------------------------------------------ PSA

def test_psa_affinity_has_upstreams_missing_border_pairs(gen):
    h, w = 10, 13
    features = torch.randn(5, h, w, generator=gen)
    weights = psa_affinity(features, beta=2)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[: h - 4, 4: w - 4] = True
    assert (weights[:, inside] > 0).all() and (weights[:, ~inside] == 0).all()
    affinity = dense_affinity(weights)
    identity_row = torch.zeros(h * w)
    for corner in ((h - 1, 0), (0, 0), (h - 1, w - 1)):
        i = corner[0] * w + corner[1]
        identity_row.zero_()[i] = 1
        assert torch.equal(affinity[i], identity_row), f"corner {corner} has pairs"
    # a pixel of the from region: exp(−mean|g_i − g_j|)^β, hand-computed for offset (2, −3)
    o = half_disk_offsets(5).index((2, -3))
    expected = math.exp(-(features[:, 3, 5] - features[:, 1, 8]).abs().mean().item()) ** 2
    assert math.isclose(weights[o, 1, 8].item(), expected, rel_tol=1e-6)
    assert psa_affinity(torch.randn(3, 4, 20)).abs().sum() == 0  # fewer than 5 rows: no pairs


@pytest.mark.parametrize("h, w", [(9, 13), (5, 9), (12, 20)])
def test_psa_affinity_walk_equals_upstream(h, w, gen):
    features = torch.randn(6, h, w, generator=gen)
    maps = torch.rand(4, h, w, generator=gen)
    oracle = upstream.psa_random_walk(maps, features, beta=8, logt=8, dtype=torch.float64)
    exact = random_walk_reference(maps.double(), psa_affinity(features.double(), 8), 256)
    assert_rel_close(exact, oracle, 1e-12, what="float64")
    fused = random_walk(maps, psa_affinity(features, 8), 256)
    assert_rel_close(fused.double(), oracle, 2e-5, what="fused")


@pytest.mark.parametrize("image_size, keys", [((75, 100), [11, 4, 17]), ((41, 72), [0]),
                                              ((64, 80), [3, 19])])
def test_refine_psa_labels_equal_upstream(image_size, keys, gen):
    height, width = image_size
    cams = torch.rand(len(keys), height, width, generator=gen) ** 2
    features = torch.randn(8, math.ceil(height / 8), math.ceil(width / 8), generator=gen)
    got = refine_psa(cams, keys, features, alpha=4)
    expected = upstream.psa_rw_labels(cams, keys, features, alpha=4, dtype=torch.float64)
    assert got.dtype == np.uint8 and got.shape == image_size
    assert len(np.unique(expected)) >= 2, "a one-label map cannot tell pipelines apart"
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------ image edge map

def _two_region_image(height=48, width=64):
    image = np.full((height, width, 3), 40, np.uint8)
    image[:, width // 2:] = 210
    return image


def test_image_edge_map_marks_the_step():
    edge = image_edge_map(_two_region_image(), (12, 16))
    assert edge.shape == (12, 16) and edge.dtype == torch.float32
    assert edge.min() >= 0 and edge.max() <= 1
    assert (edge[:, 7:9] > 0.99).all()                       # the step at column 32 → 8
    assert edge[:, :5].max() < 0.05 and edge[:, 11:].max() < 0.05
    assert image_edge_map(np.full((20, 20, 3), 99, np.uint8), (5, 5)).max() < 1e-4


def test_image_edge_map_stops_the_walk_at_the_boundary():
    image = _two_region_image()
    edge = image_edge_map(image, (12, 16))
    seed = torch.zeros(1, 12, 16)
    seed[0, 4:8, 2:5] = 1.0  # left region only
    leak = {}
    for name, boundary in (("edge", edge), ("flat", torch.zeros_like(edge))):
        walked = random_walk(seed, irn_affinity(boundary), 256)
        leak[name] = (walked[0, :, 9:].sum() / walked.sum()).item()
    assert leak["flat"] > 0.2 and leak["edge"] < 0.1 * leak["flat"], leak


# ------------------------------------------------------------------------------ CUDA library

needs_nvcc = pytest.mark.skipif(_cuda_build.find_nvcc() is None,
                                reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


@pytest.fixture(scope="module")
def cuda_library(tmp_path_factory):
    """The whole library built once for sm_80 and loaded (a link/ABI check; no GPU needed)."""
    if _cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    path = str(tmp_path_factory.mktemp("cuda_rw") / _cuda_build.LIBRARY_NAME)
    try:
        _cuda_build.build_library(path, archs=("80",))
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building the CUDA library failed: {exc}")
    return path, _cuda_lib.load_library(path)


def _cuda_message(lib) -> str:
    return (lib.wsss_fast_cuda_last_error() or b"").decode()


@needs_nvcc
def test_cuda_library_exports_random_walk(cuda_library):
    path, lib = cuda_library
    listing = subprocess.run(["nm", "-D", "--defined-only", path], check=True,
                             capture_output=True, text=True).stdout
    defined = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    assert {"wsss_fast_random_walk", "wsss_fast_random_walk_workspace_bytes"} <= defined
    assert lib.wsss_fast_cuda_abi_version() == _backend.CUDA_ABI_VERSION


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


# ------------------------------------------------------------------------------ GPU runtime

@pytest.fixture(scope="module")
def gpu_lib(tmp_path_factory):
    """The cuda face on this GPU, built for its arch when nvcc is available."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with pytest.MonkeyPatch.context() as mp:
        if _cuda_build.find_nvcc() is not None:
            major, minor = torch.cuda.get_device_capability()
            path = str(tmp_path_factory.mktemp("cuda_rw_gpu") / _cuda_build.LIBRARY_NAME)
            _cuda_build.build_library(path, archs=(f"{major}{minor}",))
            mp.setenv(_cuda_lib.ENV_VAR, path)
        _cuda_lib.reset()
        reason = _cuda_lib.load_error()
        if reason is not None:
            pytest.skip(f"cuda library unavailable: {reason}")
        yield _cuda_lib
    _cuda_lib.reset()


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
