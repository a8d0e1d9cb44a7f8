"""``path_affinity``: IRN's path-max affinity of a boundary map, forward and backward, fused
(issue 11 item 4; reference affinity_networks.md §1.2, §1.4).

For the pairs ``(s, s + δ)`` of IRN's path set (``irn_path_set(radius)``: offsets δ in IRN's
order, sources s in the window rows ``[0, h − R + 1)`` × columns ``[R − 1, w − R + 1)``,
numbered row-major)::

    path_affinity(B, R)[b, o, s] = 1 − max_{c ∈ Π_o} B[b, 0, s + c]

the ``(B, n_offsets, n_sources)`` layout of IRN's ``to_affinity`` (152 × 13,090 per image for
R = 10 on 128×128). The reference face gathers every path cell and takes the max (the
specification, upstream's method: ``pairs × path length`` values, 107 MiB per 128² image at R =
10, kept by autograd). The cpu and triton faces read the path cells in place and keep only the
arg-max cell of each pair (a uint8: its index in the path) for the backward, which sends each
pair's gradient to that cell. Ties go to the first cell in path order and a NaN is the max (the
first NaN), exactly like ``torch.max`` over the gathered path axis. Output in the boundary's
dtype (the max is exact; ``1 − max`` is rounded once).
"""

from __future__ import annotations

import functools

import torch

from wsss_fast.ops import _backend
from wsss_fast.ops._op import Face, cpu_kernel, define_op
from wsss_fast.ops._validate import check_tensor
from wsss_fast.ops.irn_paths import IrnPathSet, check_radius, irn_path_set

OP = "path_affinity"
BACKWARD_OP = "path_affinity_backward"
DEFAULT_RADIUS = 10  # IRN's training radius (inference walks use 5)


