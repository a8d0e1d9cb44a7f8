"""IRN / PSA affinity targets and losses (wsss_fast.train.affinity) against direct restatements
of the upstream computation written here from reference/affinity_networks.md §1.2-§1.4, §2.2-§2.3
(IRN ``misc/indexing.py``, ``voc12/dataloader.py`` ``GetAffinityLabelFromIndices``,
``net/resnet50_irn.py`` ``to_affinity`` / ``to_pair_displacement``, ``step/train_irn.py``; PSA
``voc12/data.py`` ``ExtractAffinityLabelInRadius`` and the la/ha rule, ``tool/pyutils.py``
``get_indices_of_pairs``, ``train_aff.py``). The restatements loop over offsets and sources;
they share no code with the library. Tiny random inputs, as §5.3 lists the cases."""

from collections import Counter

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import random_image
from tests.oracles.irn_gather import gather_path_max_affinity
from wsss_fast.ops import irn_path_set
from wsss_fast.train import affinity as A

EPS = 1e-5


# ---- restatements ---------------------------------------------------------------------------

def base_offsets(radius):
    """O_R in base order: (0, x) for 1 <= x < R, then rows y = 1..R-1, x = -R+1..R-1 in the disk."""
    out = [(0, x) for x in range(1, radius)]
    out += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius)
            if x * x + y * y < radius * radius]
    return out


def path_cells(dy, dx):
    """Bounding-box cells with squared distance to the line < 1, by decreasing |y| + |x|."""
    cells = [(y, x) for y in range(min(0, dy), max(0, dy) + 1)
             for x in range(min(0, dx), max(0, dx) + 1)
             if (dy * x - dx * y) ** 2 / (dy * dy + dx * dx) < 1]
    return sorted(cells, key=lambda c: -abs(c[0]) - abs(c[1]))


def irn_offsets(radius):
    return sorted(base_offsets(radius), key=lambda o: len(path_cells(*o)))


def sources(h, w, radius):
    rf = radius - 1
    return [(y, x) for y in range(h - rf) for x in range(rf, w - rf)]


def restated_masks(grid, offsets, radius, valid):
    """(O, S) bg+ / fg+ / neg of one label grid, one pair at a time."""
    src = sources(*grid.shape, radius)
    bg, fg, neg = (np.zeros((len(offsets), len(src)), np.float32) for _ in range(3))
    for o, (dy, dx) in enumerate(offsets):
        for s, (y, x) in enumerate(src):
            a, b = int(grid[y, x]), int(grid[y + dy, x + dx])
            if valid(a) and valid(b):
                if a == b:
                    (bg if a == 0 else fg)[o, s] = 1
                else:
                    neg[o, s] = 1
    return bg, fg, neg


def restated_path_max(edge, radius):
    """(B, O, S) ``1 − max over the path of edge`` as a stack of shifted views (autograd-able)."""
    b, h, w = edge.shape
    rf = radius - 1
    rows, cols = h - rf, w - 2 * rf
    out = []
    for dy, dx in irn_offsets(radius):
        stack = torch.stack([edge[:, cy: cy + rows, rf + cx: rf + cx + cols]
                             for cy, cx in path_cells(dy, dx)])
        out.append(1 - stack.amax(dim=0).reshape(b, -1))
    return torch.stack(out, dim=1)


def restated_pair_disp(disp, radius):
    b, _, h, w = disp.shape
    rf = radius - 1
    rows, cols = h - rf, w - 2 * rf
    src = disp[:, :, :rows, rf: rf + cols]
    return torch.stack([(src - disp[:, :, dy: dy + rows, rf + dx: rf + dx + cols]).reshape(b, 2, -1)
                        for dy, dx in irn_offsets(radius)], dim=2)


