"""``attention_stats`` on every face: hand-computed reference cases, each fused face against the
reference (the C++ face at odd sizes with poisoned accumulators and heaps, the Triton face in the
interpreter with small tiles), validation, the torch.library registration and gradients."""

import importlib.util
import math

import pytest
import torch

from tests.helpers import assert_rel_close, poison_heap, poisoned_accumulators, randn
from tests.ops.faces import (assert_close_scaled, face_params, fp32_tol, needs_triton, RTOL,
                             TOL)
from wsss_fast import ops
from wsss_fast.ops import attention_stats_reference

if importlib.util.find_spec("triton") is not None:
    from wsss_fast.kernels.attention_stats import attention_stats_triton


# ----------------------------------------------------------------------------------- reference face

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

# ----------------------------------------------------------------------------------------- cpu face


@pytest.mark.usefixtures("cpu_face")
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


@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("spread", [1e-3, 30.0, 300.0])
def test_attention_stats_cpu_exp_over_the_whole_range(gen, spread):
    """The cpu face's own exp (softmax_rows.h): near-uniform rows, peaked rows, and rows where
    most keys sit hundreds below the max (exp underflows to 0); 37 keys exercise the vector
    tail."""
    b, h, c, p, d = 1, 2, 3, 34, 8
    q, k, v = (randn(gen, b, h, c + p, d) for _ in range(3))
    q = q * spread
    acc = torch.zeros(b, p, p)
    expected = acc.clone()
    ref_out = ops.attention_stats_reference(q, k, v, 0.5, c, None, 1.0, expected, 1.0, None, 1.0)
    out = ops.attention_stats(q, k, v, 0.5, c, patch2patch=acc)
    assert torch.isfinite(out).all() and torch.isfinite(acc).all()
    assert_rel_close(out, ref_out, what="o")
    assert_rel_close(acc, expected, 1e-5, what="patch2patch")


def cpu_flags():
    """The CPU's feature flags (Linux /proc/cpuinfo), empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The exp pass's paths (softmax_rows.h), forced by WSSS_FAST_CPU_EXP; "auto" takes the widest.
EXP_PATHS = {"avx512": {"avx512f"}, "avx2": {"avx2", "fma"}, "scalar": set()}


def exp_path_param(path):
    missing = not EXP_PATHS[path] <= cpu_flags()
    return pytest.param(path, marks=pytest.mark.skipif(missing, reason=f"no {path} on this CPU"))


def peaked_qkv(t, d, margin):
    """q, k, v of one (batch, head) with row i's largest score at key i, ``margin`` above its
    neighbours' (scale 1): the max sits in every vector lane and in the tail once; a row whose
    max the exp pass missed would overflow (exp(margin) with margin in the hundreds)."""
    angles = torch.arange(t, dtype=torch.float64) * (2 * math.pi / t)
    unit = torch.stack([angles.cos(), angles.sin()], dim=-1)
    radius = margin / (1 - math.cos(2 * math.pi / t))
    q = torch.zeros(1, 1, t, d, dtype=torch.float64)
    k = torch.zeros_like(q)
    q[0, 0, :, :2] = radius * unit
    k[0, 0, :, :2] = unit
    v = torch.randn(1, 1, t, d, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    return q.float(), k.float(), v.float()


@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("path", [exp_path_param(p) for p in EXP_PATHS])
@pytest.mark.parametrize("t", [1, 11, 16, 37, 70, 100, 161])
def test_attention_stats_cpu_exp_paths(gen, monkeypatch, path, t):
    """Each exp path the CPU has against the reference: random rows (odd lengths: a vector tail,
    one or several 16/32-key blocks) and rows peaked at every key position; poisoned
    accumulators and heap."""
    monkeypatch.setenv("WSSS_FAST_CPU_EXP", path)
    c = min(3, t - 1)
    p = t - c
    cases = [tuple(randn(gen, 2, 3, t, 8) for _ in range(3))]
    if t > 2:
        cases.append(peaked_qkv(t, 4, margin=200.0))
    for q, k, v in cases:
        b = q.shape[0]
        accs = poisoned_accumulators(gen, (b, c, p), (b, p, p), (b, p))
        expected = [a.clone() for a in accs]
        has_cls = c > 0
        kwargs = dict(cls2patch=accs[0] if has_cls else None, cls2patch_weight=0.5,
                      patch2patch=accs[1], patch2patch_weight=1.5,
                      cls_row=accs[2] if has_cls else None, cls_row_weight=2.0)
        ref = ops.attention_stats_reference(q, k, v, 1.0, c, expected[0] if has_cls else None,
                                            0.5, expected[1], 1.5,
                                            expected[2] if has_cls else None, 2.0)
        poison_heap(q.numel())
        out = ops.attention_stats(q, k, v, 1.0, c, **kwargs)
        assert_rel_close(out, ref, what="o")
        for name, got, want in zip(("cls2patch", "patch2patch", "cls_row"), accs, expected):
            if has_cls or name == "patch2patch":
                assert_rel_close(got, want, 1e-5, what=name)


@pytest.mark.usefixtures("cpu_face")
def test_attention_stats_cpu_exp_paths_agree(gen, monkeypatch):
    """The vector paths share one polynomial: their statistics differ only by the order of the
    row sums' additions; a bad WSSS_FAST_CPU_EXP value is an error."""
    paths = [p for p in EXP_PATHS if EXP_PATHS[p] <= cpu_flags()]
    q, k, v = (randn(gen, 1, 2, 5 + 300, 16) * 3 for _ in range(3))
    results = {}
    for path in paths:
        monkeypatch.setenv("WSSS_FAST_CPU_EXP", path)
        p2p = torch.zeros(1, 300, 300)
        results[path] = (ops.attention_stats(q, k, v, 0.25, 5, patch2patch=p2p), p2p)
    for path in paths[1:]:
        for got, want in zip(results[path], results[paths[0]]):
            assert_rel_close(got, want, 1e-6, what=f"{path} vs {paths[0]}")
    monkeypatch.setenv("WSSS_FAST_CPU_EXP", "avx1024")
    with pytest.raises(RuntimeError, match="WSSS_FAST_CPU_EXP must be auto, avx512, avx2 or"):
        ops.attention_stats(q, k, v, 0.25, 5)


