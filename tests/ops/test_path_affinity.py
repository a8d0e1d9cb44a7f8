"""``path_affinity`` and IRN's path set: the offsets, path cells and source window against
reference affinity_networks.md §1.2's numbers; every face of the op against the gather + max
reference (values, arg-max ties, gradients), an independent restatement of IRN's
``PathIndex`` / ``to_affinity``, validation and the torch.library registration."""

from collections import Counter

import pytest
import torch

from wsss_fast.ops.irn_paths import irn_path, irn_path_set
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
