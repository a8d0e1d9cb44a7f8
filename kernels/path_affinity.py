"""Triton face of ``path_affinity``: IRN's path-max affinity without gathering the paths.

* ``_path_max_kernel`` — one program per (``BLOCK`` sources, offset, batch item): walks the
  offset's path cells (``cells[start[o]:start[o + 1]]``, element 0 the offset), keeping the
  running max and its index (ties: the first cell; a NaN wins, the first one), and stores
  ``1 − max`` in the boundary's dtype and the index as uint8.
* ``_path_max_backward_kernel`` — same grid: adds each pair's gradient to its arg-max cell of a
  float32 ``(B, h·w)`` plane with ``atomic_add`` (the summation order is not fixed).

The path table comes from ``wsss_fast.ops.irn_paths`` (``cell_tables``); compute in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _path_max_kernel(boundary_ptr, affinity_ptr, argmax_ptr, cells_ptr, start_ptr, num_offsets,
                     h, w, cols, num_sources, floor, BLOCK: tl.constexpr):
    offset = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    sources = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = sources < num_sources
    origin = boundary_ptr + batch * h * w + (sources // cols) * w + sources % cols + floor
    first = tl.load(start_ptr + offset)
    stop = tl.load(start_ptr + offset + 1)
    best = tl.load(origin + tl.load(cells_ptr + 2 * first) * w + tl.load(cells_ptr + 2 * first + 1),
                   mask=ok, other=0.0).to(tl.float32)
    arg = tl.zeros((BLOCK,), dtype=tl.int32)
    for k in range(first + 1, stop):
        cy = tl.load(cells_ptr + 2 * k)
        cx = tl.load(cells_ptr + 2 * k + 1)
        v = tl.load(origin + cy * w + cx, mask=ok, other=0.0).to(tl.float32)
        take = (v > best) | ((v != v) & (best == best))
        best = tl.where(take, v, best)
        arg = tl.where(take, k - first, arg)
    pair = (batch * num_offsets + offset) * num_sources + sources
    tl.store(affinity_ptr + pair, (1.0 - best).to(affinity_ptr.dtype.element_ty), mask=ok)
    tl.store(argmax_ptr + pair, arg.to(tl.uint8), mask=ok)


@triton.jit
def _path_max_backward_kernel(grad_ptr, argmax_ptr, out_ptr, cells_ptr, start_ptr, num_offsets,
                              h, w, cols, num_sources, floor, BLOCK: tl.constexpr):
    offset = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    sources = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = sources < num_sources
    pair = (batch * num_offsets + offset) * num_sources + sources
    grad = tl.load(grad_ptr + pair, mask=ok, other=0.0).to(tl.float32)
    cell = tl.load(start_ptr + offset) + tl.load(argmax_ptr + pair, mask=ok, other=0).to(tl.int32)
    cy = tl.load(cells_ptr + 2 * cell, mask=ok, other=0)
    cx = tl.load(cells_ptr + 2 * cell + 1, mask=ok, other=0)
    target = (sources // cols + cy) * w + sources % cols + floor + cx
    tl.atomic_add(out_ptr + batch * h * w + target, grad, mask=ok)


def _block(num_sources: int, block: Optional[int]) -> int:
    return block or min(256, max(16, triton.next_power_of_2(num_sources)))


def path_affinity_triton(boundary: torch.Tensor, cells: torch.Tensor, start: torch.Tensor,
                         floor: int, *, block: Optional[int] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 − path max, argmax uint8)``, both ``(B, n_offsets, n_sources)``, for a contiguous
    ``boundary (B, 1, h, w)`` and the path table ``cells (n, 2)`` / ``start (n_offsets + 1,)``
    (int32, on the boundary's device); ``block`` (sources per program) overrides the tile."""
    batch, _, h, w = boundary.shape
    rows, cols = h - floor, w - 2 * floor
    num_offsets, num_sources = start.numel() - 1, rows * cols
    affinity = torch.empty((batch, num_offsets, num_sources), dtype=boundary.dtype,
                           device=boundary.device)
    argmax = torch.empty(affinity.shape, dtype=torch.uint8, device=boundary.device)
    if affinity.numel() == 0:
        return affinity, argmax
    block = _block(num_sources, block)
    grid = (triton.cdiv(num_sources, block), num_offsets, batch)
    _path_max_kernel[grid](boundary, affinity, argmax, cells, start, num_offsets, h, w, cols,
                           num_sources, floor, BLOCK=block)
    return affinity, argmax


def path_affinity_backward_triton(grad: torch.Tensor, argmax: torch.Tensor, cells: torch.Tensor,
                                  start: torch.Tensor, h: int, w: int, floor: int, *,
                                  block: Optional[int] = None) -> torch.Tensor:
    """Each pair's gradient of a contiguous ``grad (B, n_offsets, n_sources)`` summed into its
    arg-max cell: ``(B, 1, h, w)`` in ``grad``'s dtype (accumulated in float32)."""
    batch, num_offsets, num_sources = grad.shape
    cols = w - 2 * floor
    out = torch.zeros((batch, h * w), dtype=torch.float32, device=grad.device)
    if grad.numel() > 0:
        block = _block(num_sources, block)
        grid = (triton.cdiv(num_sources, block), num_offsets, batch)
        _path_max_backward_kernel[grid](grad, argmax, out, cells, start, num_offsets, h, w, cols,
                                        num_sources, floor, BLOCK=block)
    return out.view(batch, 1, h, w).to(grad.dtype)
