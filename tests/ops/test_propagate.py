"""``propagate`` and ``propagate_streaming`` on every face: hand-computed reference cases, each
fused face against the reference, validation, the torch.library registration and gradients."""

import importlib.util

import pytest
import torch

from tests.helpers import assert_rel_close, poison_heap, randn
from tests.ops.faces import (assert_close_scaled, face_params, fp32_tol, needs_gpu, needs_triton,
                             rel_err, RTOL, TOL)
from wsss_fast import ops
from wsss_fast.ops import (attention_stats_reference, propagate_reference,
                           propagate_streaming_reference)

if importlib.util.find_spec("triton") is not None:
    from wsss_fast.kernels.attention_stats import attention_stats_triton
    from wsss_fast.kernels.propagate import propagate_streaming_triton, propagate_triton


# ----------------------------------------------------------------------------------- reference face

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

# ----------------------------------------------------------------------------------------- cpu face


@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("b, p, k", [(1, 713, 20), (2, 97, 1), (1, 1850, 21)])
def test_propagate_cpu_matches_reference(gen, b, p, k):
    affinity, cam = torch.rand(b, p, p, generator=gen), randn(gen, b, p, k)
    poison_heap(cam.numel())
    assert_rel_close(ops.propagate(affinity, cam), ops.propagate_reference(affinity, cam),
                     1e-5, what="propagate")


@pytest.mark.usefixtures("cpu_face")
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

@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("gemm, tol", [("on", 3e-2), ("off", 1e-4)])
@pytest.mark.parametrize("cam_dtype", [torch.float32, torch.bfloat16])
def test_propagate_streaming_cpu_bf16_gemm_paths(gen, monkeypatch, gemm, tol, cam_dtype):
    monkeypatch.setenv("WSSS_FAST_CPU_BF16_GEMM", gemm)
    layers, b, h, c, p, d, k = 3, 2, 3, 20, 157, 64, 20
    q, kk = (randn(gen, layers, b, h, c + p, d, dtype=torch.bfloat16) for _ in range(2))
    cam = randn(gen, b, p, k, dtype=cam_dtype)
    weights = [1.0, 0.0, 0.5]
    poison_heap(cam.numel())
    out = ops.propagate_streaming(q, kk, cam, scale=d ** -0.5, num_cls=c, weights=weights)
    ref = ops.propagate_streaming_reference(q, kk, cam.float(), d ** -0.5, c, weights)
    assert out.dtype == cam_dtype
    # A bf16 cam is compared after its own rounding: the op returns the dtype of cam.
    assert_rel_close(out.float(), ref, max(tol, TOL[cam_dtype]), what="propagate_streaming")

# ----------------------------------------------------- triton face (the interpreter on CPU tensors)


@needs_triton
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


@needs_triton
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


@needs_triton
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

# --------------------------------------------------------------------------------------- validation

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

# ---------------------------------------------------------------------------------------- cuda face


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,p,k", [(2, 733, 21), (1, 1, 1), (3, 64, 32), (2, 97, 81),
                                   (1, 1850, 5)])
def test_propagate_matches_reference_cuda(gpu_lib, dtype, b, p, k):
    gen = torch.Generator(device="cuda").manual_seed(b * 100000 + p * 100 + k)
    affinity = (torch.rand(b, p, p, device="cuda", generator=gen) / p).to(dtype)
    cam = torch.randn(b, p, k, device="cuda", generator=gen).to(dtype)
    out = torch.full((b, p, k), float("nan"), dtype=dtype, device="cuda")
    got = gpu_lib.propagate(affinity, cam, out=out)
    exact = torch.bmm(affinity.double(), cam.double())
    assert rel_err(got, exact) <= TOL[dtype]
    if dtype == torch.float32:
        assert rel_err(got, propagate_reference(affinity, cam)) <= 1e-5
    assert gpu_lib.propagate(affinity, cam).dtype == dtype


# ------------------------------------------------------ every face, registration, gradients

@pytest.mark.parametrize("face", face_params("reference", "cpu", "triton", "cuda"),
                         indirect=True)
def test_propagate_faces_match_reference(face, gen):
    affinity, cam = torch.rand(2, 37, 37, generator=gen), randn(gen, 2, 37, 5)
    out = ops.propagate(affinity.to(face.device), cam.to(face.device))
    assert_rel_close(out.cpu(), propagate_reference(affinity, cam), fp32_tol(face), what=str(face))


@pytest.mark.parametrize("face", face_params("reference", "cpu", "triton"), indirect=True)
def test_propagate_streaming_faces_match_reference(face, gen):
    layers, b, h, c, p, d = 2, 1, 2, 2, 29, 8
    q, k = randn(gen, layers, b, h, c + p, d), randn(gen, layers, b, h, c + p, d)
    cam = randn(gen, b, p, 3)
    out = ops.propagate_streaming(q.to(face.device), k.to(face.device), cam.to(face.device),
                                  scale=0.3, num_cls=c, weights=[0.5, 1.0])
    ref = propagate_streaming_reference(q, k, cam, 0.3, c, [0.5, 1.0])
    assert_rel_close(out.cpu(), ref, fp32_tol(face), what=str(face))


def test_propagate_opcheck():
    torch.library.opcheck(torch.ops.wsss_fast.propagate.default,
                          (torch.rand(2, 8, 8), torch.randn(2, 8, 3)),
                          test_utils=("test_schema", "test_faketensor"))


def test_propagate_streaming_opcheck():
    torch.library.opcheck(torch.ops.wsss_fast.propagate_streaming.default,
                          (torch.randn(2, 1, 2, 11, 8), torch.randn(2, 1, 2, 11, 8),
                           torch.randn(1, 8, 3), 0.35, 3, [1.0, 0.5]),
                          test_utils=("test_schema", "test_faketensor"))


def test_propagate_registered_gradient_passes_gradcheck(monkeypatch):
    from wsss_fast.ops.propagate import propagate_op

    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    gen = torch.Generator().manual_seed(5)
    affinity = torch.rand(2, 6, 6, generator=gen, dtype=torch.float64).requires_grad_()
    cam = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64).requires_grad_()
    # The reference sums in float32: the numerical Jacobian is float32-accurate.
    assert torch.autograd.gradcheck(propagate_op, (affinity, cam), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_propagate_gradient_of_the_fused_face_equals_the_reference(gen):
    """Training (BNR) backpropagates through propagate: the fused forward keeps the gradient."""
    affinity, cam = torch.rand(2, 13, 13, generator=gen), randn(gen, 2, 13, 4)
    got = [affinity.clone().requires_grad_(), cam.clone().requires_grad_()]
    want = [affinity.clone().requires_grad_(), cam.clone().requires_grad_()]
    weight = randn(gen, 2, 13, 4)
    (ops.propagate(*got) * weight).sum().backward()
    (propagate_reference(*want) * weight).sum().backward()
    for mine, theirs in zip(got, want):
        assert_rel_close(mine.grad, theirs.grad, 1e-5)