@functools.lru_cache(maxsize=None)
def path_tables(radius: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``irn_path_set(radius).cell_tables`` on ``device``, built once per device."""
    return irn_path_set(radius).cell_tables(torch.device(device))


def _length_groups(paths: IrnPathSet):
    """Runs ``(first, stop, length)`` of consecutive offsets sharing a path length (IRN's order
    sorts by length, so every length is one run: upstream's ``path_indices`` groups)."""
    groups, first = [], 0
    lengths = paths.path_lengths
    for o in range(1, len(lengths) + 1):
        if o == len(lengths) or lengths[o] != lengths[first]:
            groups.append((first, o, lengths[first]))
            first = o
    return groups


def _cell_indices(paths: IrnPathSet, first: int, stop: int, h: int, w: int,
                  device: torch.device) -> torch.Tensor:
    """Flat grid indices ``(stop − first, length, n_sources)`` of the path cells of offsets
    ``first..stop`` from every source (upstream's ``path_indices`` of one length)."""
    src, _ = paths.pair_indices(h, w, device)
    shift = torch.tensor([[cy * w + cx for cy, cx in path] for path in paths.paths[first:stop]],
                         dtype=torch.int64, device=device)
    return shift[:, :, None] + src


def path_max_reference(boundary: torch.Tensor, radius: int = DEFAULT_RADIUS
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather + max: ``(max, argmax)`` over each pair's path, ``(B, n_offsets, n_sources)``
    each (argmax int64, the index in the path); differentiable in ``boundary``."""
    paths = irn_path_set(radius)
    batch, _, h, w = boundary.shape
    n_sources = paths.window(h, w).size
    flat = boundary.reshape(batch, h * w)
    values, indices = [], []
    for first, stop, length in _length_groups(paths):
        index = _cell_indices(paths, first, stop, h, w, boundary.device)
        gathered = flat[:, index.reshape(-1)].view(batch, stop - first, length, n_sources)
        value, arg = gathered.max(dim=2)
        values.append(value)
        indices.append(arg)
    if not values:  # radius 1: no pairs (still connected to the boundary for autograd)
        empty = flat[:, :0].reshape(batch, 0, n_sources)
        return empty, empty.detach().long()
    return torch.cat(values, dim=1), torch.cat(indices, dim=1)


def path_affinity_reference(boundary: torch.Tensor, radius: int = DEFAULT_RADIUS) -> torch.Tensor:
    """The specification: ``1 − max`` of the gathered path cells, ``(B, n_offsets,
    n_sources)``; autograd (native) sends each pair's gradient to its arg-max cell."""
    return 1 - path_max_reference(boundary, radius)[0]


def _reference_forward(boundary, radius):
    values, indices = path_max_reference(boundary, radius)
    return 1 - values, indices.to(torch.uint8)


def _reference_backward(grad, argmax, h, w, radius):
    """Each pair's gradient added to its arg-max cell, accumulated in float32."""
    paths = irn_path_set(radius)
    batch = grad.shape[0]
    out = torch.zeros(batch, h * w, dtype=torch.float32, device=grad.device)
    for first, stop, length in _length_groups(paths):
        index = _cell_indices(paths, first, stop, h, w, grad.device)
        index = index[None].expand(batch, -1, -1, -1)
        chosen = torch.gather(index, 2, argmax[:, first:stop, None, :].long())
        out.scatter_add_(1, chosen.reshape(batch, -1),
                         grad[:, first:stop].reshape(batch, -1).float())
    return out.view(batch, 1, h, w).to(grad.dtype)


def _cpu_forward(boundary, radius):
    cells, start = path_tables(radius)
    return cpu_kernel(OP)(boundary, cells, start, radius - 1)


def _cpu_backward(grad, argmax, h, w, radius):
    cells, start = path_tables(radius)
    return cpu_kernel(BACKWARD_OP)(grad, argmax, cells, start, h, w, radius - 1)


def _triton_forward(boundary, radius):
    from wsss_fast.kernels.path_affinity import path_affinity_triton

    cells, start = path_tables(radius, str(boundary.device))
    return path_affinity_triton(boundary, cells, start, radius - 1)


def _triton_backward(grad, argmax, h, w, radius):
    from wsss_fast.kernels.path_affinity import path_affinity_backward_triton

    cells, start = path_tables(radius, str(grad.device))
    return path_affinity_backward_triton(grad, argmax, cells, start, h, w, radius - 1)


def _triton_limits(tensor: torch.Tensor, *args) -> list[str]:
    if tensor.dtype == torch.bfloat16 and _backend.triton_interpreting():
        return ["the Triton interpreter has no bfloat16"]
    return []


def _setup_context(ctx, inputs, output):
    boundary, radius = inputs
    ctx.save_for_backward(output[1])
    ctx.grid = (boundary.shape[2], boundary.shape[3], radius)


def _backward(ctx, grad_affinity, grad_argmax):
    (argmax,) = ctx.saved_tensors
    # a = 1 − max: the arg-max cell gets −grad.
    grad = path_affinity_backward_op(grad_affinity.contiguous(), argmax, *ctx.grid)
    return -grad, None


@define_op(BACKWARD_OP, faces=(
    Face("reference", _reference_backward),
    Face("cpu", _cpu_backward),
    Face("triton", _triton_backward, limits=_triton_limits),
))
def path_affinity_backward_op(grad: torch.Tensor, argmax: torch.Tensor, h: int, w: int,
                              radius: int) -> torch.Tensor:
    """Contiguous ``grad (B, n_offsets, n_sources)`` and its uint8 ``argmax`` → ``(B, 1, h,
    w)``, each pair's gradient summed into its arg-max cell; this body is the fake."""
    return grad.new_empty((grad.shape[0], 1, h, w))


@define_op(OP, faces=(
    Face("reference", _reference_forward),
    Face("cpu", _cpu_forward),
    Face("triton", _triton_forward, limits=_triton_limits),
), backward=_backward, setup_context=_setup_context)
def path_affinity_op(boundary: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated, contiguous ``boundary (B, 1, h, w)`` → ``(affinity, argmax)``, both ``(B,
    n_offsets, n_sources)`` (argmax uint8: the arg-max cell's index in its path); this body is
    the fake."""
    batch, _, h, w = boundary.shape
    paths = irn_path_set(radius)
    shape = (batch, paths.num_offsets, paths.window(h, w).size)
    return boundary.new_empty(shape), boundary.new_empty(shape, dtype=torch.uint8)


def path_affinity(boundary: torch.Tensor, radius: int = DEFAULT_RADIUS) -> torch.Tensor:
    """IRN's affinities ``1 − max_path B`` for every pair of the radius-``radius`` path set.

    Args:
        boundary: ``(B, 1, h, w)`` boundary map (IRN: the sigmoid of the boundary logits at
            stride 4), float32/float16/bfloat16. NaNs propagate like ``torch.max``.
        radius: of the path set, an int in [1, 64] (IRN: 10 in training, 5 at inference);
            the grid needs ``h >= radius`` and ``w >= 2·radius − 1``.
    Returns:
        ``(B, n_offsets, n_sources)`` in ``boundary``'s dtype: offsets in IRN's order
        (``irn_path_set(radius).offsets``), sources the window cells row-major
        (``irn_path_set(radius).window(h, w)``) — IRN's ``to_affinity`` layout. Differentiable:
        each pair's gradient goes to its arg-max cell (only a uint8 per pair is kept).
    """
    check_tensor(OP, "boundary", boundary)
    if boundary.dim() != 4 or boundary.shape[1] != 1:
        raise ValueError(f"{OP}: boundary must be (B, 1, h, w), got shape "
                         f"{tuple(boundary.shape)}")
    try:
        check_radius(radius)
        irn_path_set(radius).window(boundary.shape[2], boundary.shape[3])
    except ValueError as exc:
        raise ValueError(f"{OP}: {exc}") from None
    return path_affinity_op(boundary.contiguous(), radius)[0]
