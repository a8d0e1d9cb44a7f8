"""The C++ CPU faces against the reference faces: fresh random inputs, odd sizes (T = 20+713,
80+1850, P never a multiple of the 32-row tile), poisoned accumulators and heaps, fp32/fp16/bf16."""

import pytest
import torch

from tests.helpers import assert_rel_close, poison_heap, poisoned_accumulators, randn
from wsss_fast import ops
from wsss_fast.ops import _backend

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def cpu_face(monkeypatch):
    """Every call in this module must run the C++ face (a missing build is a failure here)."""
    assert _backend.cpu_extension_error() is None, _backend.cpu_extension_error()
    monkeypatch.setenv("WSSS_FAST_BACKEND", "cpu")


@pytest.mark.parametrize("b, h, c, p, d", [
    (1, 2, 20, 713, 16),
    (1, 1, 80, 1850, 8),
    (2, 3, 1, 33, 24),
    (3, 2, 0, 45, 5),
    (1, 6, 5, 1, 64),
])
def test_attention_stats_cpu_matches_reference(gen, b, h, c, p, d):
    t = c + p
    q, k, v = (randn(gen, b, h, t, d) for _ in range(3))
    shapes = [(b, c, p), (b, p, p), (b, p)]
    accs = poisoned_accumulators(gen, *shapes)
    expected = [a.clone() for a in accs]
    has_cls = c > 0
    kwargs = dict(cls2patch=accs[0] if has_cls else None, cls2patch_weight=1 / 3,
                  patch2patch=accs[1], patch2patch_weight=0.5,
                  cls_row=accs[2] if has_cls else None, cls_row_weight=2.0)
    ref_out = ops.attention_stats_reference(q, k, v, d ** -0.5, c,
                                            expected[0] if has_cls else None, 1 / 3, expected[1],
                                            0.5, expected[2] if has_cls else None, 2.0)
    poison_heap(q.numel())
    out = ops.attention_stats(q, k, v, d ** -0.5, c, **kwargs)
    assert_rel_close(out, ref_out, what="o")
    for name, got, want in zip(("cls2patch", "patch2patch", "cls_row"), accs, expected):
        if has_cls or name == "patch2patch":
            assert_rel_close(got, want, 1e-5, what=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_stats_cpu_low_precision_inputs(gen, dtype):
    b, h, c, p, d = 2, 2, 3, 40, 16
    q, k, v = (randn(gen, b, h, c + p, d, dtype=dtype) for _ in range(3))
    c2p, c2p_ref = torch.zeros(b, c, p), torch.zeros(b, c, p)
    out = ops.attention_stats(q, k, v, 0.25, c, cls2patch=c2p)
    ref = ops.attention_stats_reference(q, k, v, 0.25, c, c2p_ref, 1.0)
    assert out.dtype == dtype
    assert_rel_close(out, ref, TOL[dtype], what="o")
    assert_rel_close(c2p, c2p_ref, 1e-5, what="cls2patch")  # fp32 softmax of exact inputs


def test_attention_stats_cpu_skips_zero_weight_and_missing_accumulators(gen):
    q, k, v = (randn(gen, 1, 2, 37, 8) for _ in range(3))
    c2p = torch.randn(1, 4, 33, generator=gen)
    before = c2p.clone()
    ops.attention_stats(q, k, v, 0.3, 4, cls2patch=c2p, cls2patch_weight=0.0)
    assert torch.equal(c2p, before)


def test_attention_stats_accumulates_across_blocks(gen):
    """AttentionStats over several blocks equals the summed / averaged reference statistics."""
    blocks, b, h, c, p, d = 4, 2, 2, 3, 29, 8
    stats = ops.AttentionStats.allocate(b, c, p, blocks, cls2patch_layers=2,
                                        patch2patch_layers="all", patch2patch_reduce="mean")
    c2p_ref, p2p_ref = torch.zeros(b, c, p), torch.zeros(b, p, p)
    for i in range(blocks):
        q, k, v = (randn(gen, b, h, c + p, d) for _ in range(3))
        ops.attention_stats(q, k, v, 0.35, c, **stats.block_kwargs(i))
        ops.attention_stats_reference(q, k, v, 0.35, c, c2p_ref, float(i >= blocks - 2), p2p_ref,
                                      1 / blocks)
    assert_rel_close(stats.cls2patch, c2p_ref, what="cls2patch")
    assert_rel_close(stats.patch2patch, p2p_ref, what="patch2patch")
    assert stats.cls_row is None


@pytest.mark.parametrize("shape", [(2, 20, 713), (1, 1, 1), (3, 45, 7), (4000, 3)])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.7])
def test_class_patch_reweight_cpu_matches_reference(gen, shape, gamma):
    attn = torch.rand(*shape, generator=gen) ** 3  # attention-like: many small, few large
    if attn.numel() > shape[-1]:
        attn.view(-1, shape[-1])[0] = 0.0           # one all-zero row
    poison_heap(attn.numel())
    assert_rel_close(ops.class_patch_reweight(attn, gamma),
                     ops.class_patch_reweight_reference(attn, gamma), what="phi")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_class_patch_reweight_cpu_fused_patchcam_and_sqrt(gen, dtype):
    attn = torch.rand(2, 20, 7 * 9, generator=gen).to(dtype)
    patchcam = torch.randn(2, 20, 7, 9, generator=gen).to(dtype)
    for take_sqrt in (False, True):
        out = ops.class_patch_reweight(attn, 1.8, patchcam=patchcam, sqrt=take_sqrt)
        ref = ops.class_patch_reweight_reference(attn, 1.8, patchcam.reshape(attn.shape),
                                                 take_sqrt)
        assert_rel_close(out, ref, TOL[dtype], what=f"sqrt={take_sqrt}")


