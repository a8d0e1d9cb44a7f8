"""Hand-computed tiny cases: they check the reference faces (the specification every other face
is tested against) against the formulas of DESIGN §3, computed independently with Python floats."""

import math

import pytest
import torch

from wsss_fast.ops import (attention_stats_reference, class_patch_reweight_reference,
                           multiscale_merge_reference, propagate_reference,
                           propagate_streaming_reference)


def softmax_py(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def test_attention_stats_reference_by_hand():
    # B=1, H=2, T=3 (C=1 class token, P=2 patches), d=1, scale 0.5.
    qs = [[1.0, -2.0, 0.5], [0.3, 0.0, -1.0]]
    ks = [[2.0, 1.0, -1.0], [-0.5, 1.5, 2.0]]
    vs = [[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]]
    q, k, v = (torch.tensor(x).reshape(1, 2, 3, 1) for x in (qs, ks, vs))
    attn = [[softmax_py([qs[h][i] * ks[h][j] * 0.5 for j in range(3)]) for i in range(3)]
            for h in range(2)]
    c2p, p2p, row = torch.ones(1, 1, 2), torch.ones(1, 2, 2), torch.ones(1, 2)
    out = attention_stats_reference(q, k, v, 0.5, 1, c2p, 2.0, p2p, 0.5, row, 3.0)
    for h in range(2):
        for i in range(3):
            expected = sum(attn[h][i][j] * vs[h][j] for j in range(3))
            assert out[0, h, i, 0].item() == pytest.approx(expected, rel=1e-6)
    mean = [[(attn[0][i][j] + attn[1][i][j]) / 2 for j in range(3)] for i in range(3)]
    for j in range(2):
        assert c2p[0, 0, j].item() == pytest.approx(1 + 2.0 * mean[0][1 + j], rel=1e-6)
        assert row[0, j].item() == pytest.approx(1 + 3.0 * mean[0][1 + j], rel=1e-6)
        for i in range(2):
            assert p2p[0, i, j].item() == pytest.approx(1 + 0.5 * mean[1 + i][1 + j], rel=1e-6)


def test_attention_stats_reference_uniform_attention():
    # q = 0: every row attends uniformly over all T keys, class keys included.
    b, h, t, d, c = 2, 3, 7, 4, 2
    v = torch.randn(b, h, t, d)
    p2p = torch.zeros(b, t - c, t - c)
    out = attention_stats_reference(torch.zeros(b, h, t, d), torch.randn(b, h, t, d), v, 1.0, c,
                                    None, 0.0, p2p, 1.0)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(v))
    torch.testing.assert_close(p2p, torch.full_like(p2p, 1 / t))


@pytest.mark.parametrize("row, gamma, expected", [
    ([1.0, 3.0], 2.0, [0.4, 3.6]),            # mass 4, squares 1, 9
    ([1.0, 3.0], 1.0, [1.0, 3.0]),            # gamma 1 is the identity
    ([4.0, 1.0], 0.5, [5 * 2 / 3, 5 / 3]),    # sqrt: 2, 1 -> mass 5 split 2:1
    ([0.0, 0.0], 3.0, [0.0, 0.0]),            # zero row stays zero
    ([-1.0, 2.0], 2.0, [0.0, 2.0]),           # negatives count as 0
])
def test_class_patch_reweight_reference_by_hand(row, gamma, expected):
    out = class_patch_reweight_reference(torch.tensor([row]), gamma)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_class_patch_reweight_reference_fusions():
    attn, patchcam = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, -1.0]])
    torch.testing.assert_close(class_patch_reweight_reference(attn, 2.0, patchcam),
                               torch.tensor([[0.8, 0.0]]))
    torch.testing.assert_close(class_patch_reweight_reference(attn, 2.0, patchcam, sqrt=True),
                               torch.tensor([[math.sqrt(0.8), 0.0]]))


def test_class_patch_reweight_keeps_row_mass_and_sharpens(gen):
    attn = torch.rand(3, 5, 17, generator=gen)
    out = class_patch_reweight_reference(attn, 2.0)
    torch.testing.assert_close(out.sum(-1), attn.sum(-1))
    top = attn.argmax(-1, keepdim=True)
    assert (out.gather(-1, top) > attn.gather(-1, top)).all()


def test_propagate_reference_by_hand():
    affinity = torch.tensor([[[1.0, 2.0], [0.5, 0.0]]])
    cam = torch.tensor([[[1.0, -1.0, 3.0], [2.0, 4.0, 0.0]]])
    expected = torch.tensor([[[5.0, 7.0, 3.0], [0.5, -0.5, 1.5]]])
    torch.testing.assert_close(propagate_reference(affinity, cam), expected)


