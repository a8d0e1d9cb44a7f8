"""``kmeans``: cosine k-means with GEMM assignment (DESIGN §3.6), as LPCAM clusters features.

LPCAM calls ``kmeans(X, K, distance='cosine', tol=5)`` of ``kmeans-pytorch==0.3``
(reference/cnn_methods_postprocessing.md §1.3). This op runs the same iteration from the same
initial rows:

1. assign every point to the centre of highest cosine similarity (ties: the lowest centre index);
2. move every centre to the plain (Euclidean, un-normalized) mean of its points;
3. ``shift = Σ_k ‖μ_k − μ_k^prev‖₂``; stop when ``shift² < tol`` (else after ``max_iter``).

The returned assignments are those of the last step 1 and the centres those of the last step 2,
as v0.3 returns them. The assignment is one GEMM ``X · (μ/‖μ‖)ᵀ`` (the per-point factor ``1/‖x‖``
does not change the argmax), so nothing of size ``N×K×D`` exists (v0.3 broadcasts one per
iteration: 4.6 GB for 47k×12×2048). Means are accumulated in float64 and rounded to float32.

Deliberate deviations from v0.3:

* **Empty clusters are re-seeded** (v0.3 gives NaN centres, after which ``shift² < tol`` never
  holds): after step 1, for each empty cluster in ascending index order, the point farthest from
  its own centre (lowest cosine; ties: lowest point index) among clusters keeping at least one
  other point is moved into the empty cluster; step 2 then uses these assignments.
* Norms are clamped at 1e-8 (as ``F.cosine_similarity``): an all-zero point has cosine 0 to every
  centre (v0.3 divides by zero) and so goes to centre 0 — where v0.3's all-NaN row also goes.
* An iteration cap (``max_iter``; v0.3 has none) and a seeded initialization (v0.3 draws ``K``
  distinct rows with the global NumPy RNG; pass its indices as ``init`` to replay a run).

Faces: reference (plain PyTorch, the specification), cpu (C++: blocked ATen GEMM fused with the
argmax and the float64 per-cluster sums), triton (an assignment kernel — blocked ``tl.dot`` with a
running argmax over centre tiles — and the update as a segment sum in PyTorch). The faces agree
exactly on assignments except where two centres' scores differ by rounding only (near-ties; the
GEMMs sum in different orders).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from wsss_fast.ops._op import Face, cpu_kernel, define_op
from wsss_fast.ops._validate import check_finite_number, check_tensor

OP = "kmeans"
NORM_EPS = 1e-8
SUM_CHUNK_ROWS = 8192   # the triton face's float64 copies of at most this many rows at a time
FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class KMeansResult(NamedTuple):
    assignments: torch.Tensor   # (N,) int64: the cluster of every point
    centres: torch.Tensor       # (k, D) float32: raw (un-normalized) cluster means
    iterations: int             # assignment + update steps run


def reseed_empty_clusters(assignments: torch.Tensor, cos_to_centre: torch.Tensor,
                          k: int) -> torch.Tensor:
    """The re-seeding rule (module docstring): returns ``assignments`` with, for each empty
    cluster in ascending order, the farthest point (lowest ``cos_to_centre``, ties: lowest index)
    of a cluster holding at least two points moved into it. Needs ``N >= k``."""
    counts = torch.bincount(assignments, minlength=k).tolist()
    empty = [j for j in range(k) if counts[j] == 0]
    if not empty:
        return assignments
    order = torch.sort(cos_to_centre, stable=True).indices.tolist()
    moved = assignments.clone()
    owner = moved.tolist()
    position = 0
    for j in empty:
        while counts[owner[order[position]]] <= 1:
            position += 1
        point = order[position]
        position += 1
        counts[owner[point]] -= 1
        counts[j] = 1
        owner[point] = j
        moved[point] = j
    return moved


def unit_rows(centres: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (norms clamped at ``NORM_EPS``)."""
    return centres / centres.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def kmeans_reference(features: torch.Tensor, init: torch.Tensor, max_iter: int,
                     tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The specification, in plain PyTorch: ``(assignments, centres, iterations)``."""
    x = features.float()
    k = init.numel()
    x_norm = x.norm(dim=1).clamp_min(NORM_EPS)
    centres = x[init]
    for iteration in range(1, max_iter + 1):
        scores = x @ unit_rows(centres).t()                    # (N, k): ‖x‖ · cos(x, μ)
        assignments = scores.argmax(dim=1)                     # first maximum on ties
        cos_to_centre = scores.gather(1, assignments[:, None])[:, 0] / x_norm
        assignments = reseed_empty_clusters(assignments, cos_to_centre, k)
        updated = torch.stack([x[assignments == j].double().mean(dim=0)
                               for j in range(k)]).float()
        shift = (updated.double() - centres.double()).norm(dim=1).sum().item()
        centres = updated
        if shift * shift < tol:
            break
    return assignments, centres, torch.tensor(iteration)


def kmeans_triton(features: torch.Tensor, init: torch.Tensor, max_iter: int, tol: float,
                  **tiles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The triton face: assignments by ``wsss_fast.kernels.kmeans.assign_triton`` (``tiles``
    override its tile sizes), the update as a float64 segment sum over row chunks, the shared
    re-seeding rule and the stop test (one host synchronization per iteration)."""
    from wsss_fast.kernels.kmeans import assign_triton

    x = features.float().contiguous()
    n, d = x.shape
    k = init.numel()
    x_norm = x.norm(dim=1).clamp_min(NORM_EPS)
    centres = x[init]
    for iteration in range(1, max_iter + 1):
        assignments, best = assign_triton(x, unit_rows(centres).contiguous(), **tiles)
        assignments = reseed_empty_clusters(assignments, best / x_norm, k)
        sums = torch.zeros((k, d), dtype=torch.float64, device=x.device)
        for start in range(0, n, SUM_CHUNK_ROWS):
            stop = min(start + SUM_CHUNK_ROWS, n)
            sums.index_add_(0, assignments[start:stop], x[start:stop].double())
        counts = torch.bincount(assignments, minlength=k).double()
        updated = (sums / counts[:, None]).float()
        shift = (updated.double() - centres.double()).norm(dim=1).sum().item()
        centres = updated
        if shift * shift < tol:
            break
    return assignments, centres, torch.tensor(iteration)


def _iterations_on_device(run):
    """Faces return the iteration count as they like; the op returns an int64 scalar on the
    features' device."""

    def wrapped(features, init, max_iter, tol):
        assignments, centres, iterations = run(features, init, max_iter, tol)
        return assignments, centres, iterations.to(device=features.device, dtype=torch.int64)

    wrapped.__name__ = getattr(run, "__name__", "face")
    return wrapped


@define_op(OP, faces=(
    Face("reference", _iterations_on_device(kmeans_reference)),
    Face("cpu", _iterations_on_device(cpu_kernel(OP))),
    Face("triton", _iterations_on_device(kmeans_triton)),
))
def kmeans_op(features: torch.Tensor, init: torch.Tensor, max_iter: int,
              tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated inputs (``kmeans``); this body is the fake."""
    n, d = features.shape
    return (features.new_empty((n,), dtype=torch.int64),
            features.new_empty((init.shape[0], d), dtype=torch.float32),
            features.new_empty((), dtype=torch.int64))


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{OP}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _initial_indices(init, seed, n: int, k: int, device: torch.device) -> torch.Tensor:
    if init is not None and seed is not None:
        raise ValueError(f"{OP}: give either init (initial indices) or seed, not both")
    if init is None:
        seed = 0 if seed is None else _int_arg("seed", seed, 0)
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=generator)[:k].to(device)
    init = torch.as_tensor(init)
    if init.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or init.dim() != 1:
        raise ValueError(f"{OP}: init must be a 1-D integer tensor of {k} row indices, got shape "
                         f"{tuple(init.shape)}, {init.dtype}")
    if init.numel() != k:
        raise ValueError(f"{OP}: init must hold k = {k} indices, got {init.numel()}")
    init = init.to(device=device, dtype=torch.int64)
    if bool(((init < 0) | (init >= n)).any()):
        raise ValueError(f"{OP}: init indices must be in [0, {n}), got min {init.min().item()}, "
                         f"max {init.max().item()}")
    if torch.unique(init).numel() != k:
        raise ValueError(f"{OP}: init indices must be distinct, got {init.tolist()}")
    return init


def kmeans(features: torch.Tensor, k: int, *,
           init: Union[torch.Tensor, Sequence[int], None] = None, seed: Optional[int] = None,
           max_iter: int = 100, tol: float = 1e-4) -> KMeansResult:
    """Cosine k-means of the rows of ``features`` (``kmeans-pytorch==0.3`` semantics, empty
    clusters re-seeded; see the module docstring).

    Args:
        features: ``(N, D)`` float32/float16/bfloat16/float64, finite; computed in float32.
        k: number of clusters, ``1 <= k <= N``.
        init: ``k`` distinct row indices of the initial centres (v0.3:
            ``np.random.choice(N, k, replace=False)``); default: drawn with ``seed``.
        seed: seed of the initial draw (default 0); not together with ``init``.
        max_iter: at most this many iterations (v0.3: unbounded).
        tol: stop when ``(Σ_k ‖Δμ_k‖)² < tol`` (LPCAM: 5; v0.3's default 1e-4).
    Returns:
        ``KMeansResult(assignments (N,) int64, centres (k, D) float32, iterations)``; no
        gradient flows through it.
    """
    check_tensor(OP, "features", features, ndim=2, dtypes=FEATURE_DTYPES)
    n, d = features.shape
    if n == 0 or d == 0:
        raise ValueError(f"{OP}: features must be non-empty (N, D), got {tuple(features.shape)}")
    k = _int_arg("k", k, 1)
    if k > n:
        raise ValueError(f"{OP}: k = {k} clusters need at least {k} points, got N = {n}")
    max_iter = _int_arg("max_iter", max_iter, 1)
    tol = check_finite_number(OP, "tol", tol)
    if tol < 0:
        raise ValueError(f"{OP}: tol must be >= 0, got {tol}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{OP}: features must be finite, got non-finite values in shape "
                         f"{tuple(features.shape)}")
    init = _initial_indices(init, seed, n, k, features.device)
    with torch.no_grad():
        assignments, centres, iterations = kmeans_op(features.detach().contiguous(), init,
                                                     max_iter, tol)
    return KMeansResult(assignments, centres, int(iterations))