@pytest.mark.parametrize("b, p, k", [(1, 713, 20), (2, 97, 1), (1, 1850, 21)])
def test_propagate_cpu_matches_reference(gen, b, p, k):
    affinity, cam = torch.rand(b, p, p, generator=gen), randn(gen, b, p, k)
    poison_heap(cam.numel())
    assert_rel_close(ops.propagate(affinity, cam), ops.propagate_reference(affinity, cam),
                     1e-5, what="propagate")


@pytest.mark.parametrize("layers, b, h, c, p, d, k", [
    (3, 1, 2, 20, 213, 16, 20),
    (2, 2, 3, 1, 47, 8, 1),
    (4, 1, 2, 0, 70, 12, 21),
])
def test_propagate_streaming_cpu_matches_reference(gen, layers, b, h, c, p, d, k):
    q, kk = randn(gen, layers, b, h, c + p, d), randn(gen, layers, b, h, c + p, d)
    cam = randn(gen, b, p, k)
    weights = [1.0 if i % 2 else 0.5 for i in range(layers)]
    weights[0] = 0.0
    poison_heap(cam.numel())
    out = ops.propagate_streaming(q, kk, cam, scale=d ** -0.5, num_cls=c, weights=weights)
    ref = ops.propagate_streaming_reference(q, kk, cam, d ** -0.5, c, weights)
    assert_rel_close(out, ref, 1e-4, what="propagate_streaming")  # long reductions over layers


PASS_SIZES = [(12, 17), (12, 17), (6, 9), (6, 9), (19, 25), (19, 25)]


@pytest.mark.parametrize("merge", ["sum", "max_flip"])
@pytest.mark.parametrize("norm", ["none", "minmax", "max", "transcam"])
@pytest.mark.parametrize("relu", [False, True])
def test_multiscale_merge_cpu_matches_reference(gen, merge, norm, relu):
    b, k, out_size = 2, 5, (37, 50)
    maps = [randn(gen, b, k, h, w) for h, w in PASS_SIZES]
    flips = [False, True] * 3
    labels = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=torch.float32)
    eps = ops.multiscale_merge.__globals__["DEFAULT_EPS"][norm]
    ref = ops.multiscale_merge_reference(maps, flips, *out_size, relu, labels, merge, norm, eps)
    poison_heap(ref.numel())
    out = ops.multiscale_merge(maps, out_size, flips=flips, relu=relu, labels=labels,
                               merge=merge, norm=norm)
    assert_rel_close(out, ref, 1e-5, what=f"{merge}/{norm}/relu={relu}")


@pytest.mark.parametrize("out_size", [(1, 1), (375, 500), (7, 3)])
def test_multiscale_merge_cpu_odd_output_sizes(gen, out_size):
    maps = [randn(gen, 1, 3, 24, 32, dtype=torch.float16), randn(gen, 1, 3, 5, 4)]
    out = ops.multiscale_merge(maps, out_size, flips=[True, False], norm="minmax")
    ref = ops.multiscale_merge_reference(maps, [True, False], *out_size, False, None, "sum",
                                         "minmax", 1e-8)
    if out_size == (1, 1):  # a single pixel normalizes to 0 in both
        assert torch.equal(out, ref)
    else:
        assert_rel_close(out, ref, 1e-5)


def test_multiscale_merge_cpu_large_inputs_round_like_interpolate(gen):
    """Source coordinates are one FMA in ATen; two roundings drift ~2e-5 at a few hundred px."""
    maps = [randn(gen, 1, 2, 300, 333), randn(gen, 1, 2, 97, 451)]
    out = ops.multiscale_merge(maps, (997, 1013), flips=[False, True])
    ref = ops.multiscale_merge_reference(maps, [False, True], 997, 1013, False, None, "sum",
                                         "none", 0.0)
    assert_rel_close(out, ref, 1e-5)
