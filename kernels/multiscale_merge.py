"""Triton face of ``multiscale_merge``: resize every pass to the output size, flip back, merge,
normalize per ``(b, k)`` plane, without a full-size temporary per pass.

The passes ``(B, K, h_i, w_i)`` are packed into one flat fp32 buffer; small per-pass tables hold
each pass's start offset (int64), height, width, flip flag and the fp32 scales ``h_i/H``, ``w_i/W``.

* ``_merge_passes_kernel`` — one program per (plane, ``(BLOCK_H, BLOCK_W)`` output tile). For
  each pass it samples the low-res map bilinearly exactly as ``F.interpolate(mode="bilinear",
  align_corners=False)`` (row and column coordinates are computed once per tile as 1-D vectors),
  mirrored along the width for flipped passes, optionally ReLU'd, and merges: a sum over passes,
  or for ``max_flip`` the max within each (image, flipped) pair summed over pairs. Then it applies
  the label weight, stores the tile, and when a normalization needs them writes the tile's
  min/max to a ``(planes, tiles)`` table.
* ``_plane_range_kernel`` — one program per plane reduces its tiles' min/max.
* ``_normalize_kernel`` — the same tiling as the merge; rewrites each tile normalized in place.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _output_tile(out_h, out_w, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's (plane, output rows, output columns, in-bounds mask): grid (plane, y, x)."""
    plane = tl.program_id(0)
    out_ys = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    out_xs = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    inside = (out_ys < out_h)[:, None] & (out_xs < out_w)[None, :]
    return plane, out_ys, out_xs, inside


@triton.jit
def _source_coords(dst, scale, in_size):
    """F.interpolate's align_corners=False source coordinate of output index ``dst``: the low
    index, the high index (clamped to the edge) and the weight of the high one."""
    # src = scale·(dst + 0.5) − 0.5 rounded once, as PyTorch's CPU and CUDA kernels get it from a
    # fused multiply-add; fp64 holds the product and the difference exactly.
    centre = (dst.to(tl.float32) + 0.5).to(tl.float64)
    src = (scale.to(tl.float64) * centre - 0.5).to(tl.float32)
    src = tl.maximum(src, 0.0)
    low = tl.minimum(tl.floor(src).to(tl.int32), in_size - 1)
    high_weight = tl.minimum(tl.maximum(src - low.to(tl.float32), 0.0), 1.0)
    high = tl.minimum(low + 1, in_size - 1)
    return low, high, high_weight


@triton.jit
def _sample_pass(
    packed_ptr, pass_offsets_ptr, pass_heights_ptr, pass_widths_ptr, pass_flips_ptr,
    pass_scale_h_ptr, pass_scale_w_ptr, pass_index, plane, out_ys, out_xs, out_w, inside,
    APPLY_RELU: tl.constexpr,
):
    """Pass ``pass_index`` of ``plane`` resized to the output grid at ``(out_ys, out_xs)``."""
    pass_offset = tl.load(pass_offsets_ptr + pass_index)
    in_h = tl.load(pass_heights_ptr + pass_index)
    in_w = tl.load(pass_widths_ptr + pass_index)
    flipped = tl.load(pass_flips_ptr + pass_index) != 0
    scale_h = tl.load(pass_scale_h_ptr + pass_index)
    scale_w = tl.load(pass_scale_w_ptr + pass_index)

    # A flipped pass ran on the mirrored image: its value at x is the resized map at W−1−x.
    sample_xs = tl.where(flipped, out_w - 1 - out_xs, out_xs)
    y0, y1, wy = _source_coords(out_ys, scale_h, in_h)
    x0, x1, wx = _source_coords(sample_xs, scale_w, in_w)

    plane_base = packed_ptr + pass_offset + plane.to(tl.int64) * in_h * in_w
    row0 = plane_base + y0.to(tl.int64)[:, None] * in_w
    row1 = plane_base + y1.to(tl.int64)[:, None] * in_w
    v00 = tl.load(row0 + x0[None, :], mask=inside, other=0.0)
    v01 = tl.load(row0 + x1[None, :], mask=inside, other=0.0)
    v10 = tl.load(row1 + x0[None, :], mask=inside, other=0.0)
    v11 = tl.load(row1 + x1[None, :], mask=inside, other=0.0)
    wx = wx[None, :]
    wy = wy[:, None]
    top = (1.0 - wx) * v00 + wx * v01
    bottom = (1.0 - wx) * v10 + wx * v11
    value = (1.0 - wy) * top + wy * bottom
    if APPLY_RELU:
        value = tl.maximum(value, 0.0)
    return value


