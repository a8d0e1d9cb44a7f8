"""``path_affinity`` and IRN's path set: the offsets, path cells and source window against
reference affinity_networks.md §1.2's numbers; every face of the op against the gather + max
reference (values, arg-max ties, gradients), an independent restatement of IRN's
``PathIndex`` / ``to_affinity``, validation and the torch.library registration."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_rel_close, poison_heap
from tests.ops.faces import face_params, needs_triton
from wsss_fast.ops import path_affinity, path_affinity_reference
from wsss_fast.ops.irn_paths import irn_path, irn_path_set
from wsss_fast.ops.path_affinity import (path_affinity_backward_op, path_affinity_op,
                                         path_max_reference, path_tables)
from wsss_fast.ops.random_walk import half_disk_offsets

# ------------------------------------------------------------------------------ path set

LENGTHS_R10 = {2: 2, 3: 2, 4: 4, 5: 2, 6: 6, 7: 4, 8: 10, 9: 2, 10: 12, 11: 4, 12: 12, 13: 2,
               14: 8, 15: 8, 16: 22, 18: 16, 19: 6, 20: 20, 21: 4, 22: 6}
LENGTHS_R5 = {2: 2, 3: 2, 4: 4, 5: 2, 6: 4, 7: 2, 8: 8, 10: 6, 11: 4}


@pytest.mark.parametrize("radius, offsets, cells, lengths", [
    (10, 152, 2134, LENGTHS_R10), (5, 34, 242, LENGTHS_R5), (2, 4, 12, {2: 2, 4: 2}),
    (1, 0, 0, {})])
def test_path_set_numbers(radius, offsets, cells, lengths):
    paths = irn_path_set(radius)
    assert paths.num_offsets == offsets and paths.num_cells == cells
    assert dict(Counter(paths.path_lengths)) == lengths
    assert paths.base_offsets == (half_disk_offsets(radius) if radius > 1 else ())
    assert len(set(paths.offsets)) == offsets and set(paths.offsets) == set(paths.base_offsets)


def test_a_uint8_holds_every_path_index_up_to_the_largest_radius():
    assert irn_path_set(64).max_path_length <= 255  # the arg-max stored per pair is a uint8


def test_irn_order_is_the_base_order_stably_sorted_by_path_length():
    paths = irn_path_set(10)
    assert list(paths.path_lengths) == sorted(paths.path_lengths)
    assert [paths.base_offsets[i] for i in paths.base_index] == list(paths.offsets)
    # within one length, base order is kept
    for length in LENGTHS_R10:
        group = [i for i, n in zip(paths.base_index, paths.path_lengths) if n == length]
        assert group == sorted(group)
    assert paths.offsets[:4] == ((0, 1), (1, 0), (0, 2), (2, 0))  # lengths 2, 2, 3, 3


def test_path_cells_examples():
    assert irn_path(0, 4) == ((0, 4), (0, 3), (0, 2), (0, 1), (0, 0))
    assert len(irn_path(2, 3)) == 8 and len(irn_path(4, -2)) == 11
    assert irn_path(2, 3) == ((2, 3), (1, 3), (2, 2), (1, 2), (1, 1), (0, 1), (1, 0), (0, 0))
    for dy, dx in irn_path_set(10).offsets:
        path = irn_path(dy, dx)
        assert path[0] == (dy, dx) and path[-1] == (0, 0)
        keys = [abs(y) + abs(x) for y, x in path]
        assert keys == sorted(keys, reverse=True)
        brute = {(y, x) for y in range(-10, 11) for x in range(-10, 11)
                 if min(0, dy) <= y <= max(0, dy) and min(0, dx) <= x <= max(0, dx)
                 and (dy * x - dx * y) ** 2 / (dy * dy + dx * dx) < 1}
        assert set(path) == brute and len(path) == len(brute)
        # ties of |y| + |x| keep the row-major box order (upstream's stable sort)
        box = sorted(brute)
        for key in set(keys):
            assert [c for c in path if abs(c[0]) + abs(c[1]) == key] == \
                [c for c in box if abs(c[0]) + abs(c[1]) == key]


def test_source_window_and_pair_indices():
    paths = irn_path_set(10)
    window = paths.window(128, 128)
    assert (window.top, window.left, window.rows, window.cols, window.size) == (0, 9, 119, 110,
                                                                                13090)
    src, dst = paths.pair_indices(128, 128)
    assert src.shape == (13090,) and dst.shape == (152, 13090)
    assert src[0] == 9 and src[109] == 118 and src[110] == 128 + 9
    for o, (dy, dx) in enumerate(paths.offsets):
        assert torch.equal(dst[o], src + dy * 128 + dx)
    assert irn_path_set(5).window(7, 9).size == 3 * 1
    src, dst = irn_path_set(1).pair_indices(3, 4)
    assert torch.equal(src, torch.arange(12)) and dst.shape == (0, 12)
    with pytest.raises(ValueError, match=r"7×8 grid is too small for radius 5.*w >= 9"):
        irn_path_set(5).window(7, 8)
    with pytest.raises(ValueError, match=r"h >= 5"):
        irn_path_set(5).window(4, 20)
    for bad in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match="radius"):
            irn_path_set(bad)

# ------------------------------------------------------------------------------------ op


FACES = face_params("reference", "cpu", "triton")
FUSED = face_params("cpu", "triton")

CASES = [  # batch, h, w, radius
    (1, 7, 9, 2),
    (3, 13, 17, 5),
    (2, 21, 27, 10),
    (2, 10, 19, 10),  # the smallest grid for radius 10: one source
    (2, 5, 6, 1),     # radius 1: no offsets
    (1, 31, 12, 5),
]


def _boundary(gen, batch, h, w, dtype=torch.float32, levels=None):
    """Sigmoid-like boundary maps; ``levels`` quantizes them (many ties on every path)."""
    b = torch.rand(batch, 1, h, w, generator=gen)
    if levels:
        b = (b * levels).floor() / levels
    return b.to(dtype)


def _expected(boundary, radius):
    values, indices = path_max_reference(boundary, radius)
    return 1 - values, indices.to(torch.uint8)


def _on(face, t):
    return t.to(face.device)


@pytest.mark.parametrize("face", FACES, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_faces_match_the_reference(face, case, gen):
    batch, h, w, radius = case
    boundary = _boundary(gen, batch, h, w)
    expected, expected_arg = _expected(boundary, radius)
    poison_heap(expected.numel() + 1)
    got, arg = path_affinity_op(_on(face, boundary), radius)
    paths = irn_path_set(radius)
    assert got.shape == (batch, paths.num_offsets, paths.window(h, w).size)
    assert got.dtype == torch.float32 and arg.dtype == torch.uint8
    assert torch.equal(got.cpu(), expected), face  # the max is exact: no tolerance
    assert torch.equal(arg.cpu(), expected_arg), face
    assert torch.equal(path_affinity(_on(face, boundary), radius).cpu(), expected)


@pytest.mark.parametrize("face", FACES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(face, dtype, gen):
    if face.name == "triton" and dtype == torch.bfloat16 and face.device == "cpu":
        with pytest.raises(Exception, match="no bfloat16"):
            path_affinity(_boundary(gen, 1, 12, 13, dtype), 5)
        return
    boundary = _boundary(gen, 2, 12, 13, dtype)
    got = path_affinity(_on(face, boundary), 5).cpu()
    assert got.dtype == dtype
    expected = 1 - path_max_reference(boundary.float(), 5)[0]
    # the max is a selection and 1 − max is rounded once: bit-exact to the rounded fp32 result
    assert torch.equal(got, expected.to(dtype))
    leaf = _on(face, boundary.clone()).requires_grad_()
    grad_out = torch.randn(got.shape, generator=gen).to(dtype)
    path_affinity(leaf, 5).backward(_on(face, grad_out))
    ref_leaf = boundary.float().clone().requires_grad_()
    path_affinity_reference(ref_leaf, 5).backward(grad_out.float())
    assert leaf.grad.dtype == dtype
    assert_rel_close(leaf.grad.cpu().float(), ref_leaf.grad, 1e-2, what=str(dtype))


@pytest.mark.parametrize("face", FACES, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_the_reference_autograd(face, case, gen):
    batch, h, w, radius = case
    boundary = _boundary(gen, batch, h, w)
    leaf = _on(face, boundary.clone()).requires_grad_()
    out = path_affinity(leaf, radius)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(_on(face, grad_out))
    ref_leaf = boundary.clone().requires_grad_()
    path_affinity_reference(ref_leaf, radius).backward(grad_out)
    if radius == 1:
        assert torch.equal(leaf.grad.cpu(), torch.zeros_like(boundary))
    else:
        assert_rel_close(leaf.grad.cpu(), ref_leaf.grad, 1e-5, what=face.name)


@pytest.mark.parametrize("face", FACES, indirect=True)
def test_ties_go_to_the_first_cell_in_path_order(face, gen):
    # 3 levels: most paths hold several equal maxima. Integer gradients sum exactly, so the
    # gradients must be equal, not merely close: each pair's gradient lands on the same cell.
    boundary = _boundary(gen, 2, 23, 25, levels=3)
    _, arg = path_affinity_op(_on(face, boundary), 10)
    values, first = path_max_reference(boundary, 10)
    assert torch.equal(arg.cpu(), first.to(torch.uint8))
    gathered_ties = 0
    for o, path in enumerate(irn_path_set(10).paths):  # the first maximum, counted by hand
        cells = torch.stack([boundary[:, 0, cy:cy + 14, 9 + cx:9 + cx + 7].reshape(2, -1)
                             for cy, cx in path], dim=1)
        hits = cells == values[:, o, None]
        gathered_ties += int((hits.sum(1) > 1).sum())
        assert torch.equal(hits.int().argmax(1), first[:, o])
    assert gathered_ties > 1000  # the case does exercise ties
    leaf = _on(face, boundary.clone()).requires_grad_()
    out = path_affinity(leaf, 10)
    grad_out = torch.randint(-4, 5, out.shape, generator=gen).float()
    out.backward(_on(face, grad_out))
    ref_leaf = boundary.clone().requires_grad_()
    path_affinity_reference(ref_leaf, 10).backward(grad_out)
    assert torch.equal(leaf.grad.cpu(), ref_leaf.grad)


@pytest.mark.parametrize("face", FACES, indirect=True)
def test_nan_is_the_max_like_torch_max(face, gen):
    boundary = _boundary(gen, 1, 12, 15)
    boundary[0, 0, 3, 5] = boundary[0, 0, 4, 7] = float("nan")
    got, arg = path_affinity_op(_on(face, boundary), 4)
    expected, expected_arg = _expected(boundary, 4)
    assert torch.isnan(expected).any()
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(arg.cpu(), expected_arg)


def _irn_path_index(radius, h, w):
    """IRN's ``PathIndex(radius, (h, w))`` restated from reference §1.2 (not from this
    package): ``(path_indices per length, src_indices, dst_indices)``."""
    floor = int(math.ceil(radius) - 1)
    directions = [(0, x) for x in range(1, radius)]
    directions += [(y, x) for y in range(1, radius) for x in range(1 - radius, radius)
                   if x * x + y * y < radius ** 2]
    by_length = {}
    for dy, dx in directions:
        coords = [(y, x) for y in range(min(0, dy), max(0, dy) + 1)
                  for x in range(min(0, dx), max(0, dx) + 1)
                  if (dy * x - dx * y) ** 2 / (dy ** 2 + dx ** 2) < 1]
        coords.sort(key=lambda c: -abs(c[0]) - abs(c[1]))
        by_length.setdefault(len(coords), []).append(coords)
    full = np.arange(h * w, dtype=np.int64).reshape(h, w)
    rows, cols = h - floor, w - 2 * floor
    path_indices = [np.array([[full[dy:dy + rows, floor + dx:floor + dx + cols].reshape(-1)
                               for dy, dx in path] for path in paths])
                    for _, paths in sorted(by_length.items())]
    src = full[:rows, floor:floor + cols].reshape(-1)
    dst = np.concatenate([p[:, 0] for p in path_indices], axis=0)
    return [torch.from_numpy(p) for p in path_indices], torch.from_numpy(src), torch.from_numpy(dst)


def _irn_to_affinity(edge, path_indices):
    """IRN's ``to_affinity``: index_select of every path cell, max-pool over the path, 1 −."""
    edge = edge.view(edge.size(0), -1)
    out = []
    for index in path_indices:
        dist = torch.index_select(edge, dim=-1, index=index.view(-1))
        dist = dist.view(dist.size(0), index.size(0), index.size(1), index.size(2))
        out.append(torch.squeeze(1 - F.max_pool2d(dist, (dist.size(2), 1)), dim=2))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("face", FACES, indirect=True)
