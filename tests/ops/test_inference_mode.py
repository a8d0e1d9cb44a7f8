"""Every cpu face under ``torch.inference_mode()``: the C++ ops parallelize over OpenMP workers,
which must carry the caller's InferenceMode (csrc/cpu/parallel.h), or ATen calls inside a chunk
refuse to write the inference tensors the op itself allocated. Each op's result under inference
mode equals its result outside it, and mutated accumulators are updated in place."""

import pytest
import torch

from wsss_fast import ops


def _attention_stats(g):
    q, k, v = (torch.randn(2, 3, 41, 8, generator=g) for _ in range(3))
    acc = torch.zeros(2, 40, 40)
    out = ops.attention_stats(q, k, v, 0.5, 1, patch2patch=acc)
    return out, acc


def _propagate_streaming(g):
    q, k = (torch.randn(2, 1, 2, 37, 8, generator=g) for _ in range(2))
    cam = torch.rand(1, 36, 3, generator=g)
    return (ops.propagate_streaming(q, k, cam, scale=0.5, num_cls=1, weights=[1.0, 0.5]),)


def _random_walk(g):
    weights = torch.rand(1, len(ops.half_disk_offsets(5)), 19, 23, generator=g)
    return (ops.random_walk(torch.rand(1, 3, 19, 23, generator=g), weights, 8),)


CALLS = {
    "attention_stats": _attention_stats,
    "class_patch_reweight": lambda g: (ops.class_patch_reweight(
        torch.rand(2, 3, 300, generator=g), 2.0, patchcam=torch.randn(2, 3, 300, generator=g)),),
    "propagate": lambda g: (ops.propagate(torch.rand(2, 50, 50, generator=g),
                                          torch.rand(2, 50, 3, generator=g)),),
    "propagate_streaming": _propagate_streaming,
    "multiscale_merge": lambda g: (ops.multiscale_merge(
        [torch.rand(1, 3, 9, 11, generator=g), torch.rand(1, 3, 17, 21, generator=g)], (33, 41),
        flips=[False, True], relu=True, norm="minmax"),),
    "random_walk": _random_walk,
    "kmeans": lambda g: (ops.kmeans(torch.randn(500, 16, generator=g), 4, seed=0).assignments,),
    "path_affinity": lambda g: (ops.path_affinity(torch.rand(2, 1, 21, 19, generator=g)),),
}


@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("name", sorted(CALLS))
def test_cpu_face_under_inference_mode(name):
    expected = CALLS[name](torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = CALLS[name](torch.Generator().manual_seed(0))
    for a, b in zip(got, expected):
        assert torch.equal(a, b), name
