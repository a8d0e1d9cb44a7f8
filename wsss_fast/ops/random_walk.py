"""``random_walk``: the IRN/PSA affinity random walk as a normalized stencil (DESIGN §3.5).

Pairs are the half-disk offsets of IRN/PSA (``half_disk_offsets``; 34 for radius 5). ``weights[o,
y, x] >= 0`` is the affinity — already raised to the power β — of the pair ``((y, x), (y + dy_o,
x + dx_o))``; 0 means the pair is absent, and pairs whose other endpoint is off the grid are
ignored. With the symmetric affinity ``A = I + W + Wᵀ`` (self-loops of weight 1) and the
column-normalized transition matrix ``T = A / colsum(A)``,

    random_walk(x0, weights, steps) = x0 @ T^steps        (x0 flattened to (K, h·w))

Because ``A`` is symmetric, one step ``(x @ T)[j] = Σ_{i ∈ N(j) ∪ {j}} A_ij x[i] / Σ_i A_ij``
is a 69-tap normalized gather (radius 5). The fused faces tabulate the 68 per-pixel neighbour
coefficients ``A_ij / d_j`` once and apply ``steps`` gathers in the difference form
``x[j] + Σ_i c_ij (x[i] − x[j])`` (exact in fp32 for constant maps; see
csrc/common/random_walk.h); nothing of size ``N×N`` exists. The reference face builds the dense
``N×N`` matrices (small sizes only: it is the specification and the test oracle). Gradients
exist only through the reference: inputs requiring grad are accepted up to ``GRAD_MAX_PIXELS``
pixels and refused (ValueError) above.

Each step averages a pixel's neighbourhood, so constant maps are fixed points and the
degree-weighted mass ``Σ_j d_j x[j]`` (``d = colsum(A)``) is conserved.
"""

from __future__ import annotations

import functools

import torch

from wsss_fast.ops._op import Face, cpu_kernel, define_op
from wsss_fast.ops._validate import check_same_device, check_tensor, requires_grad

OP = "random_walk"
DEFAULT_RADIUS = 5
MAX_RADIUS = 64
# Under autograd the dense reference runs; above this many pixels (N×N = 4 MiB in fp32 per
# matrix, about log2(steps) of them kept for the backward) random_walk refuses.
GRAD_MAX_PIXELS = 1024


@functools.lru_cache(maxsize=None)
def half_disk_offsets(radius: int = DEFAULT_RADIUS) -> tuple[tuple[int, int], ...]:
    """IRN/PSA's pair offsets ``(dy, dx)`` in their order: ``(0, 1..r-1)``, then for
    ``dy = 1..r-1``, ``dx = -(r-1)..r-1`` with ``dx² + dy² < r²`` (34 offsets for r = 5)."""
    if isinstance(radius, bool) or not isinstance(radius, int) or not 2 <= radius <= MAX_RADIUS:
        raise ValueError(f"radius must be an int in [2, {MAX_RADIUS}], got {radius!r}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(1 - radius, radius)
                if dx * dx + dy * dy < radius * radius]
    return tuple(offsets)


def dense_affinity(weights: torch.Tensor, radius: int = DEFAULT_RADIUS) -> torch.Tensor:
    """``A = I + W + Wᵀ`` as a dense ``(h·w, h·w)`` matrix from ``(O, h, w)`` pair weights, in
    the dtype of ``weights``."""
    _, h, w = weights.shape
    n = h * w
    index = torch.arange(n, device=weights.device).view(h, w)
    affinity = torch.eye(n, dtype=weights.dtype, device=weights.device)
    for o, (dy, dx) in enumerate(half_disk_offsets(radius)):
        x_lo, x_hi = max(0, -dx), min(w, w - dx)  # columns whose partner is on the grid
        if dy >= h or x_lo >= x_hi:
            continue
        src = index[: h - dy, x_lo:x_hi].reshape(-1)
        dst = index[dy:, x_lo + dx: x_hi + dx].reshape(-1)
        value = weights[o, : h - dy, x_lo:x_hi].reshape(-1)
        affinity.index_put_((src, dst), value, accumulate=True)
        affinity.index_put_((dst, src), value, accumulate=True)
    return affinity