@pytest.mark.parametrize("batch, h, w, radius", [(2, 37, 45, 10), (1, 64, 64, 5), (3, 9, 8, 3)])
def test_equals_irn_path_index_and_to_affinity(face, batch, h, w, radius, gen):
    if face.name == "triton" and face.device == "cpu" and h * w > 2000:
        pytest.skip("the Triton interpreter: small grids only")
    path_indices, src, dst = _irn_path_index(radius, h, w)
    ours_src, ours_dst = irn_path_set(radius).pair_indices(h, w)
    assert torch.equal(ours_src, src) and torch.equal(ours_dst, dst)
    boundary = torch.sigmoid(torch.randn(batch, 1, h, w, generator=gen))
    edge = boundary.clone().requires_grad_()
    expected = _irn_to_affinity(edge, path_indices)
    leaf = _on(face, boundary.clone()).requires_grad_()
    got = path_affinity(leaf, radius)
    assert torch.equal(got.detach().cpu(), expected.detach())  # max |Δ| = 0, as upstream
    grad_out = torch.randint(-3, 4, expected.shape, generator=gen).float()  # sums exactly
    expected.backward(grad_out)
    got.backward(_on(face, grad_out))
    assert torch.equal(leaf.grad.cpu(), edge.grad)


def test_reference_gradcheck_float64(gen):
    boundary = torch.rand(2, 1, 6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: path_affinity_reference(b, 3), (boundary,))
    assert torch.autograd.gradcheck(lambda b: path_affinity_reference(b, 2), (boundary,))