@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_stats_cpu_low_precision_inputs(gen, monkeypatch, dtype):
    # The fp32-softmax claim below is the widened path's: on a CPU with bf16 GEMMs (AVX-512
    # BF16) "auto" rounds bf16 scores to bf16 first (test_attention_stats_cpu_bf16_gemm_paths).
    monkeypatch.setenv("WSSS_FAST_CPU_BF16_GEMM", "off")
    b, h, c, p, d = 2, 2, 3, 40, 16
    q, k, v = (randn(gen, b, h, c + p, d, dtype=dtype) for _ in range(3))
    c2p, c2p_ref = torch.zeros(b, c, p), torch.zeros(b, c, p)
    out = ops.attention_stats(q, k, v, 0.25, c, cls2patch=c2p)
    ref = ops.attention_stats_reference(q, k, v, 0.25, c, c2p_ref, 1.0)
    assert out.dtype == dtype
    assert_rel_close(out, ref, TOL[dtype], what="o")
    assert_rel_close(c2p, c2p_ref, 1e-5, what="cls2patch")  # fp32 softmax of exact inputs


# bf16 inputs: "on" runs the two GEMMs in bf16 (scores rounded to bf16 before the fp32 softmax),
# "off" widens the inputs to fp32 first; "auto" picks "on" only where oneDNN has bf16 GEMMs.


@pytest.mark.usefixtures("cpu_face")
@pytest.mark.parametrize("gemm", ["on", "off"])
@pytest.mark.parametrize("b, h, c, p, d", [(1, 3, 20, 301, 64), (2, 2, 1, 45, 24), (1, 1, 0, 7, 5)])
def test_attention_stats_cpu_bf16_gemm_paths(gen, monkeypatch, gemm, b, h, c, p, d):
    monkeypatch.setenv("WSSS_FAST_CPU_BF16_GEMM", gemm)
    q, k, v = (randn(gen, b, h, c + p, d, dtype=torch.bfloat16) for _ in range(3))
    has_cls = c > 0
    accs = poisoned_accumulators(gen, (b, c, p), (b, p, p), (b, p))
    expected = [a.clone() for a in accs]
    kwargs = dict(cls2patch=accs[0] if has_cls else None, cls2patch_weight=0.5,
                  patch2patch=accs[1], patch2patch_weight=1.0,
                  cls_row=accs[2] if has_cls else None, cls_row_weight=2.0)
    ref = ops.attention_stats_reference(q, k, v, d ** -0.5, c, expected[0] if has_cls else None,
                                        0.5, expected[1], 1.0,
                                        expected[2] if has_cls else None, 2.0)
    starts = [a.clone() for a in accs]
    poison_heap(q.numel())
    out = ops.attention_stats(q, k, v, d ** -0.5, c, **kwargs)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out, ref, TOL[torch.bfloat16], what="o")
    for name, got, want, start in zip(("cls2patch", "patch2patch", "cls_row"), accs, expected,
                                      starts):
        if not (has_cls or name == "patch2patch"):
            continue
        if gemm == "off":   # fp32 softmax of the exact bf16 values: fp32 agreement
            assert_rel_close(got, want, 1e-5, what=name)
        else:   # what was added (the poisoned start would dwarf the bf16-score error)
            assert_rel_close(got - start, want - start, 2e-2, what=name)


