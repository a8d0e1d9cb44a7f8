"""The ops are torch.library custom ops with fake (meta) functions: opcheck validates schema,
fake tensors and dispatch; torch.compile traces them without graph breaks."""

import pytest
import torch

from wsss_fast import ops  # noqa: F401  (registers torch.ops.wsss_fast.*)


def sample_calls():
    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    return {
        "attention_stats": (torch.ops.wsss_fast.attention_stats.default,
                            (q, k, v, 0.35, 3, torch.zeros(1, 3, 8), 1.0, torch.zeros(1, 8, 8),
                             0.5, torch.zeros(1, 8), 1.0)),
        "class_patch_reweight": (torch.ops.wsss_fast.class_patch_reweight.default,
                                 (torch.rand(6, 8), 2.0, torch.randn(6, 8), True)),
        "propagate": (torch.ops.wsss_fast.propagate.default,
                      (torch.rand(2, 8, 8), torch.randn(2, 8, 3))),
        "propagate_streaming": (torch.ops.wsss_fast.propagate_streaming.default,
                                (torch.randn(2, 1, 2, 11, 8), torch.randn(2, 1, 2, 11, 8),
                                 torch.randn(1, 8, 3), 0.35, 3, [1.0, 0.5])),
        "multiscale_merge": (torch.ops.wsss_fast.multiscale_merge.default,
                             ([torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)], [False, True],
                              9, 7, True, torch.ones(1, 3), "max_flip", "minmax", 1e-8)),
        "random_walk": (torch.ops.wsss_fast.random_walk.default,
                        (torch.rand(1, 3, 5, 6), torch.rand(1, 34, 5, 6), 4, 5)),
    }


@pytest.mark.parametrize("name", sorted(sample_calls()))
def test_opcheck(name):
    op, args = sample_calls()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_ops_without_graph_breaks():
    def cam_step(q, k, v, patchcam, p2p):
        o = ops.attention_stats(q, k, v, 0.35, 3, patch2patch=p2p)
        cams = ops.class_patch_reweight(o[:, 0, :3, :], 2.0, patchcam=patchcam)
        return o, cams

    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    patchcam = torch.randn(1, 3, 8)
    eager_p2p, compiled_p2p = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    expected = cam_step(q, k, v, patchcam, eager_p2p)
    compiled = torch.compile(cam_step, fullgraph=True, backend="eager")
    got = compiled(q, k, v, patchcam, compiled_p2p)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(compiled_p2p, eager_p2p)