def test_only_the_uint8_argmax_is_saved_for_backward(gen):
    boundary = _boundary(gen, 2, 40, 41).requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = path_affinity(boundary, 10)
    assert saved == [(torch.uint8, out.numel())]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        path_affinity_reference(boundary, 10)
    assert sum(n for _, n in saved[1:]) > 5 * out.numel()  # the gather keeps pairs × length


def test_default_dispatch_picks_the_cpu_face(gen):
    boundary = _boundary(gen, 1, 9, 9)
    assert path_affinity_op.choose(boundary, 3) == "cpu"
    grad, arg = torch.rand(1, 8, 35), torch.zeros(1, 8, 35, dtype=torch.uint8)
    assert path_affinity_backward_op.choose(grad, arg, 9, 9, 3) == "cpu"


@needs_triton
def test_triton_tiles_smaller_than_the_problem(gen):
    from wsss_fast.kernels.path_affinity import (path_affinity_backward_triton,
                                                 path_affinity_triton)

    boundary = _boundary(gen, 2, 11, 14)
    cells, start = path_tables(4)
    got, arg = path_affinity_triton(boundary, cells, start, 3, block_o=4,
                                    block_s=16)  # 4 × 6 blocks
    expected, expected_arg = _expected(boundary, 4)
    assert torch.equal(got, expected) and torch.equal(arg, expected_arg)
    grad = torch.randint(-3, 4, got.shape, generator=gen).float()
    expected_grad = path_affinity_backward_op.faces["reference"](grad, arg, 11, 14, 4)
    got_grad = path_affinity_backward_triton(grad, arg, cells, start, 11, 14, 3,
                                             block_o=4, block_s=16)
    assert torch.equal(got_grad, expected_grad)