@pytest.mark.usefixtures("cpu_face")
def test_attention_stats_cpu_bf16_gemm_switch_changes_the_computation(gen, monkeypatch):
    q, k, v = (randn(gen, 1, 2, 3 + 60, 16, dtype=torch.bfloat16) for _ in range(3))
    results = {}
    for gemm in ("on", "off"):
        monkeypatch.setenv("WSSS_FAST_CPU_BF16_GEMM", gemm)
        c2p = torch.zeros(1, 3, 60)
        ops.attention_stats(q, k, v, 0.25, 3, cls2patch=c2p)
        results[gemm] = c2p
    # bf16-rounded scores: close to the widened computation but not bitwise equal to it.
    assert not torch.equal(results["on"], results["off"])
    assert_rel_close(results["on"], results["off"], 2e-2, what="cls2patch")
    monkeypatch.setenv("WSSS_FAST_CPU_BF16_GEMM", "sometimes")
    with pytest.raises(RuntimeError, match="WSSS_FAST_CPU_BF16_GEMM must be auto, on or off"):
        ops.attention_stats(q, k, v, 0.25, 3)


@pytest.mark.usefixtures("cpu_face")
def test_attention_stats_cpu_skips_zero_weight_and_missing_accumulators(gen):
    q, k, v = (randn(gen, 1, 2, 37, 8) for _ in range(3))
    c2p = torch.randn(1, 4, 33, generator=gen)
    before = c2p.clone()
    ops.attention_stats(q, k, v, 0.3, 4, cls2patch=c2p, cls2patch_weight=0.0)
    assert torch.equal(c2p, before)


@pytest.mark.usefixtures("cpu_face")
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

# ----------------------------------------------------- triton face (the interpreter on CPU tensors)


ATTENTION_CASES = [
    # B, H, C, P, d, dtype, block_m, block_n
    (2, 3, 5, 37, 24, torch.float32, 16, 16),
    (1, 4, 20, 61, 64, torch.float32, 16, 16),
    (2, 2, 1, 50, 40, torch.float16, None, None),
    (2, 3, 3, 50, 17, torch.float16, 16, 16),
    (1, 2, 2, 19, 1, torch.float32, None, None),
]


@needs_triton
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


@needs_triton
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


@needs_triton
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


@needs_triton
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

# --------------------------------------------------------------------------------------- validation

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
@pytest.mark.gpu
def test_mixed_devices_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        ops.attention_stats(q.cuda(), k, v, 0.5, 2)

# ----------------------------------------------------------------------------------------- dispatch

def test_autograd_inputs_take_the_differentiable_reference():
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    p2p = torch.zeros(1, 7, 7)
    out = ops.attention_stats(q, q.detach(), q.detach(), 0.5, 2, patch2patch=p2p)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ------------------------------------------------------------------- every face, registration

@pytest.mark.parametrize("face", face_params("reference", "cpu", "triton"), indirect=True)
def test_attention_stats_faces_match_reference(face, gen):
    b, h, c, p, d = 2, 2, 3, 21, 8
    q, k, v = (randn(gen, b, h, c + p, d).to(face.device) for _ in range(3))
    accs = [torch.rand(b, c, p, generator=gen), torch.rand(b, p, p, generator=gen),
            torch.rand(b, p, generator=gen)]
    mine = [a.to(face.device) for a in accs]
    theirs = [a.clone() for a in accs]
    out = ops.attention_stats(q, k, v, 0.3, c, cls2patch=mine[0], cls2patch_weight=0.5,
                              patch2patch=mine[1], patch2patch_weight=1.0, cls_row=mine[2],
                              cls_row_weight=2.0)
    ref = attention_stats_reference(q.cpu(), k.cpu(), v.cpu(), 0.3, c, theirs[0], 0.5, theirs[1],
                                    1.0, theirs[2], 2.0)
    assert_rel_close(out.cpu(), ref, fp32_tol(face), what=f"o ({face})")
    for name, got, want in zip(("cls2patch", "patch2patch", "cls_row"), mine, theirs):
        assert_rel_close(got.cpu(), want, fp32_tol(face), what=f"{name} ({face})")


def test_attention_stats_opcheck():
    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    torch.library.opcheck(torch.ops.wsss_fast.attention_stats.default,
                          (q, k, v, 0.35, 3, torch.zeros(1, 3, 8), 1.0, torch.zeros(1, 8, 8), 0.5,
                           torch.zeros(1, 8), 1.0),
                          test_utils=("test_schema", "test_faketensor"))
