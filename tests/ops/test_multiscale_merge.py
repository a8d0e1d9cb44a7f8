"""``multiscale_merge`` on every face: hand-computed reference cases, each fused face against the
reference, the CUDA library's argument checks and pass limit (the cuda face declines more passes
and the op falls back), validation, the torch.library registration and the registered gradient."""

import ctypes
import importlib.util

import pytest
import torch

from tests.helpers import assert_rel_close, poison_heap, randn
from tests.ops.faces import (assert_close_scaled, face_params, needs_gpu, needs_nvcc, needs_triton,
                             rel_err)
from wsss_fast import ops
from wsss_fast.ops import _abi, multiscale_merge_reference
from wsss_fast.ops.multiscale_merge import DEFAULT_EPS

if importlib.util.find_spec("triton") is not None:
    from wsss_fast.kernels.multiscale_merge import multiscale_merge_triton


# ----------------------------------------------------------------------------------- reference face

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

# ----------------------------------------------------------------------------------------- cpu face


PASS_SIZES = [(12, 17), (12, 17), (6, 9), (6, 9), (19, 25), (19, 25)]


@pytest.mark.usefixtures("cpu_face")
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


@pytest.mark.usefixtures("cpu_face")
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


@pytest.mark.usefixtures("cpu_face")
def test_multiscale_merge_cpu_large_inputs_round_like_interpolate(gen):
    """Source coordinates are one FMA in ATen; two roundings drift ~2e-5 at a few hundred px."""
    maps = [randn(gen, 1, 2, 300, 333), randn(gen, 1, 2, 97, 451)]
    out = ops.multiscale_merge(maps, (997, 1013), flips=[False, True])
    ref = ops.multiscale_merge_reference(maps, [False, True], 997, 1013, False, None, "sum",
                                         "none", 0.0)
    assert_rel_close(out, ref, 1e-5)

# ----------------------------------------------------- triton face (the interpreter on CPU tensors)


def _passes(batch, classes):
    # Down-sampled, up-sampled and same-size passes, each as an (image, flipped) pair.
    sizes = [(7, 9), (40, 50), (29, 37)]
    maps, flips = [], []
    for h, w in sizes:
        maps += [torch.randn(batch, classes, h, w), torch.randn(batch, classes, h, w)]
        flips += [False, True]
    return maps, flips


@needs_triton
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


@needs_triton
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


@needs_triton
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

# --------------------------------------------------------------------------------------- validation

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

# ---------------------------------------------------------------------------------------- cuda face

def _last_error(lib) -> str:
    return (lib.wsss_fast_cuda_last_error() or b"").decode()


def _merge_args(n, **overrides):
    ptrs = (ctypes.c_void_p * n)(*[0x1000 + 64 * i for i in range(n)])
    heights = (ctypes.c_int64 * n)(*[3 + i for i in range(n)])
    widths = (ctypes.c_int64 * n)(*[4 + i for i in range(n)])
    flips = (ctypes.c_int * n)(*[i % 2 for i in range(n)])
    args = dict(maps=ptrs, heights=heights, widths=widths, flips=flips, num_passes=n, batch=2,
                classes=3, labels=None, out=ctypes.c_void_p(0x2000), out_h=7, out_w=9, relu=0,
                merge=0, norm=1, eps=1e-8, stream=None)
    args.update(overrides)
    return list(args.values())


@needs_nvcc
def test_too_many_passes_is_rejected_before_any_cuda_call(loaded):
    n = _abi.value("CUDA_MAX_PASSES") + 1
    status = loaded.wsss_fast_multiscale_merge(*_merge_args(n))
    assert status < 0, status
    message = _last_error(loaded)
    assert "too many passes" in message and str(n) in message, message


@needs_nvcc
def test_merge_argument_errors(loaded):
    cases = {
        "num_passes": _merge_args(2, num_passes=0),
        "max_flip": _merge_args(3, merge=1),
        "merge must be": _merge_args(2, merge=2),
        "norm must be": _merge_args(2, norm=4),
        "negative": _merge_args(2, out_h=-1),
        "empty map": _merge_args(2, heights=(ctypes.c_int64 * 2)(0, 3)),
        "out must not be NULL": _merge_args(2, out=None),
    }
    for expected, args in cases.items():
        status = loaded.wsss_fast_multiscale_merge(*args)
        assert status < 0, (expected, status)
        assert expected in _last_error(loaded), (expected, _last_error(loaded))


def _passes_cuda(b, k, sizes, gen):
    return [torch.randn(b, k, h, w, device="cuda", generator=gen) for h, w in sizes]