def test_opcheck(gen):
    boundary = _boundary(gen, 2, 9, 11)
    torch.library.opcheck(torch.ops.wsss_fast.path_affinity.default, (boundary, 3),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    grad, arg = path_affinity_op(boundary, 3)
    torch.library.opcheck(torch.ops.wsss_fast.path_affinity_backward.default,
                          (grad, arg, 9, 11, 3), test_utils=("test_schema", "test_faketensor"))


def _bad_calls():
    b = torch.rand(2, 1, 12, 13)
    return [
        (lambda: path_affinity(b[:, 0], 5), r"\(B, 1, h, w\), got shape \(2, 12, 13\)"),
        (lambda: path_affinity(b.expand(2, 3, 12, 13), 5), r"got shape \(2, 3, 12, 13\)"),
        (lambda: path_affinity(b.double(), 5), r"dtype.*torch.float64"),
        (lambda: path_affinity((b * 4).long(), 5), r"dtype.*shape \(2, 1, 12, 13\)"),
        (lambda: path_affinity(b.numpy(), 5), "torch.Tensor"),
        (lambda: path_affinity(b, 0), r"radius must be an int in \[1, 64\]"),
        (lambda: path_affinity(b, 5.0), "radius"),
        (lambda: path_affinity(b, 8), r"12×13 grid is too small for radius 8.*w >= 15"),
        (lambda: path_affinity(b[:, :, :4], 5), r"4×13 grid is too small for radius 5.*h >= 5"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_path_affinity_rejects(index):
    call, pattern = _bad_calls()[index]
    with pytest.raises(ValueError, match=pattern):
        call()
