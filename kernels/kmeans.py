"""Triton face of ``kmeans`` (semantics: ``wsss_fast.ops.kmeans``).

* ``_assign_kernel`` — one program per ``BLOCK_N`` rows: for each tile of ``BLOCK_K`` unit
  centres, a ``tl.dot`` loop over ``BLOCK_D`` feature chunks gives the ``(BLOCK_N, BLOCK_K)``
  scores ``x · μ̂``; a running argmax over the centre tiles (strictly greater replaces, so the
  first maximum wins on ties, as ``argmax``) yields each row's cluster and best score. Nothing of
  size ``N×K×D`` exists; centre tiles are padded to 16 with masked ``-inf`` scores.
* The iteration around it (the update as a float64 segment sum, the re-seeding rule and the stop
  test) is the triton face's runner in ``wsss_fast.ops.kmeans``.

fp32 with IEEE dot products (not TF32), so that assignments match the other faces except at
near-ties.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _assign_kernel(x_ptr, unit_ptr, assign_ptr, best_ptr, n, d, k,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    row_base = x_ptr + rows.to(tl.int64)[:, None] * d
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for k0 in range(0, k, BLOCK_K):
        centres = k0 + tl.arange(0, BLOCK_K)
        centre_ok = centres < k
        centre_base = unit_ptr + centres.to(tl.int64)[:, None] * d
        scores = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            x = tl.load(row_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            u = tl.load(centre_base + cols[None, :], mask=centre_ok[:, None] & col_ok[None, :],
                        other=0.0)
            scores = tl.dot(x, tl.trans(u), scores, input_precision="ieee")
        scores = tl.where(centre_ok[None, :], scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        tile_index = tl.argmax(scores, axis=1, tie_break_left=True).to(tl.int64) + k0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    tl.store(assign_ptr + rows, best_index, mask=row_ok)
    tl.store(best_ptr + rows, best, mask=row_ok)


def assign_triton(x: torch.Tensor, unit: torch.Tensor, *, block_n: Optional[int] = None,
                  block_k: Optional[int] = None, block_d: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(argmax_k x·μ̂_k, max_k x·μ̂_k)`` for contiguous fp32 ``x (N, D)``, ``unit (k, D)``; the
    tile sizes (powers of two, ``>= 16``) can be overridden."""
    n, d = x.shape
    k = unit.shape[0]
    block_n = block_n or 64
    block_k = block_k or min(64, max(16, triton.next_power_of_2(k)))
    block_d = block_d or min(64, max(16, triton.next_power_of_2(d)))
    assignments = torch.empty(n, dtype=torch.int64, device=x.device)
    best = torch.empty(n, dtype=torch.float32, device=x.device)
    _assign_kernel[(triton.cdiv(n, block_n),)](x, unit, assignments, best, n, d, k,
                                               BLOCK_N=block_n, BLOCK_K=block_k,
                                               BLOCK_D=block_d)
    return assignments, best