def restated_irn_loss(logits, disp, bg, fg, neg, radius):
    aff = restated_path_max(torch.sigmoid(logits[:, 0]), radius)
    pos, negative = -torch.log(aff + EPS), -torch.log(1 + EPS - aff)
    l_bg = (bg * pos).sum() / (bg.sum() + EPS)
    l_fg = (fg * pos).sum() / (fg.sum() + EPS)
    l_neg = (neg * negative).sum() / (neg.sum() + EPS)
    pair = restated_pair_disp(disp, radius)
    delta = torch.tensor(irn_offsets(radius), dtype=disp.dtype).t()[None, :, :, None]
    l_dfg = ((pair - delta).abs() * fg[:, None]).sum() / (2 * fg.sum() + EPS)
    l_dbg = (pair.abs() * bg[:, None]).sum() / (2 * bg.sum() + EPS)
    return ((l_bg + l_fg) / 2 + l_neg) / 2 + (l_dfg + l_dbg) / 2


def random_ir_label(rng, height, width, classes=(0, 3, 7), unsure=0.2):
    """Blocky random class map (so that both bg+ and fg+ pairs occur) with random 255s."""
    coarse = rng.choice(classes, size=(height // 16 + 1, width // 16 + 1))
    label = np.kron(coarse, np.ones((16, 16), np.int64))[:height, :width].astype(np.uint8)
    label[rng.random((height, width)) < unsure] = 255
    return label


# ---- tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("radius, count, cells, histogram", [
    (10, 152, 2134, {2: 2, 3: 2, 4: 4, 5: 2, 6: 6, 7: 4, 8: 10, 9: 2, 10: 12, 11: 4, 12: 12,
                     13: 2, 14: 8, 15: 8, 16: 22, 18: 16, 19: 6, 20: 20, 21: 4, 22: 6}),
    (5, 34, 242, {2: 2, 3: 2, 4: 4, 5: 2, 6: 4, 7: 2, 8: 8, 10: 6, 11: 4}),
])
def test_path_tables_and_orders(radius, count, cells, histogram):
    paths = irn_path_set(radius)
    assert len(base_offsets(radius)) == count == paths.num_offsets
    assert paths.num_cells == cells
    assert Counter(len(path_cells(*o)) for o in base_offsets(radius)) == histogram
    assert list(paths.offsets) == irn_offsets(radius)           # IRN: stable sort by length
    assert [list(p) for p in paths.paths] == [path_cells(*o) for o in irn_offsets(radius)]
    src, dst = A.psa_pairs(12, 13) if radius == 5 else A.pair_indices(24, 30, radius, "base")
    h, w = (12, 13) if radius == 5 else (24, 30)
    expected = [[(y + dy) * w + x + dx for y, x in sources(h, w, radius)]
                for dy, dx in base_offsets(radius)]                # PSA: base order
    assert dst.tolist() == expected
    assert src.tolist() == [y * w + x for y, x in sources(h, w, radius)]


def test_path_examples_of_the_reference():
    assert len(path_cells(0, 4)) == 5 and len(path_cells(2, 3)) == 8
    assert len(path_cells(4, -2)) == 11
    assert all(path[0] == o and path[-1] == (0, 0)
               for o, path in zip(irn_path_set(10).offsets, irn_path_set(10).paths))


# ---- IRN targets ----------------------------------------------------------------------------

def test_irn_stride4_sampling_is_pil_nearest():
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (96, 128)).astype(np.uint8)
    pil = np.asarray(PIL.Image.fromarray(full).resize((32, 24), PIL.Image.NEAREST))
    assert np.array_equal(pil, full[2::4, 2::4])       # IRN: pil_rescale(label, 0.25, 0)
    rows = torch.arange(96)[:, None].expand(96, 128) * 128 + torch.arange(128)
    targets = A.irn_targets(rows % 7, radius=5)
    grid = (rows % 7)[2::4, 2::4].numpy()
    bg, fg, neg = restated_masks(grid, irn_offsets(5), 5, lambda v: v < 21)
    assert np.array_equal(targets.bg_pos[0].numpy(), bg)
    assert np.array_equal(targets.fg_pos[0].numpy(), fg)
    assert np.array_equal(targets.neg[0].numpy(), neg)


