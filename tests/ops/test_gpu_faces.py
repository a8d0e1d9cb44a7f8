"""Every GPU face (Triton and CUDA) of every op against the reference, in fp32, fp16 and bf16 — the
core of ``make gpu-check``. Inputs are rounded to the dtype first, so the reference (fp32, CPU)
and the face see the same values; tolerances are DESIGN §10's, relative to the output's scale
(fp32 Triton dots run in TF32 on a GPU unless ``WSSS_FAST_FP32_DOTS=ieee``). The same harness
runs the C++ face in fp32 here, so it is exercised without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import randn
from tests.ops.faces import TOL, FaceCase, fp32_tol, rel_err
from wsss_fast import ops
from wsss_fast.postprocess.random_walk import irn_affinity


def case_attention_stats(gen):
    b, h, c, p, d = 2, 3, 5, 67, 32
    tensors = [randn(gen, b, h, c + p, d) for _ in range(3)]

    def run(q, k, v):
        accs = [torch.zeros(b, c, p, device=q.device), torch.zeros(b, p, p, device=q.device),
                torch.zeros(b, p, device=q.device)]
        out = ops.attention_stats(q, k, v, 0.3, c, cls2patch=accs[0], cls2patch_weight=1.0,
                                  patch2patch=accs[1], patch2patch_weight=0.5, cls_row=accs[2],
                                  cls_row_weight=2.0)
        return [out, *accs]

    return tensors, run


def case_propagate(gen):
    return [torch.rand(2, 53, 53, generator=gen), randn(gen, 2, 53, 7)], \
        lambda affinity, cam: [ops.propagate(affinity, cam)]


def case_propagate_streaming(gen):
    layers, b, h, c, p, d = 3, 1, 2, 4, 45, 32
    tensors = [randn(gen, layers, b, h, c + p, d), randn(gen, layers, b, h, c + p, d),
               randn(gen, b, p, 5)]
    return tensors, lambda q, k, cam: [ops.propagate_streaming(q, k, cam, scale=0.25, num_cls=c,
                                                               weights=[0.5, 0.0, 1.0])]


def case_class_patch_reweight(gen):
    return [torch.rand(6, 113, generator=gen) ** 3, randn(gen, 6, 113)], \
        lambda attn, patchcam: [ops.class_patch_reweight(attn, 2.0, patchcam=patchcam)]


def case_multiscale_merge(gen):
    sizes = ((7, 9), (13, 17), (4, 5), (4, 5))
    maps = [randn(gen, 1, 3, h, w) for h, w in sizes]
    labels = torch.tensor([[1.0, 0.0, 1.0]])

    def run(*maps):
        return [ops.multiscale_merge(list(maps), (29, 37), flips=[False, True, False, True],
                                     labels=labels.to(maps[0].device), norm="minmax")]

    return maps, run


def case_random_walk(gen):
    edge = torch.rand(13, 17, generator=gen) ** 3
    return [torch.rand(3, 13, 17, generator=gen), irn_affinity(edge, 10.0)], \
        lambda x0, weights: [ops.random_walk(x0, weights, 8)]


def case_path_affinity(gen):
    return [torch.rand(2, 1, 17, 19, generator=gen)], \
        lambda boundary: [ops.path_affinity(boundary, 5)]


GPU_FACES = {
    "attention_stats": (case_attention_stats, ("triton",)),
    "propagate": (case_propagate, ("triton", "cuda")),
    "propagate_streaming": (case_propagate_streaming, ("triton",)),
    "class_patch_reweight": (case_class_patch_reweight, ("triton", "cuda")),
    "multiscale_merge": (case_multiscale_merge, ("triton", "cuda")),
    "random_walk": (case_random_walk, ("triton", "cuda")),
    "path_affinity": (case_path_affinity, ("triton",)),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _params():
    params = []
    for op, (_, faces) in GPU_FACES.items():
        params.append(pytest.param(op, FaceCase("cpu", "cpu"), torch.float32,
                                   id=f"{op}-cpu-float32"))
        for name in faces:
            for dtype in DTYPES:
                params.append(pytest.param(op, FaceCase(name, "cuda"), dtype, marks=pytest.mark.gpu,
                                           id=f"{op}-{name}-cuda-{str(dtype)[6:]}"))
    return params


@pytest.mark.parametrize("op, face, dtype", _params(), indirect=["face"])
def test_gpu_face_matches_reference(op, face, dtype, gen, monkeypatch):
    make, _ = GPU_FACES[op]
    tensors, run = make(gen)
    rounded = [t.to(dtype) for t in tensors]
    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    expected = run(*[t.float() for t in rounded])
    monkeypatch.setenv("WSSS_FAST_BACKEND", face.name)
    got = run(*[t.to(face.device) for t in rounded])
    tol = fp32_tol(face) if dtype == torch.float32 else TOL[dtype]
    for index, (g, e) in enumerate(zip(got, expected)):
        assert g.device.type == face.device
        err = rel_err(g.float().cpu(), e.float())
        assert err <= tol, f"{op} output {index} ({face}, {dtype}): relative error {err:.3g} > {tol}"
