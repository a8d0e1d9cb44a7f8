"""The IRN/PSA refinement built on ``random_walk``: ``irn_affinity`` / ``psa_affinity`` + walk
against the dense upstream-faithful reproductions (``upstream_random_walk``: IRN's padded build +
crop, PSA's from-region pairs), hand-computed path maxima and PSA's missing border pairs;
``refine_irn`` / ``refine_psa`` label maps against the upstream pipelines; the image edge map.
The op itself (every face, the CUDA library's entry points) is tested in
tests/ops/test_random_walk.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import assert_rel_close
from wsss_fast.ops import random_walk, random_walk_reference
from wsss_fast.ops.random_walk import dense_affinity, half_disk_offsets
from wsss_fast.postprocess import upstream_random_walk as upstream
from wsss_fast.postprocess.random_walk import (RANDOM_WALK_PRESETS, fill_boundary_cells,
                                               image_edge_map, irn_affinity, irn_path,
                                               irn_walk_scores, psa_affinity, refine_irn,
                                               refine_psa)

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


def test_irn_paths_hand_computed():
    assert irn_path(0, 1) == ((0, 1), (0, 0))  # IRN order: the offset first
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


def test_refine_irn_fills_each_region_with_its_class_and_does_not_leak():
    # Two regions split by a boundary column; each class's CAM is a small peak in its own region
    # (the weaker one at 0.6). The walk must spread each peak over its whole region (where a
    # thresholded seed labels the peaks only) and stop at the boundary, on the fast path and in
    # the upstream-faithful dense one alike.
    h, w = 12, 16
    edge = torch.zeros(h, w)
    edge[:, 8] = 1.0
    cams = torch.zeros(2, h, w)
    cams[0, 4:8, 2:5] = 1.0
    cams[1, 4:8, 11:14] = 0.6
    keys = [3, 6]
    labels = refine_irn(cams, keys, edge, (4 * h, 4 * w))
    np.testing.assert_array_equal(
        labels, upstream.irn_sem_seg_labels(cams, keys, edge, (4 * h, 4 * w),
                                            dtype=torch.float64))
    seed = np.where(np.kron(cams.amax(0).numpy(), np.ones((4, 4))) > 0.25, 1, 0)
    assert seed[:, :28].mean() < 0.2                   # the seed labels the peaks only
    assert (labels[:, :33] == 4).all()                 # left region: class 3, to its border
    assert (labels[:, 35:] == 7).all()                 # right region: class 6, to its border
    assert (labels[:, 33:35] == 0).all()   # the boundary cell's centre stays background


def _two_regions(weak: float):
    h, w = 12, 16
    edge = torch.zeros(h, w)
    edge[:, 8] = 1.0
    cams = torch.zeros(2, h, w)
    cams[0, 4:8, 2:5] = 1.0
    cams[1, 4:8, 11:14] = weak
    return cams, [3, 6], edge, (4 * h, 4 * w)


def test_boundary_fill_labels_the_boundary_cells_from_their_neighbours():
    cams, keys, edge, size = _two_regions(0.6)
    plain = refine_irn(cams, keys, edge, size)
    filled = refine_irn(cams, keys, edge, size, boundary_fill=0.5)
    assert (plain[:, 33:35] == 0).all()                # upstream: the boundary stays background
    assert (filled != 0).all()                         # filled: no background left
    assert (filled[:, :32] == 4).all() and (filled[:, 37:] == 7).all()   # regions unchanged
    assert set(np.unique(filled[:, 32:37])) <= {4, 7}


def test_fill_boundary_cells_grows_from_the_nearest_interior_cells():
    walked = torch.zeros(2, 5, 7)
    walked[0, :, :2] = 1.0          # class 0 left of a 3-column band, class 1 right of it
    walked[1, :, 5:] = 0.5
    edge = torch.zeros(5, 7)
    edge[:, 2:5] = 0.9
    filled = fill_boundary_cells(walked, edge, 0.5)
    torch.testing.assert_close(filled[:, :, :2], walked[:, :, :2])   # interior untouched
    torch.testing.assert_close(filled[:, :, 5:], walked[:, :, 5:])
    assert (filled[0, :, 2] == 1).all() and (filled[1, :, 2] == 0).all()   # first ring: left
    assert (filled[1, :, 4] == 0.5).all() and (filled[0, :, 4] == 0).all()  # and right
    assert (filled[:, :, 3] == torch.tensor([1.0, 0.5])[:, None]).all()   # middle: both
    torch.testing.assert_close(fill_boundary_cells(walked, edge, 0.95), walked)  # none over
    torch.testing.assert_close(fill_boundary_cells(walked, torch.ones(5, 7), 0.5), walked)


def test_class_normalization_keeps_a_weak_class():
    # The weak class's walked map peaks below bg 0.25 of the strong one's: IRN's global max
    # drops it, per-class normalization labels its region.
    cams, keys, edge, size = _two_regions(0.1)
    assert not (refine_irn(cams, keys, edge, size) == 7).any()
    labels = refine_irn(cams, keys, edge, size, normalize="class")
    assert (labels[:, 35:] == 7).all() and (labels[:, :33] == 4).all()
    scores = irn_walk_scores(cams, edge, size, normalize="class")
    torch.testing.assert_close(scores.amax(dim=(1, 2)), torch.ones(2))
    with pytest.raises(ValueError, match="normalize"):
        irn_walk_scores(cams, edge, size, normalize="max")
    with pytest.raises(ValueError, match="boundary_fill"):
        irn_walk_scores(cams, edge, size, boundary_fill=0)


def test_keep_boundary_cams_walks_the_cams_themselves():
    # A CAM that covers the boundary column: IRN's x0 = cams·(1 − B) zeroes it there (the column
    # stays background), x0 = cams keeps it (the column is labelled with its class).
    cams, keys, edge, size = _two_regions(0.6)
    cams[0, :, 2:10] = 1.0                             # class 3 reaches over the boundary column
    plain = refine_irn(cams, keys, edge, size)
    kept = refine_irn(cams, keys, edge, size, keep_boundary_cams=True)
    assert (plain[:, 33:35] == 0).all() and (kept[:, 33:35] == 4).all()
    np.testing.assert_array_equal(plain[:, :32], kept[:, :32])   # elsewhere the same labels
    expected = random_walk(cams, irn_affinity(edge), 16)       # the walk of the plain CAMs
    got = irn_walk_scores(cams, edge, size, steps=16, keep_boundary_cams=True)
    up = torch.nn.functional.interpolate(expected[None], scale_factor=4, mode="bilinear",
                                         align_corners=False)[0]
    torch.testing.assert_close(got, up / up.max())


def test_refine_options_irn_only_defaults_are_the_walks_defaults():
    # `refine` records an IRN-only option in a run's config only when it differs from these
    # defaults, so they must be the walk's own (IRN's) defaults.
    import inspect
    from wsss_fast.pipeline.refine import IRN_OPTIONS
    for walk in (refine_irn, irn_walk_scores):
        parameters = inspect.signature(walk).parameters
        assert {name: parameters[name].default for name in IRN_OPTIONS} == IRN_OPTIONS
    assert IRN_OPTIONS == {"normalize": "global", "boundary_fill": None,
                           "keep_boundary_cams": False, "upsample": 1}


@pytest.mark.parametrize("upsample, image_size", [(2, (18, 27)), (4, (20, 25))])
def test_upsampled_walk_equals_the_dense_walk_on_the_finer_grid(upsample, image_size, gen):
    # The walk on the finer grid is IRN's walk (the dense restatement) of the bilinearly
    # upsampled CAMs over the bilinearly upsampled boundary map, then ×(4 / upsample).
    cams = torch.rand(2, 5, 7, generator=gen, dtype=torch.float64) ** 2
    edge = torch.rand(5, 7, generator=gen, dtype=torch.float64) ** 2

    def finer(x):
        return torch.nn.functional.interpolate(x[None], scale_factor=upsample, mode="bilinear",
                                               align_corners=False)[0]
    fine_edge = finer(edge[None])[0]
    assert fine_edge.shape == (5 * upsample, 7 * upsample)
    walked = upstream.propagate_to_edge(finer(cams), fine_edge, exp_times=3, dtype=torch.float64)
    if upsample < 4:
        walked = torch.nn.functional.interpolate(walked[None], scale_factor=4 // upsample,
                                                 mode="bilinear", align_corners=False)[0]
    expected = walked[:, :image_size[0], :image_size[1]]
    expected = expected / expected.max()
    got = irn_walk_scores(cams, edge, image_size, steps=8, upsample=upsample)
    assert got.shape == (2, *image_size)
    assert_rel_close(got.double(), expected, 2e-5)
    # and differs from the stride-4 walk (the option does something)
    assert not torch.allclose(got, irn_walk_scores(cams, edge, image_size, steps=8), atol=1e-3)
    with pytest.raises(ValueError, match="upsample must be one of"):
        irn_walk_scores(cams, edge, image_size, upsample=3)