def test_irn_pair_labels_bit_exact_on_the_training_grid():
    """512 crop → 128² grid, radius 10: (152, 13090) masks equal the pairwise restatement."""
    rng = np.random.default_rng(1)
    full = random_ir_label(rng, 512, 512)
    targets = A.irn_targets(full)
    assert targets.bg_pos.shape == (1, 152, 13090) and targets.bg_pos.dtype == torch.float32
    grid = full[2::4, 2::4]
    # Vectorised restatement here (13090 × 152 pairs): per offset, shifted views of the grid.
    rf = 9
    src = grid[:119, rf:rf + 110].reshape(-1).astype(np.int64)
    for o, (dy, dx) in enumerate(irn_offsets(10)):
        dst = grid[dy:dy + 119, rf + dx:rf + dx + 110].reshape(-1).astype(np.int64)
        valid = (src < 21) & (dst < 21)
        assert np.array_equal(targets.bg_pos[0, o].numpy(), (valid & (src == dst) & (src == 0)))
        assert np.array_equal(targets.fg_pos[0, o].numpy(), (valid & (src == dst) & (src > 0)))
        assert np.array_equal(targets.neg[0, o].numpy(), (valid & (src != dst)))
    total = targets.bg_pos + targets.fg_pos + targets.neg
    assert total.max() == 1 and targets.bg_pos.sum() > 0 and targets.fg_pos.sum() > 0
    assert targets.neg.sum() > 0 and (total == 0).any()     # 255s are ignored


def test_irn_pair_labels_small_grid_loop_restatement():
    rng = np.random.default_rng(2)
    full = random_ir_label(rng, 96, 112, classes=(0, 1, 2, 30))   # 30 >= 21: unsure as upstream
    targets = A.irn_targets(full, radius=10)
    bg, fg, neg = restated_masks(full[2::4, 2::4], irn_offsets(10), 10, lambda v: v < 21)
    assert np.array_equal(targets.bg_pos[0].numpy(), bg)
    assert np.array_equal(targets.fg_pos[0].numpy(), fg)
    assert np.array_equal(targets.neg[0].numpy(), neg)


def test_irn_displacement_target_is_the_offset_in_irn_order():
    targets = A.irn_targets(np.zeros((96, 96), np.uint8))
    assert targets.displacement.shape == (2, 152)
    assert targets.displacement.t().tolist() == [list(map(float, o)) for o in irn_offsets(10)]


