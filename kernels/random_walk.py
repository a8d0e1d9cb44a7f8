"""Triton face of ``random_walk``: the affinity random walk as a normalized 69-tap gather.

* ``_walk_taps_kernel`` — one program per (``BLOCK_P`` pixels, batch item) builds the tap table
  ``coeff (B, 2·O, h·w)``: tap ``o`` is the forward partner ``(y + dy_o, x + dx_o)``, ``O + o``
  the backward partner ``(y − dy_o, x − dx_o)``, each pair weight divided by the pixel's degree
  ``1 + Σ`` of its in-grid pair weights (one ``(BLOCK_O, BLOCK_P)`` tile of weights per
  direction).
* ``_walk_step_kernel`` — one launch per step, one program per (``BLOCK_P`` pixels, plane):
  ``dst[j] = src[j] + Σ_t coeff[t, j] · (src[j + shift_t] − src[j])`` (the difference form of the
  normalized gather, see csrc/common/random_walk.h) over ``BLOCK_T``-tap chunks, reading the
  source plane zero-padded by ``radius − 1`` on every side (off-grid taps have coefficient 0),
  writing the interior of the other buffer (double buffering).

fp32 throughout; the output is cast to ``x0``'s dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def _walk_taps_kernel(weights_ptr, coeff_ptr, dy_ptr, dx_ptr, num_offsets, h, w,
                      BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    batch = tl.program_id(1).to(tl.int64)
    n = h * w
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < n
    y = pixels // w
    x = pixels % w
    offsets = tl.arange(0, BLOCK_O)
    offset_ok = offsets < num_offsets
    dy = tl.load(dy_ptr + offsets, mask=offset_ok, other=0)
    dx = tl.load(dx_ptr + offsets, mask=offset_ok, other=0)
    base = weights_ptr + batch * num_offsets * n + offsets[:, None].to(tl.int64) * n
    ok = offset_ok[:, None] & pixel_ok[None, :]

    to_y = y[None, :] + dy[:, None]
    to_x = x[None, :] + dx[:, None]
    forward_ok = ok & (to_y < h) & (to_x >= 0) & (to_x < w)
    forward = tl.load(base + pixels[None, :], mask=forward_ok, other=0.0).to(tl.float32)
    from_y = y[None, :] - dy[:, None]
    from_x = x[None, :] - dx[:, None]
    backward_ok = ok & (from_y >= 0) & (from_x >= 0) & (from_x < w)
    backward = tl.load(base + from_y * w + from_x, mask=backward_ok, other=0.0).to(tl.float32)

    degree = 1.0 + tl.sum(forward, axis=0) + tl.sum(backward, axis=0)
    out = coeff_ptr + batch * 2 * num_offsets * n
    rows = out + offsets[:, None].to(tl.int64) * n + pixels[None, :]
    tl.store(rows, forward / degree[None, :], mask=ok)
    tl.store(rows + num_offsets * n, backward / degree[None, :], mask=ok)


@triton.jit
def _walk_step_kernel(coeff_ptr, src_ptr, dst_ptr, shift_ptr, num_taps, classes, h, w, pitch,
                      plane_size, pad, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    plane = tl.program_id(1).to(tl.int64)
    batch = plane // classes
    n = h * w
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < n
    centre = plane * plane_size + (pixels // w + pad) * pitch + pixels % w + pad
    coeff = coeff_ptr + batch * num_taps * n
    x = tl.load(src_ptr + centre, mask=pixel_ok, other=0.0)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for start in range(0, num_taps, BLOCK_T):
        taps = start + tl.arange(0, BLOCK_T)
        tap_ok = taps < num_taps
        shift = tl.load(shift_ptr + taps, mask=tap_ok, other=0)
        ok = tap_ok[:, None] & pixel_ok[None, :]
        c = tl.load(coeff + taps[:, None].to(tl.int64) * n + pixels[None, :], mask=ok, other=0.0)
        v = tl.load(src_ptr + centre[None, :] + shift[:, None], mask=ok, other=0.0)
        acc += tl.sum(c * (v - x[None, :]), axis=0)
    tl.store(dst_ptr + centre, x + acc, mask=pixel_ok)


def random_walk_triton(x0: torch.Tensor, weights: torch.Tensor, steps: int,
                       offsets: Sequence[tuple[int, int]], *, block_p: Optional[int] = None,
                       block_t: Optional[int] = None) -> torch.Tensor:
    """``x0 @ T^steps`` for contiguous ``x0 (B, K, h, w)`` and ``weights (B, O, h, w)`` of the
    pair ``offsets`` ``(dy, dx)`` (``wsss_fast.ops.random_walk.half_disk_offsets``); output in
    ``x0``'s dtype. ``block_p`` (pixels per program) and ``block_t`` (taps per chunk) override
    the tile sizes (powers of two)."""
    batch, classes, h, w = x0.shape
    num_offsets, n, device = len(offsets), h * w, x0.device
    num_taps = 2 * num_offsets
    pad = max(max(abs(dy_), abs(dx_)) for dy_, dx_ in offsets)  # radius - 1 for a half disk
    pitch, padded_h = w + 2 * pad, h + 2 * pad
    block_p = block_p or min(128, max(16, triton.next_power_of_2(n)))
    block_t = block_t or 32

    dy = torch.tensor([o[0] for o in offsets], dtype=torch.int32, device=device)
    dx = torch.tensor([o[1] for o in offsets], dtype=torch.int32, device=device)
    coeff = torch.empty((batch, num_taps, n), dtype=torch.float32, device=device)
    _walk_taps_kernel[(triton.cdiv(n, block_p), batch)](
        weights, coeff, dy, dx, num_offsets, h, w,
        BLOCK_P=block_p, BLOCK_O=triton.next_power_of_2(num_offsets))

    shifts = [dy_ * pitch + dx_ for dy_, dx_ in offsets]
    shift = torch.tensor(shifts + [-s for s in shifts], dtype=torch.int64, device=device)
    # The halo of both buffers stays 0: the steps write the interior only.
    src = torch.zeros((batch, classes, padded_h, pitch), dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    src[:, :, pad:pad + h, pad:pad + w] = x0
    grid = (triton.cdiv(n, block_p), batch * classes)
    for _ in range(steps):
        _walk_step_kernel[grid](coeff, src, dst, shift, num_taps, classes, h, w, pitch,
                                padded_h * pitch, pad, BLOCK_P=block_p, BLOCK_T=block_t)
        src, dst = dst, src
    return src[:, :, pad:pad + h, pad:pad + w].to(x0.dtype).contiguous()
