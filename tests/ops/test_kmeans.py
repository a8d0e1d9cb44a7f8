"""``kmeans`` (cosine, kmeans-pytorch v0.3 semantics with re-seeding) on every face: the library's
iteration replayed step by step, each fused face against the reference, ties, re-seeding, the stop
rule, validation and the torch.library registration."""

import warnings

import numpy as np
import pytest
import torch

from tests.ops.faces import HAS_TRITON
from wsss_fast.ops import _backend, kmeans
from wsss_fast.ops.kmeans import reseed_empty_clusters

# -------------------------------------------------------------- from tests/test_kmeans.py

FACES = ("reference", "cpu", "triton")


RTOL = 1e-5


def _use_face(face, monkeypatch):
    if face == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if face == "cpu":
        assert _backend.cpu_extension_error() is None, _backend.cpu_extension_error()
    monkeypatch.setenv("WSSS_FAST_BACKEND", face)


def library_v03_steps(x: np.ndarray, init: np.ndarray, tol: float, max_steps: int = 200):
    """``kmeans_pytorch.kmeans(X, K, distance='cosine', tol)`` of tag v0.3, restated: yields
    ``(cluster ids, centres, shift²)`` after every iteration, in float32 like the library."""
    x = x.astype(np.float32)
    state = x[init].copy()
    for _ in range(max_steps):
        a = x[:, None, :] / np.linalg.norm(x, axis=1)[:, None, None]
        b = state[None, :, :] / np.linalg.norm(state, axis=1)[None, :, None]
        distance = 1 - (a * b).sum(axis=-1)                      # (N, K): the N×K×D broadcast
        choice = np.argmin(distance, axis=1)
        previous = state.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # mean of an empty cluster: NaN
            for j in range(len(init)):
                state[j] = x[choice == j].mean(axis=0)
        shift = np.sqrt(((state - previous) ** 2).sum(axis=1)).sum()
        yield choice, state.copy(), float(shift) ** 2
        if shift ** 2 < tol:
            return


def _margin(x: np.ndarray, centres: np.ndarray) -> float:
    """Smallest gap between a point's best and second-best cosine (float64)."""
    x = x.astype(np.float64)
    c = centres.astype(np.float64)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (c / np.linalg.norm(
        c, axis=1, keepdims=True)).T
    top = np.sort(cos, axis=1)
    return float((top[:, -1] - top[:, -2]).min())


def _random(gen, n, d):
    return torch.randn(n, d, generator=gen).relu()   # post-ReLU features, like LPCAM's


def _clustered(gen, n, d, blobs):
    directions = torch.rand(blobs, d, generator=gen) ** 3
    which = torch.randint(0, blobs, (n,), generator=gen)
    scale = 0.5 + torch.rand(n, 1, generator=gen) * 2
    return (directions[which] * scale + 0.3 * torch.rand(n, d, generator=gen)).contiguous()


def _init(seed, n, k):
    return torch.from_numpy(np.random.RandomState(seed).choice(n, k, replace=False))


def _assert_centres(actual, expected, what=""):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape, what
    scale = expected.abs().max().item()
    assert scale > 0
    err = (actual.double() - expected.double()).abs().max().item() / scale
    assert err <= RTOL, f"{what}: centres differ by {err:.3g} (relative)"


LIBRARY_CASES = [   # data, N, D, k, tol
    ("clustered", 300, 16, 5, 1e-6),
    ("clustered", 257, 33, 7, 5.0),
    ("random", 200, 24, 6, 1e-4),
]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("case", LIBRARY_CASES, ids=str)
def test_reproduces_kmeans_pytorch_v03_iteration_by_iteration(face, case, gen, monkeypatch):
    kind, n, d, k, tol = case
    x = _clustered(gen, n, d, k) if kind == "clustered" else _random(gen, n, d)
    init = _init(n + d, n, k)
    steps = list(library_v03_steps(x.numpy(), init.numpy(), tol))
    assert 2 <= len(steps) < 200
    # Precondition: no near-tie that float rounding could decide differently.
    previous = x.numpy()[init.numpy()]
    for _, centres, _ in steps:
        assert _margin(x.numpy(), previous) > 1e-6
        previous = centres
    _use_face(face, monkeypatch)
    for iteration, (choice, centres, _) in enumerate(steps, start=1):
        got = kmeans(x, k, init=init, max_iter=iteration, tol=0.0)
        assert got.iterations == iteration
        assert torch.equal(got.assignments, torch.from_numpy(choice)), f"iteration {iteration}"
        _assert_centres(got.centres, torch.from_numpy(centres), f"iteration {iteration}")
    stopped = kmeans(x, k, init=init, max_iter=1000, tol=tol)
    assert stopped.iterations == len(steps)
    assert torch.equal(stopped.assignments, torch.from_numpy(steps[-1][0]))


