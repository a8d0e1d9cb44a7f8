"""Triton face of ``path_affinity``: IRN's path-max affinity without gathering the paths.

* ``_path_max_kernel`` — one program per (``BLOCK_S`` sources, ``BLOCK_O`` offsets, batch
  item): walks the offsets' path cells (``cells[start[o]:start[o + 1]]``, element 0 the offset)
  up to the block's longest path (IRN's offsets come sorted by length: little is masked), keeping
  the running max and its index (ties: the first cell; a NaN wins, the first one), and stores
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
                     h, w, cols, num_sources, floor, BLOCK_O: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    batch = tl.program_id(2).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    sources = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offset_ok = offsets < num_offsets
    ok = offset_ok[:, None] & (sources < num_sources)[None, :]
    first = tl.load(start_ptr + offsets, mask=offset_ok, other=0)
    length = tl.load(start_ptr + offsets + 1, mask=offset_ok, other=0) - first
    longest = tl.max(length, axis=0)
    origin = boundary_ptr + batch * h * w + ((sources // cols) * w + sources % cols + floor)[None, :]
    best = tl.full((BLOCK_O, BLOCK_S), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_O, BLOCK_S), dtype=tl.int32)
    for k in range(0, longest):
        on_path = offset_ok & (k < length)
        cy = tl.load(cells_ptr + 2 * (first + k), mask=on_path, other=0)
        cx = tl.load(cells_ptr + 2 * (first + k) + 1, mask=on_path, other=0)
        live = ok & on_path[:, None]
        v = tl.load(origin + (cy * w + cx)[:, None], mask=live, other=0.0).to(tl.float32)
        # cell 0 always starts the max; then larger, or the first NaN
        take = live & ((k == 0) | (v > best) | ((v != v) & (best == best)))
        best = tl.where(take, v, best)
        arg = tl.where(take, k, arg)
    pair = (batch * num_offsets + offsets[:, None]) * num_sources + sources[None, :]
    tl.store(affinity_ptr + pair, (1.0 - best).to(affinity_ptr.dtype.element_ty), mask=ok)
    tl.store(argmax_ptr + pair, arg.to(tl.uint8), mask=ok)


@triton.jit
def _path_max_backward_kernel(grad_ptr, argmax_ptr, out_ptr, cells_ptr, start_ptr, num_offsets,
                              h, w, cols, num_sources, floor, BLOCK_O: tl.constexpr,
                              BLOCK_S: tl.constexpr):
    batch = tl.program_id(2).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    sources = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offset_ok = offsets < num_offsets
    ok = offset_ok[:, None] & (sources < num_sources)[None, :]
    pair = (batch * num_offsets + offsets[:, None]) * num_sources + sources[None, :]
    grad = tl.load(grad_ptr + pair, mask=ok, other=0.0).to(tl.float32)
    first = tl.load(start_ptr + offsets, mask=offset_ok, other=0)
    cell = first[:, None] + tl.load(argmax_ptr + pair, mask=ok, other=0).to(tl.int32)
    cy = tl.load(cells_ptr + 2 * cell, mask=ok, other=0)
    cx = tl.load(cells_ptr + 2 * cell + 1, mask=ok, other=0)
    target = ((sources // cols) * w + sources % cols + floor)[None, :] + cy * w + cx
    tl.atomic_add(out_ptr + batch * h * w + target, grad, mask=ok)


def _blocks(num_offsets: int, num_sources: int, block_o: Optional[int],
            block_s: Optional[int]) -> tuple[int, int]:
    return (block_o or min(32, max(2, triton.next_power_of_2(num_offsets))),
            block_s or min(128, max(16, triton.next_power_of_2(num_sources))))


def path_affinity_triton(boundary: torch.Tensor, cells: torch.Tensor, start: torch.Tensor,
                         floor: int, *, block_o: Optional[int] = None,
                         block_s: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 − path max, argmax uint8)``, both ``(B, n_offsets, n_sources)``, for a contiguous
    ``boundary (B, 1, h, w)`` and the path table ``cells (n, 2)`` / ``start (n_offsets + 1,)``
    (int32, on the boundary's device); ``block_o`` / ``block_s``
    (offsets / sources per program, powers of two) override the tile."""
    batch, _, h, w = boundary.shape
    rows, cols = h - floor, w - 2 * floor
    num_offsets, num_sources = start.numel() - 1, rows * cols
    affinity = torch.empty((batch, num_offsets, num_sources), dtype=boundary.dtype,
                           device=boundary.device)
    argmax = torch.empty(affinity.shape, dtype=torch.uint8, device=boundary.device)
    if affinity.numel() == 0:
        return affinity, argmax
    block_o, block_s = _blocks(num_offsets, num_sources, block_o, block_s)
    grid = (triton.cdiv(num_sources, block_s), triton.cdiv(num_offsets, block_o), batch)
    _path_max_kernel[grid](boundary, affinity, argmax, cells, start, num_offsets, h, w, cols,
                           num_sources, floor, BLOCK_O=block_o, BLOCK_S=block_s)
    return affinity, argmax


def path_affinity_backward_triton(grad: torch.Tensor, argmax: torch.Tensor, cells: torch.Tensor,
                                  start: torch.Tensor, h: int, w: int, floor: int, *,
                                  block_o: Optional[int] = None,
                                  block_s: Optional[int] = None) -> torch.Tensor:
    """Each pair's gradient of a contiguous ``grad (B, n_offsets, n_sources)`` summed into its
    arg-max cell: ``(B, 1, h, w)`` in ``grad``'s dtype (accumulated in float32)."""
    batch, num_offsets, num_sources = grad.shape
    cols = w - 2 * floor
    out = torch.zeros((batch, h * w), dtype=torch.float32, device=grad.device)
    if grad.numel() > 0:
        block_o, block_s = _blocks(num_offsets, num_sources, block_o, block_s)
        grid = (triton.cdiv(num_sources, block_s), triton.cdiv(num_offsets, block_o), batch)
        _path_max_backward_kernel[grid](grad, argmax, out, cells, start, num_offsets, h, w, cols,
                                        num_sources, floor, BLOCK_O=block_o, BLOCK_S=block_s)
    return out.view(batch, 1, h, w).to(grad.dtype)