def test_irn_targets_reject_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        A.irn_targets(np.zeros((98, 96), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        A.irn_targets(np.zeros((96, 96), np.float32))
    with pytest.raises(ValueError, match="too small"):
        A.irn_targets(np.zeros((32, 32), np.uint8))     # 8×8 grid: empty radius-10 window


# ---- IRN affinity, displacement, loss -------------------------------------------------------

def test_path_max_affinity_equals_restatement_exactly(gen):
    edge = torch.sigmoid(torch.randn(2, 1, 128, 128, generator=gen))
    ours = A.path_max_affinity(edge)
    assert ours.shape == (2, 152, 13090) and ours.dtype == torch.float32
    assert torch.equal(ours, restated_path_max(edge[:, 0], 10))
    assert torch.equal(ours, gather_path_max_affinity(edge[:, 0], 10))   # upstream's gather
    small = torch.rand(1, 20, 24, generator=gen)
    assert torch.equal(A.path_max_affinity(small, radius=5), restated_path_max(small, 5))
    assert torch.equal(A.path_max_affinity(small, radius=5), gather_path_max_affinity(small, 5))


def test_path_max_affinity_gradient_equals_gather_oracle(gen):
    edge = torch.sigmoid(torch.randn(2, 1, 40, 44, generator=gen))
    weights = torch.randn(2, 152, 31 * 26, generator=gen)   # window 31×26
    fused = edge.clone().requires_grad_()
    (A.path_max_affinity(fused) * weights).sum().backward()
    gathered = edge[:, 0].clone().requires_grad_()
    (gather_path_max_affinity(gathered) * weights).sum().backward()
    # Same arg-max cells; only the float32 summation order of each cell's pairs differs.
    assert torch.allclose(fused.grad[:, 0], gathered.grad, atol=1e-5)


def test_pair_displacement_equals_restatement(gen):
    disp = 3 * torch.randn(2, 2, 30, 33, generator=gen)
    assert torch.equal(A.pair_displacement(disp), restated_pair_disp(disp, 10))


def test_irn_loss_value_and_gradient_fp64(gen):
    rng = np.random.default_rng(3)
    full = np.stack([random_ir_label(rng, 96, 120), random_ir_label(rng, 96, 120)])
    targets = A.irn_targets(full)
    logits = torch.randn(2, 1, 24, 30, generator=gen, dtype=torch.float64)
    disp = 3 * torch.randn(2, 2, 24, 30, generator=gen, dtype=torch.float64)
    bg, fg, neg = (torch.from_numpy(np.stack([m[i] for m in (
        restated_masks(f[2::4, 2::4], irn_offsets(10), 10, lambda v: v < 21) for f in full)]))
        .double() for i in range(3))
    ours_in = logits.clone().requires_grad_()
    ours, terms = A.irn_loss(ours_in, disp, targets)
    ref_in = logits.clone().requires_grad_()
    ref = restated_irn_loss(ref_in, disp, bg, fg, neg, 10)
    assert ours.dtype == torch.float64
    assert abs(ours.item() - ref.item()) <= 1e-12 * abs(ref.item())
    assert set(terms) == {"bg", "fg", "neg", "disp_fg", "disp_bg"}
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, ours_in), torch.autograd.grad(ref, ref_in)
    assert (g_ours - g_ref).abs().max() <= 1e-14 and g_ref.abs().max() > 0


def test_irn_loss_fp32(gen):
    targets = A.irn_targets(random_ir_label(np.random.default_rng(4), 96, 96))
    logits = torch.randn(1, 1, 24, 24, generator=gen)
    disp = torch.randn(1, 2, 24, 24, generator=gen)
    ours, _ = A.irn_loss(logits, disp, targets)
    ref = restated_irn_loss(logits, disp, targets.bg_pos, targets.fg_pos, targets.neg, 10)
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) <= 1e-5 * ref.item()


def test_displacement_sanity():
    """One instance, D(p) = c − p: every pair's P − δ is 0; a constant field: P = 0."""
    h, w = 24, 30
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    centre = torch.stack([7.0 - ys, 11.0 - xs])[None]
    pair = A.pair_displacement(centre)
    delta = A.irn_targets(np.zeros((4 * h, 4 * w), np.uint8)).displacement.double()
    assert torch.equal(pair, delta[None, :, :, None].expand_as(pair))
    targets = A.irn_targets(np.full((4 * h, 4 * w), 5, np.uint8))     # all fg+
    _, terms = A.irn_loss(torch.zeros(1, 1, h, w, dtype=torch.float64), centre, targets)
    assert terms["disp_fg"] == 0.0 and targets.fg_pos.sum() > 0
    targets = A.irn_targets(np.zeros((4 * h, 4 * w), np.uint8))       # all bg+
    _, terms = A.irn_loss(torch.zeros(1, 1, h, w), torch.full((1, 2, h, w), 2.5), targets)
    assert terms["disp_bg"] == 0.0


def test_irn_loss_rejects_mismatched_grids(gen):
    targets = A.irn_targets(np.zeros((96, 96), np.uint8))
    with pytest.raises(ValueError, match="differ"):
        A.irn_loss(torch.zeros(1, 1, 28, 28), torch.zeros(1, 2, 28, 28), targets)


# ---- PSA ------------------------------------------------------------------------------------