def test_propagate_streaming_reference_uniform_attention():
    # q = 0: softmax rows are 1/T over all keys, so every patch row gets Σ_j cam[j] / T per block.
    layers, b, h, t, d, c = 3, 2, 2, 9, 4, 3
    cam = torch.randn(b, t - c, 5)
    weights = [1.0, 0.0, 0.5]
    out = propagate_streaming_reference(torch.zeros(layers, b, h, t, d),
                                        torch.randn(layers, b, h, t, d), cam, 1.0, c, weights)
    expected = (cam.sum(dim=1, keepdim=True) / t * sum(weights)).expand_as(cam)
    torch.testing.assert_close(out, expected)


def test_propagate_streaming_equals_dense_of_accumulated_affinity(gen):
    layers, b, h, t, d, c = 4, 2, 3, 13, 8, 2
    q, k = torch.randn(layers, b, h, t, d, generator=gen), torch.randn(layers, b, h, t, d, generator=gen)
    cam = torch.randn(b, t - c, 4, generator=gen)
    weights = [0.25, 0.0, 1.0, 2.0]
    affinity = torch.zeros(b, t - c, t - c)
    for layer in range(layers):
        attention_stats_reference(q[layer], k[layer], k[layer], 0.3, c, None, 0.0, affinity,
                                  weights[layer])
    torch.testing.assert_close(propagate_streaming_reference(q, k, cam, 0.3, c, weights),
                               propagate_reference(affinity, cam))


def merge(maps, flips, size, relu=False, labels=None, merge_rule="sum", norm="none", eps=0.0):
    return multiscale_merge_reference(maps, flips, size[0], size[1], relu, labels, merge_rule,
                                      norm, eps)


def test_multiscale_merge_reference_bilinear_and_flip_by_hand():
    cam = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)
    # align_corners=False, 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (edge).
    torch.testing.assert_close(merge([cam], [False], (1, 4)).flatten(),
                               torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(merge([cam], [True], (1, 4)).flatten(),
                               torch.tensor([1.0, 0.75, 0.25, 0.0]))


def test_multiscale_merge_reference_sum_vs_max_flip():
    a = torch.tensor([1.0, 5.0]).reshape(1, 1, 1, 2)
    b = torch.tensor([4.0, 0.0]).reshape(1, 1, 1, 2)     # flipped pass: back in place, [0, 4]
    torch.testing.assert_close(merge([a, b], [False, True], (1, 2)).flatten(),
                               torch.tensor([1.0, 9.0]))
    torch.testing.assert_close(merge([a, b], [False, True], (1, 2), merge_rule="max_flip").flatten(),
                               torch.tensor([1.0, 5.0]))
    neg = torch.tensor([-3.0, 2.0]).reshape(1, 1, 1, 2)
    torch.testing.assert_close(merge([neg, neg], [False, False], (1, 2), relu=True).flatten(),
                               torch.tensor([0.0, 4.0]))


def test_multiscale_merge_reference_normalizations_by_hand():
    x = torch.tensor([-1.0, 0.5, 2.0]).reshape(1, 1, 1, 3)
    torch.testing.assert_close(merge([x], [False], (1, 3), norm="minmax", eps=1e-8).flatten(),
                               torch.tensor([0.0, 1.5 / 3, 1.0]))
    torch.testing.assert_close(merge([x], [False], (1, 3), norm="max", eps=1e-5).flatten(),
                               torch.tensor([-1.0, 0.5, 2.0]) / (2.0 + 1e-5))
    eps = 1e-5
    expected = torch.tensor([-eps, 0.5 - eps, 2.0 - eps]) / (2.0 + eps)  # clipped to [0, .5, 2]
    torch.testing.assert_close(merge([x], [False], (1, 3), norm="transcam", eps=eps).flatten(),
                               expected)
    # TransCAM's quirk: an all-<=0 plane comes out as a constant -1.
    torch.testing.assert_close(merge([-x.abs()], [False], (1, 3), norm="transcam", eps=eps),
                               torch.full((1, 1, 1, 3), -1.0))


def test_multiscale_merge_reference_labels_zero_absent_classes(gen):
    maps = [torch.rand(1, 2, 3, 3, generator=gen) + 0.1]
    out = merge(maps, [False], (4, 4), labels=torch.tensor([[1.0, 0.0]]), norm="minmax", eps=1e-8)
    assert out[0, 1].abs().max() == 0
    assert out[0, 0].max().item() == pytest.approx(1.0, abs=1e-6)
    assert out[0, 0].min().item() == pytest.approx(0.0, abs=1e-6)
