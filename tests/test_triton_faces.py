"""Triton faces (wsss_fast.kernels) against the reference faces, in the Triton interpreter.

Small odd sizes (P not a multiple of any tile, tiles forced down to 16 so every loop runs several
blocks), fp32 (rtol 1e-5 of the output's scale) and fp16 (3e-3); bf16 is not tested because the
interpreter mishandles it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (the Triton faces need it)")

if importlib.util.find_spec("triton") is not None:
    from wsss_fast.kernels.attention_stats import attention_stats_triton
    from wsss_fast.kernels.class_patch_reweight import class_patch_reweight_triton
    from wsss_fast.kernels.multiscale_merge import multiscale_merge_triton
    from wsss_fast.kernels.propagate import propagate_streaming_triton, propagate_triton

import wsss_fast.ops as ops
from wsss_fast.ops.multiscale_merge import DEFAULT_EPS

RTOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def assert_close_scaled(actual, expected, rtol):
    """Elementwise |a − e| ≤ rtol·(|e| + max|e|): relative to the output's scale, never on zeros."""
    assert not torch.isnan(actual).any(), "NaN in the output"
    assert actual.dtype == expected.dtype
    scale = expected.float().abs().max().item()
    assert scale > 0, "the expected output is all zeros: a useless comparison"
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=rtol * scale)


def max_rel_error(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# --------------------------------------------------------------------------- attention_stats

ATTENTION_CASES = [
    # B, H, C, P, d, dtype, block_m, block_n
    (2, 3, 5, 37, 24, torch.float32, 16, 16),
    (1, 4, 20, 61, 64, torch.float32, 16, 16),
    (2, 2, 1, 50, 40, torch.float16, None, None),
    (2, 3, 3, 50, 17, torch.float16, 16, 16),
    (1, 2, 2, 19, 1, torch.float32, None, None),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"C{c[2]}P{c[3]}d{c[4]}{c[5]}")
def test_attention_stats_matches_reference(case):
    batch, heads, num_cls, patches, dim, dtype, block_m, block_n = case
    torch.manual_seed(1000 + patches * 7 + dim)
    tokens = num_cls + patches
    q, k, v = (2 * torch.randn(batch, heads, tokens, dim).to(dtype) for _ in range(3))
    # Prefilled like a running sum, on the scale of the increments (~1/T): they must be added to.
    prefill = [torch.rand(batch, num_cls, patches) / tokens,
               torch.rand(batch, patches, patches) / tokens, torch.rand(batch, patches) / tokens]
    mine = [t.clone() for t in prefill]
    theirs = [t.clone() for t in prefill]
    weights = (0.5, 1.0, 1 / 3)
    scale = dim ** -0.5

    out = attention_stats_triton(q, k, v, scale, num_cls, mine[0], weights[0], mine[1], weights[1],
                                 mine[2], weights[2], block_m=block_m, block_n=block_n)
    expected = ops.attention_stats_reference(q, k, v, scale, num_cls, theirs[0], weights[0],
                                             theirs[1], weights[1], theirs[2], weights[2])
    assert out.shape == q.shape
    assert_close_scaled(out, expected, RTOL[dtype])
    # The statistics are fp32 math on the same inputs whatever q's dtype: hold them to 1e-5.
    for before, got, want in zip(prefill, mine, theirs):
        assert_close_scaled(got - before, want - before, 1e-5)
        assert_close_scaled(got, want, 1e-5)


def test_attention_stats_without_class_tokens():
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 3, 45, 8) for _ in range(3))
    patch2patch = torch.rand(2, 45, 45) / 45
    expected_acc = patch2patch.clone()
    out = attention_stats_triton(q, k, v, 0.3, 0, None, 0.0, patch2patch, 0.25, None, 0.0,
                                 block_m=16, block_n=32)
    expected = ops.attention_stats_reference(q, k, v, 0.3, 0, None, 0.0, expected_acc, 0.25)
    assert_close_scaled(out, expected, 1e-5)
    assert_close_scaled(patch2patch, expected_acc, 1e-5)