MERGE_CASES = [
    # sizes, flips, merge
    ([(13, 17), (7, 9), (26, 34), (5, 5)], [False, True, False, True], "sum"),
    ([(13, 17), (13, 17), (26, 35), (26, 35)], [False, True, False, True], "max_flip"),
    ([(50, 61)], [False], "sum"),            # down-sampling
    ([(1, 1), (3, 2)], [True, False], "sum"),  # degenerate maps
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", range(len(MERGE_CASES)))
@pytest.mark.parametrize("norm", ["none", "minmax", "max", "transcam"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_labels", [False, True])
def test_multiscale_merge_matches_reference_cuda(gpu_lib, case, norm, relu, with_labels):
    sizes, flips, merge = MERGE_CASES[case]
    b, k, out_h, out_w = 2, 3, 37, 53
    gen = torch.Generator(device="cuda").manual_seed(case * 31 + len(norm))
    maps = _passes_cuda(b, k, sizes, gen)
    labels = None
    if with_labels:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]], device="cuda")
    eps = DEFAULT_EPS[norm]
    out = torch.full((b, k, out_h, out_w), float("nan"), device="cuda")
    got = gpu_lib.multiscale_merge(maps, flips, out_h, out_w, relu, labels, merge, norm, eps,
                                   out=out)
    ref = multiscale_merge_reference(maps, flips, out_h, out_w, relu, labels, merge, norm, eps)
    assert got.shape == ref.shape and got.dtype == torch.float32
    if with_labels and norm == "max":
        # zeroed planes: 0 / (0 + eps) on both sides
        assert (got[0, 1] == 0).all() and (got[1, 0] == 0).all()
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.gpu
@needs_gpu
def test_multiscale_merge_many_passes_and_large_batch(gpu_lib):
    gen = torch.Generator(device="cuda").manual_seed(7)
    sizes = [(9 + i, 11 + 2 * i) for i in range(_abi.value("CUDA_MAX_PASSES"))]
    maps = _passes_cuda(3, 21, sizes, gen)
    flips = [bool(i % 2) for i in range(len(maps))]
    got = gpu_lib.multiscale_merge(maps, flips, 97, 131, True, None, "max_flip", "minmax", 1e-8)
    ref = multiscale_merge_reference(maps, flips, 97, 131, True, None, "max_flip", "minmax", 1e-8)
    assert rel_err(got, ref) <= 1e-5
    with pytest.raises(ValueError, match="at most"):
        gpu_lib.multiscale_merge(maps + maps[:1], flips + [False], 9, 9, False, None, "sum",
                                 "none", 0.0)


# ------------------------------------------------------ every face, registration, gradients

@pytest.mark.parametrize("face", face_params("reference", "cpu", "triton", "cuda"),
                         indirect=True)
@pytest.mark.parametrize("merge, norm", [("sum", "minmax"), ("max_flip", "transcam"),
                                         ("sum", "max")])
def test_multiscale_merge_faces_match_reference(face, merge, norm, gen):
    maps = [randn(gen, 1, 3, h, w) for h, w in [(5, 7), (5, 7), (9, 4), (9, 4)]]
    flips = [False, True, False, True]
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    out = ops.multiscale_merge([m.to(face.device) for m in maps], (11, 13), flips=flips,
                               relu=True, labels=labels.to(face.device), merge=merge, norm=norm)
    ref = multiscale_merge_reference(maps, flips, 11, 13, True, labels, merge, norm,
                                     DEFAULT_EPS[norm])
    assert_rel_close(out.cpu(), ref, 1e-5, what=f"{face} {merge}/{norm}")


def test_multiscale_merge_opcheck():
    torch.library.opcheck(torch.ops.wsss_fast.multiscale_merge.default,
                          ([torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)], [False, True], 9, 7,
                           True, torch.ones(1, 3), "max_flip", "minmax", 1e-8),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("norm", ["none", "max"])
def test_multiscale_merge_registered_gradient_passes_gradcheck(monkeypatch, norm):
    from wsss_fast.ops.multiscale_merge import multiscale_merge_op

    monkeypatch.setenv("WSSS_FAST_BACKEND", "reference")
    gen = torch.Generator().manual_seed(7)
    maps = [torch.rand(1, 2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.rand(1, 2, 2, 5, generator=gen, dtype=torch.float64).requires_grad_()]
    labels = torch.tensor([[1.0, 0.5]], dtype=torch.float64)

    def merged(a, b):
        return multiscale_merge_op([a, b], [False, True], 5, 6, False, labels, "sum", norm,
                                   1e-5)

    out = merged(*maps)
    assert out.requires_grad
    # The reference casts to float32, so the numerical Jacobian is float32-accurate.
    assert torch.autograd.gradcheck(merged, tuple(maps), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_multiscale_merge_gradient_of_the_fused_face_equals_the_reference(gen):
    maps = [randn(gen, 2, 3, 6, 5), randn(gen, 2, 3, 4, 7)]
    weight = randn(gen, 2, 3, 10, 9)
    got = [m.clone().requires_grad_() for m in maps]
    want = [m.clone().requires_grad_() for m in maps]
    (ops.multiscale_merge(got, (10, 9), flips=[False, True], relu=True) * weight).sum().backward()
    (multiscale_merge_reference(want, [False, True], 10, 9, True, None, "sum", "none", 0.0)
     * weight).sum().backward()
    for mine, theirs in zip(got, want):
        assert_rel_close(mine.grad, theirs.grad, 1e-5)


@pytest.mark.gpu
def test_more_passes_than_the_cuda_face_takes_fall_back(gpu_lib, monkeypatch, gen):
    from wsss_fast.ops.multiscale_merge import multiscale_merge_op

    monkeypatch.delitem(multiscale_merge_op.faces, "triton")  # cuda is then the first choice
    n = gpu_lib.max_passes() + 1
    maps = [randn(gen, 1, 2, 5, 6) for _ in range(n)]
    device_maps = [m.cuda() for m in maps]
    args = (device_maps, [False] * n, 9, 8, False, None, "sum", "none", 0.0)
    assert multiscale_merge_op.choose(*args) == "reference"
    fewer = (device_maps[:-1], [False] * (n - 1), *args[2:])
    assert multiscale_merge_op.choose(*fewer) == "cuda"
    out = ops.multiscale_merge(device_maps, (9, 8))
    assert_rel_close(out.cpu(), multiscale_merge_reference(maps, [False] * n, 9, 8, False, None,
                                                           "sum", "none", 0.0), 1e-5)
