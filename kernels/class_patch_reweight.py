"""Triton face of ``class_patch_reweight``: row-wise ``φ_γ`` re-weighting of attention rows.

Per row ``a`` of a contiguous ``(R, N)`` tensor, in fp32::

    a   = max(a, 0)
    out = (Σ a) · a^γ / Σ a^γ          (0 for a row with Σ a^γ = 0, i.e. an all-zero row)
    out = out · max(patchcam, 0)        (optional)
    out = sqrt(out)                     (optional)

``a^γ / Σ a^γ`` is evaluated as ``(a/m)^γ / Σ (a/m)^γ`` with ``m`` the row max, so the powers lie in
[0, 1] and the denominator is ≥ 1: no overflow for large γ and no 0/0 for small entries.

Tiling: one program per row; three sweeps over ``BLOCK_N`` column blocks (row max and mass, then
the power sum, then the output). For ``N ≤ BLOCK_N`` each sweep is one block and the re-reads hit
the cache.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _relative_power(values, row_max, gamma):
    """(values / row_max) ** gamma for values in [0, row_max]; 0 stays 0."""
    ratio = values / row_max
    positive = ratio > 0
    powered = tl.exp2(gamma * tl.log2(tl.where(positive, ratio, 1.0)))
    return tl.where(positive, powered, 0.0)


@triton.jit
def _class_patch_reweight_kernel(
    attn_ptr, patchcam_ptr, out_ptr, num_cols, gamma,
    HAS_PATCHCAM: tl.constexpr, TAKE_SQRT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_base = tl.program_id(0).to(tl.int64) * num_cols
    offsets = tl.arange(0, BLOCK_N)

    # Sweep 1: row max and row mass of max(a, 0) (0 is the identity of both: a ≥ 0).
    max_lanes = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mass_lanes = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, num_cols, BLOCK_N):
        cols = start + offsets
        values = tl.load(attn_ptr + row_base + cols, mask=cols < num_cols, other=0.0)
        values = tl.maximum(values.to(tl.float32), 0.0)
        max_lanes = tl.maximum(max_lanes, values)
        mass_lanes += values
    row_max = tl.max(max_lanes, axis=0)
    row_mass = tl.sum(mass_lanes, axis=0)
    # An all-zero row has Σ a^γ = 0 and maps to 0; a dummy divisor keeps it NaN-free.
    nonzero_row = row_max > 0
    safe_max = tl.where(nonzero_row, row_max, 1.0)

    # Sweep 2: Σ (a/m)^γ (≥ 1 for a non-zero row: the max entry contributes 1).
    power_lanes = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, num_cols, BLOCK_N):
        cols = start + offsets
        values = tl.load(attn_ptr + row_base + cols, mask=cols < num_cols, other=0.0)
        values = tl.maximum(values.to(tl.float32), 0.0)
        power_lanes += _relative_power(values, safe_max, gamma)
    power_sum = tl.where(nonzero_row, tl.sum(power_lanes, axis=0), 1.0)
    factor = tl.where(nonzero_row, row_mass / power_sum, 0.0)

    # Sweep 3: the output.
    for start in range(0, num_cols, BLOCK_N):
        cols = start + offsets
        col_ok = cols < num_cols
        values = tl.load(attn_ptr + row_base + cols, mask=col_ok, other=0.0)
        values = tl.maximum(values.to(tl.float32), 0.0)
        result = factor * _relative_power(values, safe_max, gamma)
        if HAS_PATCHCAM:
            cam = tl.load(patchcam_ptr + row_base + cols, mask=col_ok, other=0.0)
            result = result * tl.maximum(cam.to(tl.float32), 0.0)
        if TAKE_SQRT:
            result = tl.sqrt_rn(result)
        tl.store(out_ptr + row_base + cols, result.to(out_ptr.dtype.element_ty), mask=col_ok)


def class_patch_reweight_triton(attn: torch.Tensor, gamma: float,
                                patchcam: Optional[torch.Tensor] = None, sqrt: bool = False, *,
                                block_n: Optional[int] = None) -> torch.Tensor:
    """``φ_γ`` of every row of a contiguous 2-D ``attn``; ``patchcam`` (same shape and dtype) is
    multiplied in after ReLU, ``sqrt`` takes the square root last. Output in ``attn``'s dtype.
    ``block_n`` overrides the column block (a power of two; tests use it to force several)."""
    num_rows, num_cols = attn.shape
    out = torch.empty_like(attn)
    block_n = block_n or min(1024, max(16, triton.next_power_of_2(num_cols)))
    _class_patch_reweight_kernel[(num_rows,)](
        attn, attn if patchcam is None else patchcam, out, num_cols, float(gamma),
        HAS_PATCHCAM=patchcam is not None, TAKE_SQRT=bool(sqrt), BLOCK_N=block_n,
        num_warps=4 if block_n >= 512 else 2,
    )
    return out