@pytest.mark.parametrize("enabled", ["cls2patch", "patch2patch", "cls_row"])
def test_attention_stats_skips_none_and_zero_weight(enabled):
    """Only the enabled statistic changes; weight-0 and None accumulators stay bit-identical."""
    torch.manual_seed(11)
    num_cls, patches = 20, 29  # C > BLOCK_M: some row blocks hold class rows only
    q, k, v = (torch.randn(1, 2, num_cls + patches, 16) for _ in range(3))
    tokens = num_cls + patches
    tensors = {"cls2patch": torch.rand(1, num_cls, patches) / tokens,
               "patch2patch": torch.rand(1, patches, patches) / tokens,
               "cls_row": torch.rand(1, patches) / tokens}
    before = {name: t.clone() for name, t in tensors.items()}
    expected = {name: t.clone() for name, t in tensors.items()}
    args = []
    for name in ("cls2patch", "patch2patch", "cls_row"):
        args += [tensors[name], 0.75 if name == enabled else 0.0]
    out = attention_stats_triton(q, k, v, 0.25, num_cls, *args, block_m=16, block_n=16)
    ref_args = []
    for name in ("cls2patch", "patch2patch", "cls_row"):
        ref_args += [expected[name], 0.75 if name == enabled else 0.0]
    assert_close_scaled(out, ops.attention_stats_reference(q, k, v, 0.25, num_cls, *ref_args), 1e-5)
    for name, tensor in tensors.items():
        if name == enabled:
            assert_close_scaled(tensor - before[name], expected[name] - before[name], 1e-5)
        else:
            assert torch.equal(tensor, before[name]), f"{name} was touched"
    # None accumulators, only o.
    out_only = attention_stats_triton(q, k, v, 0.25, num_cls, None, 1.0, None, 1.0, None, 1.0)
    assert_close_scaled(out_only, out, 1e-5)


def test_attention_stats_uniform_attention_by_hand():
    """q = 0 makes every row uniform: A = 1/T, o = mean of v over tokens."""
    batch, heads, num_cls, patches, dim = 1, 2, 2, 21, 5
    tokens = num_cls + patches
    q = torch.zeros(batch, heads, tokens, dim)
    k = torch.randn(batch, heads, tokens, dim)
    v = torch.randn(batch, heads, tokens, dim)
    cls2patch = torch.ones(batch, num_cls, patches)
    patch2patch = torch.zeros(batch, patches, patches)
    cls_row = torch.zeros(batch, patches)
    out = attention_stats_triton(q, k, v, 1.0, num_cls, cls2patch, 2.0, patch2patch, 1.0, cls_row,
                                 0.5, block_m=16, block_n=16)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls2patch, torch.full_like(cls2patch, 1 + 2 / tokens))
    torch.testing.assert_close(patch2patch, torch.full_like(patch2patch, 1 / tokens))
    torch.testing.assert_close(cls_row, torch.full_like(cls_row, 0.5 / tokens))


# ----------------------------------------------------------------------- class_patch_reweight

def _reweight_rows(dtype):
    attn = torch.rand(7, 53) - 0.2  # some negatives: treated as 0
    attn[2] = 0.0                    # all-zero row -> 0
    attn[3] = -torch.rand(53)        # all-negative row -> 0
    attn[4] = 0.0
    attn[4, 40] = 0.7                # one positive entry keeps the row mass there
    attn[5] *= 1e-3                  # small values: the power is taken relative to the row max
    return attn.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gamma", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("fuse", ["plain", "patchcam", "patchcam_sqrt", "sqrt"])