def restated_psa_label(la, ha):
    """PSA voc12/data.py: block means (block_reduce, zero-padded), argmax, 255/0 rule."""
    def block_mean(x):
        k, h, w = x.shape
        padded = np.zeros((k, -(-h // 8) * 8, -(-w // 8) * 8), np.float64)
        padded[:, :h, :w] = x
        return padded.reshape(k, padded.shape[1] // 8, 8, padded.shape[2] // 8, 8).mean((2, 4))
    la, ha = block_mean(la), block_mean(ha)
    no_score = np.concatenate([la, ha]).max(axis=0) < 1e-5
    la_arg, ha_arg = la.argmax(0), ha.argmax(0)
    label = la_arg.copy()
    label[la_arg == 0] = 255
    label[ha_arg == 0] = 0
    label[no_score] = 255
    return label.astype(np.uint8)


def random_la_ha(rng, k, h, w):
    la = rng.random((k, h, w)).astype(np.float32)
    ha = rng.random((k, h, w)).astype(np.float32)
    la[0] *= 0.9                      # la: bg less likely, ha: bg more likely
    ha[0] += 0.1
    la[:, :, -40:] = 0                # zeroed strip: the crop padding → 255
    ha[:, :, -40:] = 0
    return la, ha


def test_psa_label_matches_restatement_incl_no_score_rule():
    rng = np.random.default_rng(5)
    la, ha = random_la_ha(rng, 4, 448, 448)
    ours = A.psa_label(la, ha)
    assert ours.shape == (1, 56, 56) and ours.dtype == torch.uint8
    ref = restated_psa_label(la, ha)
    assert np.array_equal(ours[0].numpy(), ref)
    assert set(np.unique(ref)) >= {0, 1, 255} and (ref[:, -5:] == 255).all()
    odd = A.psa_label(la[:, :100, :90], ha[:, :100, :90])          # zero-padded blocks
    assert np.array_equal(odd[0].numpy(), restated_psa_label(la[:, :100, :90], ha[:, :100, :90]))


def test_psa_pairs_bit_exact():
    rng = np.random.default_rng(6)
    la, ha = random_la_ha(rng, 3, 448, 448)
    label = restated_psa_label(la, ha)
    targets = A.psa_targets(label)
    assert targets.bg_pos.shape == (1, 34, 2496)
    bg, fg, neg = restated_masks(label, base_offsets(5), 5, lambda v: v != 255)
    assert np.array_equal(targets.bg_pos[0].numpy(), bg)
    assert np.array_equal(targets.fg_pos[0].numpy(), fg)
    assert np.array_equal(targets.neg[0].numpy(), neg)
    valid = sum(int(label[y, x] != 255 and label[y + dy, x + dx] != 255)
                for dy, dx in base_offsets(5) for y, x in sources(56, 56, 5))
    assert (targets.bg_pos + targets.fg_pos + targets.neg).sum() == valid


def test_psa_loss_matches_restatement(gen):
    rng = np.random.default_rng(7)
    label = restated_psa_label(*random_la_ha(rng, 3, 160, 160))
    targets = A.psa_targets(label)
    aff = torch.rand(targets.bg_pos.shape, generator=gen, dtype=torch.float64)
    ours, terms = A.psa_loss(aff, targets)
    bg, fg, neg = (t.double() for t in (targets.bg_pos, targets.fg_pos, targets.neg))
    ref = ((-bg * torch.log(aff + EPS)).sum() / (bg.sum() + EPS) / 4
           + (-fg * torch.log(aff + EPS)).sum() / (fg.sum() + EPS) / 4
           + (-neg * torch.log(1 + EPS - aff)).sum() / (neg.sum() + EPS) / 2)
    assert abs(ours.item() - ref.item()) <= 1e-12 * ref.item()
    assert terms["bg"] > 0 and terms["fg"] > 0 and terms["neg"] > 0


def test_psa_label_scores_la_is_more_foreground_than_ha(gen):
    image = random_image(gen, 40, 48)
    rng = np.random.default_rng(8)
    cams = rng.random((2, 40, 48)).astype(np.float32)
    la, ha = A.psa_label_scores(image, cams, [5, 2])
    assert la.shape == ha.shape == (3, 40, 48) and la.dtype == np.float32
    np.testing.assert_allclose(la.sum(0), 1, atol=1e-4)
    # (1 − m)^4 >= (1 − m)^32: la has the larger background (its foreground is confident).
    assert la[0].mean() > ha[0].mean()
    swapped = A.psa_label_scores(image, cams[::-1].copy(), [2, 5])
    np.testing.assert_allclose(swapped[0], la, atol=1e-6)      # classes in ascending key order