def test_library_gives_nan_on_an_empty_cluster_and_we_reseed(monkeypatch):
    # Rows 0 and 1 coincide: centre 1 equals centre 0 and loses every tie, so it is empty after
    # the first assignment. v0.3 then holds a NaN centre (and never meets its stop rule).
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.5, 0.866]])
    init = torch.tensor([0, 1, 2])
    choice, centres, shift2 = next(library_v03_steps(x.numpy(), init.numpy(), tol=1e-12))
    assert choice.tolist() == [0, 0, 2, 0, 2]
    assert np.isnan(centres[1]).all() and np.isnan(shift2)
    # Ours: point 3 is the farthest from its centre (cos 0.8 < 0.866 < 1) in a cluster of 3
    # points, so it re-seeds cluster 1; iteration 2 changes nothing.
    expected = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.25, 0.933]])
    for face in FACES:
        _use_face(face, monkeypatch)
        got = kmeans(x, 3, init=init, tol=1e-12)
        assert got.assignments.tolist() == [0, 0, 2, 1, 2], face
        assert got.iterations == 2, face
        torch.testing.assert_close(got.centres, expected, rtol=1e-6, atol=1e-6)


FACE_CASES = [   # data, N, D, k
    ("random", 1237, 77, 13),
    ("clustered", 1501, 64, 12),
    ("random", 300, 5, 1),
    ("clustered", 20, 9, 20),      # k = N
    ("random", 999, 130, 37),      # several centre tiles in the triton kernel
]


TRITON_CASES = [("random", 157, 19, 5), ("clustered", 90, 40, 17), ("random", 31, 3, 31)]


def _face_vs_reference(face, case, gen, monkeypatch, max_iter=40):
    kind, n, d, k = case
    x = _clustered(gen, n, d, max(k, 2)) if kind == "clustered" else _random(gen, n, d)
    init = _init(k * 7 + n, n, k)
    _use_face("reference", monkeypatch)
    expected = kmeans(x, k, init=init, max_iter=max_iter, tol=1e-8)
    _use_face(face, monkeypatch)
    got = kmeans(x, k, init=init, max_iter=max_iter, tol=1e-8)
    assert got.iterations == expected.iterations
    assert torch.equal(got.assignments, expected.assignments)
    _assert_centres(got.centres, expected.centres, face)


@pytest.mark.parametrize("case", FACE_CASES, ids=str)
def test_cpu_face_matches_reference(case, gen, monkeypatch):
    _face_vs_reference("cpu", case, gen, monkeypatch)


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_face_matches_reference(case, gen, monkeypatch):
    _face_vs_reference("triton", case, gen, monkeypatch, max_iter=6)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_tiles_smaller_than_the_problem(gen):
    from wsss_fast.kernels.kmeans import assign_triton
    from wsss_fast.ops.kmeans import unit_rows
    x = _random(gen, 45, 50)
    unit = unit_rows(_random(gen, 37, 50) + 0.01)
    assignments, best = assign_triton(x, unit.contiguous(), block_n=16, block_k=16, block_d=16)
    scores = x.double() @ unit.double().t()
    assert torch.equal(assignments, scores.argmax(dim=1))
    torch.testing.assert_close(best.double(), scores.max(dim=1).values, rtol=1e-6, atol=1e-6)