def test_class_patch_reweight_matches_reference(dtype, gamma, fuse):
    torch.manual_seed(int(gamma * 10) + len(fuse))
    attn = _reweight_rows(dtype)
    patchcam = torch.randn(attn.shape).to(dtype) if "patchcam" in fuse else None
    take_sqrt = "sqrt" in fuse
    expected = ops.class_patch_reweight_reference(attn, gamma, patchcam, take_sqrt)
    for block_n in (16, None):  # several column blocks, and one
        out = class_patch_reweight_triton(attn, gamma, patchcam, take_sqrt, block_n=block_n)
        assert_close_scaled(out, expected, RTOL[dtype])
        assert torch.all(out[2:4] == 0)


def test_class_patch_reweight_identity_and_mass():
    torch.manual_seed(3)
    attn = _reweight_rows(torch.float32)
    relu = attn.clamp_min(0)
    torch.testing.assert_close(class_patch_reweight_triton(attn, 1.0), relu, rtol=1e-5, atol=1e-7)
    sharpened = class_patch_reweight_triton(attn, 3.0, block_n=16)
    torch.testing.assert_close(sharpened.sum(-1), relu.sum(-1), rtol=1e-5, atol=1e-7)
    # gamma > 1 moves mass towards the row max.
    row = 0
    top = relu[row].argmax()
    assert sharpened[row, top] > relu[row, top]


# ---------------------------------------------------------------------------------- propagate

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("patches,classes", [(45, 1), (50, 21), (19, 80)])
def test_propagate_matches_reference(dtype, patches, classes):
    torch.manual_seed(patches + classes)
    affinity = torch.rand(2, patches, patches).to(dtype)
    cam = torch.randn(2, patches, classes).to(dtype)
    expected = ops.propagate_reference(affinity, cam)
    for blocks in ({"block_m": 16, "block_n": 16, "block_k": 16}, {}):
        out = propagate_triton(affinity, cam, **blocks)
        assert out.shape == cam.shape
        assert_close_scaled(out, expected, RTOL[dtype])


STREAMING_CASES = [
    # C, P, K, q dtype, cam dtype
    (0, 37, 1, torch.float32, torch.float32),
    (1, 40, 21, torch.float32, torch.float32),
    (4, 37, 3, torch.float16, torch.float16),
    (2, 33, 5, torch.float16, torch.float32),
]


@pytest.mark.parametrize("case", STREAMING_CASES,
                         ids=lambda c: f"C{c[0]}P{c[1]}K{c[2]}{c[3]}{c[4]}")
def test_propagate_streaming_matches_reference(case):
    num_cls, patches, classes, dtype, cam_dtype = case
    torch.manual_seed(num_cls * 100 + patches)
    layers, batch, heads, dim = 3, 2, 2, 20
    tokens = num_cls + patches
    q = (2 * torch.randn(layers, batch, heads, tokens, dim)).to(dtype)
    k = (2 * torch.randn(layers, batch, heads, tokens, dim)).to(dtype)
    cam = torch.randn(batch, patches, classes).to(cam_dtype)
    weights = [0.5, 0.0, 1.0]
    expected = ops.propagate_streaming_reference(q, k, cam, dim ** -0.5, num_cls, weights)
    out = propagate_streaming_triton(q, k, cam, dim ** -0.5, num_cls, weights, block_m=16,
                                     block_n=16)
    assert out.dtype == cam_dtype
    assert_close_scaled(out, expected, RTOL[cam_dtype] if dtype == torch.float32 else 3e-3)


def test_propagate_streaming_zero_weights_and_dense_agreement():
    torch.manual_seed(5)
    layers, batch, heads, num_cls, patches, dim, classes = 2, 1, 3, 2, 30, 12, 4
    q = torch.randn(layers, batch, heads, num_cls + patches, dim)
    k = torch.randn(layers, batch, heads, num_cls + patches, dim)
    cam = torch.randn(batch, patches, classes)
    zeros = propagate_streaming_triton(q, k, cam, 0.3, num_cls, [0.0, 0.0])
    assert torch.equal(zeros, torch.zeros_like(cam))
    # Streaming == dense propagate of the affinity accumulated by attention_stats.
    affinity = torch.zeros(batch, patches, patches)
    for layer in range(layers):
        attention_stats_triton(q[layer], k[layer], q[layer], 0.3, num_cls, None, 0.0, affinity, 1.0,
                               None, 0.0)
    dense = propagate_triton(affinity, cam)
    streaming = propagate_streaming_triton(q, k, cam, 0.3, num_cls, [1.0, 1.0])
    assert_close_scaled(streaming, dense, 1e-5)