def random_walk_reference(x0: torch.Tensor, weights: torch.Tensor, steps: int,
                          radius: int = DEFAULT_RADIUS) -> torch.Tensor:
    """The specification: ``x0 @ T^steps`` with the dense ``N×N`` matrices, by repeated squaring
    of ``T`` when ``steps`` is a power of two (upstream's order), else by ``steps`` products.
    ``x0 (K, h, w)`` / ``(B, K, h, w)``, ``weights (O, h, w)`` / ``(B, O, h, w)``; computes in
    float64 when either input is float64, else float32; returns ``x0``'s dtype."""
    if x0.dim() == 3:
        return random_walk_reference(x0[None], weights[None], steps, radius)[0]
    dtype = torch.float64 if torch.float64 in (x0.dtype, weights.dtype) else torch.float32
    batch, classes, h, w = x0.shape
    out = []
    for b in range(batch):
        affinity = dense_affinity(weights[b].to(dtype), radius)
        transition = affinity / affinity.sum(dim=0, keepdim=True)
        x = x0[b].to(dtype).reshape(classes, h * w)
        if steps & (steps - 1) == 0:
            for _ in range(steps.bit_length() - 1):
                transition = transition @ transition
            x = x @ transition
        else:
            for _ in range(steps):
                x = x @ transition
        out.append(x.view(classes, h, w))
    return torch.stack(out).to(x0.dtype)


def _run_triton(x0, weights, steps, radius):
    from wsss_fast.kernels.random_walk import random_walk_triton

    return random_walk_triton(x0, weights, steps, half_disk_offsets(radius))


@define_op(OP, faces=(
    Face("reference", random_walk_reference),
    Face("cpu", cpu_kernel(OP)),
    Face("triton", _run_triton),
    Face("cuda", "wsss_fast.ops._cuda_lib:random_walk"),
))
def random_walk_op(x0: torch.Tensor, weights: torch.Tensor, steps: int,
                   radius: int) -> torch.Tensor:
    """Validated, batched, contiguous inputs (``random_walk``); this body is the fake."""
    return torch.empty_like(x0)


def _check_all(name: str, t: torch.Tensor, condition, what: str) -> None:
    if not bool(condition(t).all()):
        raise ValueError(f"{OP}: {name} must be {what}, got shape {tuple(t.shape)} with "
                         f"min {t.min().item()}, max {t.max().item()}")


def random_walk(x0: torch.Tensor, weights: torch.Tensor, steps: int, *,
                radius: int = DEFAULT_RADIUS) -> torch.Tensor:
    """``x0 @ T^steps`` for the affinity random walk of IRN/PSA, never forming ``T``.

    Args:
        x0: ``(K, h, w)`` maps (or ``(B, K, h, w)``), float32/float16/bfloat16, finite.
        weights: ``(O, h, w)`` (or ``(B, O, h, w)``) pair affinities, already raised to β, finite
            and non-negative (checked: a negative weight could zero a column sum);
            ``O = len(half_disk_offsets(radius))``; float32/float16/bfloat16.
        steps: number of walk steps, ``>= 1`` (IRN/PSA: 256).
        radius: of the half disk of pair offsets (IRN/PSA: 5).
    Returns:
        The walked maps, shape and dtype of ``x0``; computed in float32.
    """
    check_tensor(OP, "x0", x0)
    check_tensor(OP, "weights", weights)
    if x0.dim() not in (3, 4) or weights.dim() != x0.dim():
        raise ValueError(f"{OP}: expected x0 (K, h, w) with weights (O, h, w), or x0 (B, K, h, w) "
                         f"with weights (B, O, h, w); got x0 {tuple(x0.shape)} and weights "
                         f"{tuple(weights.shape)}")
    check_same_device(OP, x0=x0, weights=weights)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{OP}: steps must be an int >= 1, got {steps!r}")
    try:
        offsets = len(half_disk_offsets(radius))
    except ValueError as exc:
        raise ValueError(f"{OP}: {exc}") from None
    batched = x0.dim() == 4
    *lead, h, w = x0.shape
    expected = (*lead[:-1], offsets, h, w)
    if tuple(weights.shape) != expected:
        raise ValueError(f"{OP}: weights must have shape {expected} (O = {offsets} offsets for "
                         f"radius {radius}) for x0 of shape {tuple(x0.shape)}, got "
                         f"{tuple(weights.shape)}")
    if x0.numel() == 0:
        raise ValueError(f"{OP}: x0 must be non-empty, got shape {tuple(x0.shape)}")
    _check_all("x0", x0, torch.isfinite, "finite")
    _check_all("weights", weights, lambda t: torch.isfinite(t) & (t >= 0), "finite and >= 0")
    if not batched:
        x0, weights = x0[None], weights[None]
    if requires_grad(x0, weights):
        # Only the dense reference is differentiable: allowed where N×N stays small.
        if h * w > GRAD_MAX_PIXELS:
            raise ValueError(f"{OP}: gradients need the dense N×N reference, allowed up to "
                             f"N = h·w = {GRAD_MAX_PIXELS} pixels, got {h}×{w} = {h * w}; call "
                             "it under torch.no_grad() or on detached inputs")
        out = random_walk_reference(x0, weights, steps, radius)
    else:
        out = random_walk_op(x0.contiguous(), weights.contiguous(), steps, radius)
    return out if batched else out[0]