def test_cpu_face_does_not_depend_on_the_thread_count(gen, monkeypatch):
    x = _random(gen, 3001, 48)
    _use_face("cpu", monkeypatch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans(x, 9, seed=3, max_iter=5, tol=0.0)
        torch.set_num_threads(max(2, threads))
        many = kmeans(x, 9, seed=3, max_iter=5, tol=0.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.assignments, many.assignments)
    assert torch.equal(one.centres, many.centres)


@pytest.mark.parametrize("face", FACES)
def test_exact_ties_go_to_the_lowest_centre_and_reseeding_is_in_order(face, monkeypatch):
    # One feature dimension: every cosine is exactly 1, so every point picks centre 0 and the
    # other clusters are re-seeded, in ascending order, with points 0, 1, 2, 3 (all equally far,
    # so in index order); iteration 2 repeats iteration 1 exactly.
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    _use_face(face, monkeypatch)
    got = kmeans(x, 5, init=torch.arange(5), tol=1e-12)
    assert got.assignments.tolist() == [1, 2, 3, 4, 0]
    assert got.centres.flatten().tolist() == [5.0, 1.0, 2.0, 3.0, 4.0]
    assert got.iterations == 2


def test_reseeding_rule_on_hand_built_assignments():
    # Cluster 2 is empty; point 2 is the farthest but alone in cluster 1, so point 1 moves.
    got = reseed_empty_clusters(torch.tensor([0, 0, 1, 3, 3]),
                                torch.tensor([0.9, 0.5, 0.1, 0.7, 0.7]), 4)
    assert got.tolist() == [0, 2, 1, 3, 3]
    # Two empty clusters take the two farthest points, the lower cluster the farther point.
    got = reseed_empty_clusters(torch.tensor([0, 0, 0, 3, 3, 3]),
                                torch.tensor([0.9, 0.2, 0.8, 0.3, 0.95, 0.3]), 4)
    assert got.tolist() == [0, 1, 0, 2, 3, 3]
    # Nothing empty: unchanged.
    same = torch.tensor([1, 0, 1])
    assert reseed_empty_clusters(same, torch.tensor([0.1, 0.2, 0.3]), 2) is same


@pytest.mark.parametrize("face", FACES)
def test_stop_rule_is_squared_total_shift_below_tol(face, gen, monkeypatch):
    x = _random(gen, 150, 12)
    init = _init(1, 150, 4)
    _use_face(face, monkeypatch)
    first = kmeans(x, 4, init=init, max_iter=1, tol=0.0)
    shift = (first.centres.double() - x[init].double()).norm(dim=1).sum().item()
    assert shift > 0
    assert kmeans(x, 4, init=init, tol=shift ** 2 * (1 + 1e-6)).iterations == 1
    assert kmeans(x, 4, init=init, tol=shift ** 2 * (1 - 1e-6)).iterations >= 2
    assert kmeans(x, 4, init=init, max_iter=3, tol=0.0).iterations == 3


def test_seeded_runs_repeat_and_equal_their_initial_indices(gen, monkeypatch):
    x = _random(gen, 400, 10)
    _use_face("cpu", monkeypatch)
    a, b = kmeans(x, 6, seed=11), kmeans(x, 6, seed=11)
    assert torch.equal(a.assignments, b.assignments) and torch.equal(a.centres, b.centres)
    init = torch.randperm(400, generator=torch.Generator().manual_seed(11))[:6]
    c = kmeans(x, 6, init=init)
    assert torch.equal(a.assignments, c.assignments) and torch.equal(a.centres, c.centres)
    assert torch.equal(kmeans(x, 6).centres, kmeans(x, 6, seed=0).centres)
    assert not torch.equal(kmeans(x, 6, seed=12).centres, a.centres)


def test_half_precision_input_is_clustered_in_float32(gen, monkeypatch):
    x = _random(gen, 200, 8).half()
    init = _init(2, 200, 5)
    _use_face("cpu", monkeypatch)
    got = kmeans(x, 5, init=init)
    expected = kmeans(x.float(), 5, init=init)
    assert torch.equal(got.assignments, expected.assignments)
    assert torch.equal(got.centres, expected.centres)


@pytest.mark.parametrize("face", FACES)
def test_zero_rows_go_to_centre_zero(face, monkeypatch):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.1], [0.1, 1.0], [0.0, 0.0]])
    _use_face(face, monkeypatch)
    got = kmeans(x, 2, init=torch.tensor([2, 1]), max_iter=1, tol=0.0)
    assert got.assignments.tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("call, message", [
    (lambda x: kmeans(x[0], 2), "2 dimensions"),
    (lambda x: kmeans(x.long(), 2), "dtype"),
    (lambda x: kmeans(x[:0], 1), "non-empty"),
    (lambda x: kmeans(torch.full_like(x, float("nan")), 2), "finite"),
    (lambda x: kmeans(x, 0), "k must be"),
    (lambda x: kmeans(x, True), "k must be"),
    (lambda x: kmeans(x, 11), "at least 11 points"),
    (lambda x: kmeans(x, 2, init=[0]), "2 indices"),
    (lambda x: kmeans(x, 2, init=[3, 3]), "distinct"),
    (lambda x: kmeans(x, 2, init=[0, 10]), r"\[0, 10\)"),
    (lambda x: kmeans(x, 2, init=torch.tensor([0.0, 1.0])), "integer"),
    (lambda x: kmeans(x, 2, init=[0, 1], seed=1), "not both"),
    (lambda x: kmeans(x, 2, seed=-1), "seed"),
    (lambda x: kmeans(x, 2, max_iter=0), "max_iter"),
    (lambda x: kmeans(x, 2, tol=-1.0), "tol"),
    (lambda x: kmeans(x, 2, tol=float("nan")), "finite"),
])
def test_bad_input_raises_value_error(call, message):
    x = torch.rand(10, 3)
    with pytest.raises(ValueError, match=message):
        call(x)


def test_opcheck(gen):
    x = _random(gen, 50, 6)
    torch.library.opcheck(torch.ops.wsss_fast.kmeans.default, (x, torch.tensor([0, 5, 9]), 3, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