# --------------------------------------------------------------------------- multiscale_merge

def _passes(batch, classes):
    # Down-sampled, up-sampled and same-size passes, each as an (image, flipped) pair.
    sizes = [(7, 9), (40, 50), (29, 37)]
    maps, flips = [], []
    for h, w in sizes:
        maps += [torch.randn(batch, classes, h, w), torch.randn(batch, classes, h, w)]
        flips += [False, True]
    return maps, flips


@pytest.mark.parametrize("merge", ["sum", "max_flip"])
@pytest.mark.parametrize("norm", ["none", "minmax", "max", "transcam"])
def test_multiscale_merge_matches_reference(merge, norm):
    torch.manual_seed(len(merge) * 10 + len(norm))
    batch, classes, out_h, out_w = 2, 3, 29, 37
    maps, flips = _passes(batch, classes)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    eps = DEFAULT_EPS[norm]
    # ReLU with labels for some norms, without for the others: every (relu, labels) pair is run.
    relu_first = norm in ("none", "max")
    for relu, plane_labels in ((relu_first, labels), (not relu_first, None)):
        expected = ops.multiscale_merge_reference(maps, flips, out_h, out_w, relu, plane_labels,
                                                  merge, norm, eps)
        out = multiscale_merge_triton(maps, flips, out_h, out_w, relu, plane_labels, merge, norm,
                                      eps, block_h=32)
        assert out.shape == (batch, classes, out_h, out_w) and out.dtype == torch.float32
        assert_close_scaled(out, expected, 1e-5)


def test_multiscale_merge_small_tiles_cross_tile_range():
    """Min/max reductions across many tiles; one flipped pass; an odd output size."""
    torch.manual_seed(9)
    maps = [torch.randn(1, 5, 6, 5) + 0.3]
    for norm in ("minmax", "transcam"):
        expected = ops.multiscale_merge_reference(maps, [True], 23, 19, False, None, "sum", norm,
                                                  1e-5)
        out = multiscale_merge_triton(maps, [True], 23, 19, False, None, "sum", norm, 1e-5,
                                      block_h=4, block_w=16)
        assert_close_scaled(out, expected, 1e-5)


def test_multiscale_merge_by_hand():
    # 1×2 map to 1×4: source x = (x + 0.5)/2 − 0.5 = [-0.25→0, 0.25, 0.75, 1.25→edge].
    a, b = 2.0, -6.0
    cam = torch.tensor([a, b]).reshape(1, 1, 1, 2)
    row = [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]
    out = multiscale_merge_triton([cam], [False], 1, 4, False, None, "sum", "none", 0.0)
    torch.testing.assert_close(out.flatten(), torch.tensor(row))
    # A flipped pass is mirrored; ReLU; sum of the two; max normalization.
    out = multiscale_merge_triton([cam, cam], [False, True], 1, 4, True, None, "sum", "max", 0.0)
    merged = torch.tensor(row).relu() + torch.tensor(row[::-1]).relu()
    torch.testing.assert_close(out.flatten(), merged / merged.max())
    # An all-zero plane under "max" with eps 0 stays 0 (no 0/0).
    out = multiscale_merge_triton([cam], [False], 1, 4, False, torch.zeros(1, 1), "sum", "max", 0.0)
    assert torch.equal(out, torch.zeros_like(out))
    # Same size, unflipped: the map itself.
    cam = torch.randn(2, 3, 5, 7)
    out = multiscale_merge_triton([cam], [False], 5, 7, False, None, "sum", "none", 0.0)
    assert torch.equal(out, cam)


# ------------------------------------------------------------- public ops with the face forced

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