@triton.jit
def _merge_passes_kernel(
    packed_ptr, pass_offsets_ptr, pass_heights_ptr, pass_widths_ptr, pass_flips_ptr,
    pass_scale_h_ptr, pass_scale_w_ptr, labels_ptr, out_ptr, tile_min_ptr, tile_max_ptr,
    num_passes, out_h, out_w,
    APPLY_RELU: tl.constexpr, MAX_OVER_FLIP_PAIRS: tl.constexpr, HAS_LABELS: tl.constexpr,
    NEEDS_RANGE: tl.constexpr, RANGE_OF_RELU: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    plane, out_ys, out_xs, inside = _output_tile(out_h, out_w, BLOCK_H, BLOCK_W)

    merged = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    if MAX_OVER_FLIP_PAIRS:
        for pair in range(num_passes // 2):
            image = _sample_pass(packed_ptr, pass_offsets_ptr, pass_heights_ptr, pass_widths_ptr,
                                 pass_flips_ptr, pass_scale_h_ptr, pass_scale_w_ptr, 2 * pair,
                                 plane, out_ys, out_xs, out_w, inside, APPLY_RELU)
            mirrored = _sample_pass(packed_ptr, pass_offsets_ptr, pass_heights_ptr,
                                    pass_widths_ptr, pass_flips_ptr, pass_scale_h_ptr,
                                    pass_scale_w_ptr, 2 * pair + 1, plane, out_ys, out_xs, out_w,
                                    inside, APPLY_RELU)
            merged += tl.maximum(image, mirrored)
    else:
        for pass_index in range(num_passes):
            merged += _sample_pass(packed_ptr, pass_offsets_ptr, pass_heights_ptr,
                                   pass_widths_ptr, pass_flips_ptr, pass_scale_h_ptr,
                                   pass_scale_w_ptr, pass_index, plane, out_ys, out_xs, out_w,
                                   inside, APPLY_RELU)
    if HAS_LABELS:
        merged = merged * tl.load(labels_ptr + plane)

    plane_offset = plane.to(tl.int64) * out_h * out_w
    out_offsets = plane_offset + out_ys.to(tl.int64)[:, None] * out_w + out_xs[None, :]
    tl.store(out_ptr + out_offsets, merged, mask=inside)

    if NEEDS_RANGE:
        ranged = merged
        if RANGE_OF_RELU:
            ranged = tl.maximum(merged, 0.0)
        tiles_x = tl.num_programs(2)
        tile_index = ((plane.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tiles_x
                      + tl.program_id(2))
        tl.store(tile_min_ptr + tile_index, tl.min(tl.where(inside, ranged, float("inf"))))
        tl.store(tile_max_ptr + tile_index, tl.max(tl.where(inside, ranged, float("-inf"))))


@triton.jit
def _plane_range_kernel(tile_min_ptr, tile_max_ptr, plane_min_ptr, plane_max_ptr,
                        tiles_per_plane, BLOCK_T: tl.constexpr):
    plane = tl.program_id(0)
    base = plane.to(tl.int64) * tiles_per_plane
    lows = tl.full((BLOCK_T,), float("inf"), dtype=tl.float32)
    highs = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    for start in range(0, tiles_per_plane, BLOCK_T):
        tiles = start + tl.arange(0, BLOCK_T)
        tile_ok = tiles < tiles_per_plane
        lows = tl.minimum(lows, tl.load(tile_min_ptr + base + tiles, mask=tile_ok,
                                        other=float("inf")))
        highs = tl.maximum(highs, tl.load(tile_max_ptr + base + tiles, mask=tile_ok,
                                          other=float("-inf")))
    tl.store(plane_min_ptr + plane, tl.min(lows))
    tl.store(plane_max_ptr + plane, tl.max(highs))


@triton.jit
def _normalize_kernel(out_ptr, plane_min_ptr, plane_max_ptr, out_h, out_w, eps,
                      NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane, out_ys, out_xs, inside = _output_tile(out_h, out_w, BLOCK_H, BLOCK_W)
    offsets = (plane.to(tl.int64) * out_h * out_w + out_ys.to(tl.int64)[:, None] * out_w
               + out_xs[None, :])
    x = tl.load(out_ptr + offsets, mask=inside, other=0.0)
    low = tl.load(plane_min_ptr + plane)
    high = tl.load(plane_max_ptr + plane)
    if NORM == "minmax":
        x = (x - low) / (high - low + eps)
    elif NORM == "max":
        denom = high + eps
        x = tl.where(denom != 0, x / tl.where(denom != 0, denom, 1.0), 0.0)
    else:  # "transcam": TransCAM's thresholded min-max of the ReLU'd map (low/high are of it).
        x = tl.maximum(x, 0.0)
        x = tl.where(x < low + eps, 0.0, x)
        x = (x - low - eps) / (high - low + eps)
    tl.store(out_ptr + offsets, x, mask=inside)


def multiscale_merge_triton(maps: Sequence[torch.Tensor], flips: Sequence[bool], out_h: int,
                            out_w: int, relu: bool, labels: Optional[torch.Tensor], merge: str,
                            norm: str, eps: float, *, block_h: Optional[int] = None,
                            block_w: Optional[int] = None) -> torch.Tensor:
    """Merged, normalized ``(B, K, out_h, out_w)`` fp32 map of contiguous fp32 passes ``maps``
    (see ``wsss_fast.ops.multiscale_merge``). ``block_h``/``block_w`` override the tile."""
    if merge not in ("sum", "max_flip"):
        raise ValueError(f"multiscale_merge_triton: unknown merge {merge!r}")
    if norm not in ("none", "minmax", "max", "transcam"):
        raise ValueError(f"multiscale_merge_triton: unknown norm {norm!r}")
    batch, classes = maps[0].shape[:2]
    num_planes = batch * classes
    device = maps[0].device

    # Pass tables; scales are fp32 h_i/H as PyTorch computes them for a given output size.
    packed = torch.cat([m.reshape(-1).float() for m in maps])
    starts = [0]
    for m in maps[:-1]:
        starts.append(starts[-1] + m.numel())
    pass_offsets = torch.tensor(starts, dtype=torch.int64).to(device)
    pass_flips = torch.tensor([1 if f else 0 for f in flips], dtype=torch.int32).to(device)
    heights = [m.shape[2] for m in maps]
    widths = [m.shape[3] for m in maps]
    pass_heights = torch.tensor(heights, dtype=torch.int32).to(device)
    pass_widths = torch.tensor(widths, dtype=torch.int32).to(device)
    pass_scale_h = (torch.tensor(heights, dtype=torch.float32) / out_h).to(device)
    pass_scale_w = (torch.tensor(widths, dtype=torch.float32) / out_w).to(device)

    block_h = block_h or min(8, triton.next_power_of_2(out_h))
    block_w = block_w or min(64, max(16, triton.next_power_of_2(out_w)))
    tiles_y, tiles_x = triton.cdiv(out_h, block_h), triton.cdiv(out_w, block_w)
    # Planes on axis 0: the only axis whose size may exceed 65535.
    grid = (num_planes, tiles_y, tiles_x)
    needs_range = norm != "none"
    out = torch.empty((batch, classes, out_h, out_w), dtype=torch.float32, device=device)
    range_shape = (num_planes, tiles_y * tiles_x) if needs_range else (1,)
    tile_min = torch.empty(range_shape, dtype=torch.float32, device=device)
    tile_max = torch.empty(range_shape, dtype=torch.float32, device=device)

    _merge_passes_kernel[grid](
        packed, pass_offsets, pass_heights, pass_widths, pass_flips, pass_scale_h, pass_scale_w,
        out if labels is None else labels, out, tile_min, tile_max,
        len(maps), out_h, out_w,
        APPLY_RELU=bool(relu), MAX_OVER_FLIP_PAIRS=merge == "max_flip",
        HAS_LABELS=labels is not None, NEEDS_RANGE=needs_range,
        RANGE_OF_RELU=norm == "transcam", BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
    )
    if not needs_range:
        return out

    plane_min = torch.empty(num_planes, dtype=torch.float32, device=device)
    plane_max = torch.empty(num_planes, dtype=torch.float32, device=device)
    _plane_range_kernel[(num_planes,)](
        tile_min, tile_max, plane_min, plane_max, tiles_y * tiles_x,
        BLOCK_T=min(1024, triton.next_power_of_2(tiles_y * tiles_x)), num_warps=4,
    )
    _normalize_kernel[grid](
        out, plane_min, plane_max, out_h, out_w, float(eps),
        NORM=norm, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4,
    )
    return out
