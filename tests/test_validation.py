"""Bad inputs raise ValueError naming the offending shapes / dtypes / devices, before any face
runs (no crash, no partial accumulation)."""

import pytest
import torch

from wsss_fast import ops


def qkv(b=1, h=2, t=10, d=4, dtype=torch.float32):
    return [torch.randn(b, h, t, d).to(dtype) for _ in range(3)]


BAD_ATTENTION_CALLS = {
    "3-d q": (lambda: ops.attention_stats(torch.randn(2, 10, 4), *qkv()[1:], 0.5, 2), r"4 dim"),
    "k shape": (lambda: ops.attention_stats(*qkv()[:1], torch.randn(1, 2, 11, 4), qkv()[2], 0.5, 2),
                r"\(1, 2, 11, 4\)"),
    "mixed dtypes": (lambda: ops.attention_stats(*qkv()[:2], qkv(dtype=torch.float16)[2], 0.5, 2),
                     r"float16"),
    "int dtype": (lambda: ops.attention_stats(*[torch.ones(1, 2, 10, 4, dtype=torch.int64)] * 3,
                                              0.5, 2), r"int64"),
    "num_cls too big": (lambda: ops.attention_stats(*qkv(), 0.5, 10), r"num_cls"),
    "num_cls negative": (lambda: ops.attention_stats(*qkv(), 0.5, -1), r"num_cls"),
    "nan scale": (lambda: ops.attention_stats(*qkv(), float("nan"), 2), r"scale"),
    "zero scale": (lambda: ops.attention_stats(*qkv(), 0.0, 2), r"scale"),
    "cls2patch shape": (lambda: ops.attention_stats(*qkv(), 0.5, 2, cls2patch=torch.zeros(1, 2, 9)),
                        r"\(1, 2, 8\).*\(1, 2, 9\)"),
    "fp16 accumulator": (lambda: ops.attention_stats(
        *qkv(), 0.5, 2, patch2patch=torch.zeros(1, 8, 8, dtype=torch.float16)), r"float16"),
    "strided accumulator": (lambda: ops.attention_stats(
        *qkv(), 0.5, 2, patch2patch=torch.zeros(1, 8, 16)[:, :, ::2]), r"contiguous"),
    "cls stats without cls": (lambda: ops.attention_stats(*qkv(), 0.5, 0,
                                                          cls_row=torch.zeros(1, 10)), r"num_cls=0"),
    "nan weight": (lambda: ops.attention_stats(*qkv(), 0.5, 2, patch2patch=torch.zeros(1, 8, 8),
                                               patch2patch_weight=float("inf")), r"weight"),
}


@pytest.mark.parametrize("name", sorted(BAD_ATTENTION_CALLS))
def test_attention_stats_rejects(name):
    call, pattern = BAD_ATTENTION_CALLS[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_rejected_call_leaves_accumulators_untouched():
    c2p = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError):
        ops.attention_stats(*qkv(), 0.5, 2, cls2patch=c2p, patch2patch=torch.zeros(1, 8, 7))
    assert c2p.abs().max() == 0


@pytest.mark.parametrize("call, pattern", [
    (lambda: ops.class_patch_reweight(torch.rand(2, 3), 0.0), r"gamma must be > 0"),
    (lambda: ops.class_patch_reweight(torch.rand(2, 3), float("inf")), r"gamma must be finite"),
    (lambda: ops.class_patch_reweight(torch.rand(2, 3), 2.0, patchcam=torch.rand(2, 4)),
     r"patchcam of shape \(2, 4\).*\(2, 3\)"),
    (lambda: ops.class_patch_reweight(torch.rand(2, 6), 2.0, patchcam=torch.rand(2, 2, 2)),
     r"h\*w=6"),
    (lambda: ops.class_patch_reweight(torch.ones(2, 3, dtype=torch.int32), 2.0), r"int32"),
    (lambda: ops.class_patch_reweight(torch.rand(0, 3), 2.0), r"non-empty"),
])
def test_class_patch_reweight_rejects(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("call, pattern", [
    (lambda: ops.propagate(torch.rand(1, 5, 4), torch.rand(1, 5, 3)), r"\(1, 5, 5\).*\(1, 5, 4\)"),
    (lambda: ops.propagate(torch.rand(5, 5), torch.rand(5, 3)), r"3 dim"),
    (lambda: ops.propagate(torch.rand(1, 5, 5), torch.rand(1, 5, 3).half()), r"one dtype"),
    (lambda: ops.propagate_streaming(torch.rand(2, 1, 2, 9, 4), torch.rand(2, 1, 2, 9, 4),
                                     torch.rand(1, 8, 3), scale=0.5, num_cls=2, weights=[1, 1]),
     r"\(1, 7, K>0\).*\(1, 8, 3\)"),
    (lambda: ops.propagate_streaming(torch.rand(2, 1, 2, 9, 4), torch.rand(2, 1, 2, 9, 4),
                                     torch.rand(1, 7, 3), scale=0.5, num_cls=2, weights=[1]),
     r"1 weights for 2 blocks"),
    (lambda: ops.propagate_streaming(torch.rand(1, 2, 9, 4), torch.rand(1, 2, 9, 4),
                                     torch.rand(1, 7, 3), scale=0.5, num_cls=2, weights=[1]),
     r"5 dim"),
])
def test_propagate_rejects(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def maps2():
    return [torch.rand(1, 3, 4, 5), torch.rand(1, 3, 4, 5)]


@pytest.mark.parametrize("call, pattern", [
    (lambda: ops.multiscale_merge([], (4, 4)), r"non-empty sequence"),
    (lambda: ops.multiscale_merge(torch.rand(1, 3, 4, 5), (4, 4)), r"non-empty sequence"),
    (lambda: ops.multiscale_merge([torch.rand(1, 3, 4, 5), torch.rand(1, 2, 4, 5)], (4, 4)),
     r"\(1, 2, 4, 5\)"),
    (lambda: ops.multiscale_merge(maps2(), (4, 4), flips=[True]), r"1 flips for 2 maps"),
    (lambda: ops.multiscale_merge(maps2(), (4, 4), merge="mean"), r"merge must be"),
    (lambda: ops.multiscale_merge(maps2(), (4, 4), norm="zscore"), r"norm must be"),
    (lambda: ops.multiscale_merge(maps2(), (4, 4), flips=[True, False], merge="max_flip"),
     r"pairs"),
    (lambda: ops.multiscale_merge([torch.rand(1, 3, 4, 5), torch.rand(1, 3, 4, 6)], (4, 4),
                                  flips=[False, True], merge="max_flip"), r"differs in shape"),
    (lambda: ops.multiscale_merge(maps2(), (0, 4)), r"positive"),
    (lambda: ops.multiscale_merge(maps2(), (4, 4), labels=torch.ones(1, 4)), r"\(1, 3\)"),
    (lambda: ops.multiscale_merge(maps2(), (4, 4), norm="minmax", eps=float("nan")), r"eps"),
    (lambda: ops.multiscale_merge([torch.rand(1, 3, 0, 5)], (4, 4)), r"empty"),
])
def test_multiscale_merge_rejects(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
@pytest.mark.gpu
def test_mixed_devices_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        ops.attention_stats(q.cuda(), k, v, 0.5, 2)
