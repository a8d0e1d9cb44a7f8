"""``class_patch_reweight`` on every face: hand-computed reference cases, each fused face against
the reference (C++ at odd sizes, Triton in the interpreter, CUDA on a GPU), validation, the
torch.library registration and the registered gradient."""

import importlib.util
import math

import pytest
import torch

from tests.helpers import assert_rel_close, poison_heap
from tests.ops.faces import (assert_close_scaled, face_params, needs_gpu, needs_triton, rel_err,
                             RTOL, TOL)
from wsss_fast import ops
from wsss_fast.ops import class_patch_reweight_reference

if importlib.util.find_spec("triton") is not None:
    from wsss_fast.kernels.class_patch_reweight import class_patch_reweight_triton


# ----------------------------------------------------------------------------------- reference face

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

# ----------------------------------------------------------------------------------------- cpu face


@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("shape", [(2, 20, 713), (1, 1, 1), (3, 45, 7), (4000, 3)])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.7])
def test_class_patch_reweight_cpu_matches_reference(gen, shape, gamma):
    attn = torch.rand(*shape, generator=gen) ** 3  # attention-like: many small, few large
    if attn.numel() > shape[-1]:
        attn.view(-1, shape[-1])[0] = 0.0           # one all-zero row
    poison_heap(attn.numel())
    assert_rel_close(ops.class_patch_reweight(attn, gamma),
                     ops.class_patch_reweight_reference(attn, gamma), what="phi")


@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_class_patch_reweight_cpu_fused_patchcam_and_sqrt(gen, dtype):
    attn = torch.rand(2, 20, 7 * 9, generator=gen).to(dtype)
    patchcam = torch.randn(2, 20, 7, 9, generator=gen).to(dtype)
    for take_sqrt in (False, True):
        out = ops.class_patch_reweight(attn, 1.8, patchcam=patchcam, sqrt=take_sqrt)
        ref = ops.class_patch_reweight_reference(attn, 1.8, patchcam.reshape(attn.shape),
                                                 take_sqrt)
        assert_rel_close(out, ref, TOL[dtype], what=f"sqrt={take_sqrt}")

# ----------------------------------------------------- triton face (the interpreter on CPU tensors)


def _reweight_rows(dtype):
    attn = torch.rand(7, 53) - 0.2  # some negatives: treated as 0
    attn[2] = 0.0                    # all-zero row -> 0
    attn[3] = -torch.rand(53)        # all-negative row -> 0
    attn[4] = 0.0
    attn[4, 40] = 0.7                # one positive entry keeps the row mass there
    attn[5] *= 1e-3                  # small values: the power is taken relative to the row max
    return attn.to(dtype)


@needs_triton
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


@needs_triton
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

# --------------------------------------------------------------------------------------- validation

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

# ---------------------------------------------------------------------------------------- cuda face


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(7, 733), (3, 1), (5, 4097), (64, 196), (1, 31)])
@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5, 3.7])
def test_class_patch_reweight_matches_reference_cuda(gpu_lib, dtype, rows, cols, gamma):
    gen = torch.Generator(device="cuda").manual_seed(rows * 1000 + cols)
    attn = torch.rand(rows, cols, device="cuda", generator=gen) - 0.1  # some negative entries
    attn[0, : max(1, cols // 3)] = 0.0
    if rows > 2:
        attn[2] = -1.0  # a zero row after ReLU maps to 0
    patchcam = torch.randn(rows, cols, device="cuda", generator=gen)
    attn, patchcam = attn.to(dtype), patchcam.to(dtype)
    for pc, sq in ((None, False), (patchcam, False), (patchcam, True), (None, True)):
        out = torch.full_like(attn, float("nan"))  # poisoned: every element must be written
        got = gpu_lib.class_patch_reweight(attn, gamma, pc, sq, out=out)
        assert got.data_ptr() == out.data_ptr()
        ref = class_patch_reweight_reference(attn, gamma, pc, sq)
        assert rel_err(got, ref) <= TOL[dtype], (pc is not None, sq)
        if rows > 2:
            assert (got[2] == 0).all()
    fresh = gpu_lib.class_patch_reweight(attn, gamma, None, False)
    assert fresh.shape == attn.shape and fresh.dtype == dtype


@pytest.mark.gpu
@needs_gpu
def test_class_patch_reweight_public_op_on_cuda_face(gpu_lib, monkeypatch):
    from wsss_fast.ops import class_patch_reweight

    monkeypatch.setenv("WSSS_FAST_BACKEND", "cuda")
    attn = torch.rand(2, 3, 50, device="cuda")
    patchcam = torch.randn(2, 3, 5, 10, device="cuda")
    got = class_patch_reweight(attn, 2.0, patchcam=patchcam, sqrt=True)
    ref = class_patch_reweight_reference(attn, 2.0, patchcam.reshape(attn.shape), True)
    assert rel_err(got, ref) <= 1e-5


# ------------------------------------------------------ every face, registration, gradients

@pytest.mark.parametrize("face", face_params("reference", "cpu", "triton", "cuda"),
                         indirect=True)
@pytest.mark.parametrize("fuse", [False, True])
def test_class_patch_reweight_faces_match_reference(face, fuse, gen):
    attn = torch.rand(2, 5, 24, generator=gen) ** 3
    attn[0, 0] = 0.0  # an all-zero row
    patchcam = torch.randn(2, 5, 4, 6, generator=gen) if fuse else None
    out = ops.class_patch_reweight(attn.to(face.device), 2.3, sqrt=fuse,
                                   patchcam=None if patchcam is None else patchcam.to(face.device))
    ref = class_patch_reweight_reference(attn, 2.3, None if patchcam is None
                                         else patchcam.reshape(attn.shape), fuse)
    assert_rel_close(out.cpu(), ref, 1e-5, what=str(face))


def test_class_patch_reweight_opcheck():
    torch.library.opcheck(torch.ops.wsss_fast.class_patch_reweight.default,
                          (torch.rand(6, 8), 2.0, torch.randn(6, 8), True),
                          test_utils=("test_schema", "test_faketensor"))


def test_class_patch_reweight_registered_gradient_passes_gradcheck(monkeypatch):
    """float64 through the custom op (the reference face runs float64)."""
    from wsss_fast.ops.class_patch_reweight import class_patch_reweight_op

    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    gen = torch.Generator().manual_seed(3)
    attn = (torch.rand(3, 7, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    patchcam = (torch.rand(3, 7, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, p: class_patch_reweight_op(a, 2.5, p, True),
                                    (attn, patchcam))
    assert torch.autograd.gradcheck(lambda a: class_patch_reweight_op(a, 0.7, None, False),
                                    (attn,))


def test_class_patch_reweight_gradient_of_the_fused_face_equals_the_reference(gen):
    attn = torch.rand(2, 3, 12, generator=gen) + 0.05
    patchcam = torch.randn(2, 3, 3, 4, generator=gen)
    weight = torch.randn(2, 3, 12, generator=gen)
    got = [t.clone().requires_grad_() for t in (attn, patchcam)]
    want = [t.clone().requires_grad_() for t in (attn, patchcam)]
    (ops.class_patch_reweight(got[0], 1.7, patchcam=got[1]) * weight).sum().backward()
    (class_patch_reweight_reference(want[0], 1.7, want[1].reshape(attn.shape))
     * weight).sum().backward()
    for mine, theirs in zip(got, want):
        assert_rel_close(mine.grad, theirs.grad, 1e-5)
