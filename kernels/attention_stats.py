"""Triton face of ``attention_stats``: one block's attention output plus its head-mean statistics.

For ``A_h = softmax(q_h k_hᵀ · scale)`` over all ``T = C + P`` keys and ``Ā = mean_h A_h``::

    o            = A v                     (B, H, T, d), returned in q's dtype
    cls2patch   += w · Ā[:, :C, C:]        (B, C, P)  fp32, in place
    patch2patch += u · Ā[:, C:, C:]        (B, P, P)  fp32, in place
    cls_row     += r · Ā[:, 0, C:]         (B, P)     fp32, in place

Tiling: one program per (block of ``BLOCK_M`` query rows, batch item).

* Phase 1, per head: a flash-attention sweep over ``BLOCK_N`` key blocks with an online softmax
  (running row max ``m`` and sum ``l``) writes ``o`` once. The final ``m`` and ``1/l`` of every head
  are kept in registers as ``(HEADS_PAD, BLOCK_M)`` tables.
* Phase 2, only when a statistic is requested and the program's rows feed one: per key block,
  the scores of every head are recomputed and ``Σ_h exp(s − m_h) / l_h`` is summed in a
  ``(BLOCK_M, BLOCK_N)`` tile, then each accumulator tile gets one read-modify-write. The program
  owns its rows, so no atomics are needed, and no ``H×T×T`` (nor ``T×T``) tensor ever exists.

Scores and the softmax are fp32; fp16/bf16 inputs use tensor cores with fp32 accumulation; fp32
inputs use TF32 tensor cores on a GPU (DESIGN §10: 3e-3) unless ``WSSS_FAST_FP32_DOTS=ieee`` asks
for IEEE fp32 dots (the 1e-5 contract); the interpreter always uses IEEE.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_stats_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    cls2patch_ptr, patch2patch_ptr, cls_row_ptr,
    cls2patch_weight, patch2patch_weight, cls_row_weight,
    scale, num_heads, seq_len, num_cls, head_dim,
    stats_rows_start, stats_rows_stop,
    HAS_CLS2PATCH: tl.constexpr, HAS_PATCH2PATCH: tl.constexpr, HAS_CLS_ROW: tl.constexpr,
    HEADS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row_block = tl.program_id(0)
    batch = tl.program_id(1)
    first_row = row_block * BLOCK_M
    rows = first_row + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seq_len
    dim_ok = dims < head_dim
    q_mask = row_ok[:, None] & dim_ok[None, :]
    num_patches = seq_len - num_cls

    # Per-head softmax statistics of this program's rows, for phase 2.
    head_ids = tl.arange(0, HEADS_PAD)
    row_max_per_head = tl.zeros((HEADS_PAD, BLOCK_M), dtype=tl.float32)
    inv_sum_per_head = tl.zeros((HEADS_PAD, BLOCK_M), dtype=tl.float32)

    # ---- phase 1: o = softmax(q kᵀ) v, online over key blocks ----
    for head in range(num_heads):
        head_base = (batch * num_heads + head).to(tl.int64) * seq_len * head_dim
        q = tl.load(q_ptr + head_base + rows[:, None] * head_dim + dims[None, :],
                    mask=q_mask, other=0.0)
        row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for key_start in range(0, seq_len, BLOCK_N):
            keys = key_start + tl.arange(0, BLOCK_N)
            key_ok = keys < seq_len
            kv_offsets = head_base + keys[:, None] * head_dim + dims[None, :]
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            # Key 0 is in the first block, so new_max is finite from the first step on.
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max
        out = acc / row_sum[:, None]
        tl.store(out_ptr + head_base + rows[:, None] * head_dim + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
        is_head = head_ids[:, None] == head
        row_max_per_head = tl.where(is_head, row_max[None, :], row_max_per_head)
        inv_sum_per_head = tl.where(is_head, (1.0 / row_sum)[None, :], inv_sum_per_head)

    # ---- phase 2: head-mean probabilities of the rows that feed an accumulator ----
    if HAS_CLS2PATCH or HAS_PATCH2PATCH or HAS_CLS_ROW:
        if (first_row < stats_rows_stop) & (first_row + BLOCK_M > stats_rows_start):
            patch_rows = (rows - num_cls).to(tl.int64)
            batch64 = batch.to(tl.int64)
            # Class-key columns feed no statistic: start at the block holding key C.
            for key_start in range((num_cls // BLOCK_N) * BLOCK_N, seq_len, BLOCK_N):
                keys = key_start + tl.arange(0, BLOCK_N)
                key_ok = keys < seq_len
                kv_offsets = keys[:, None] * head_dim + dims[None, :]
                kv_mask = key_ok[:, None] & dim_ok[None, :]
                prob_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for head in range(num_heads):
                    head_base = (batch * num_heads + head).to(tl.int64) * seq_len * head_dim
                    q = tl.load(q_ptr + head_base + rows[:, None] * head_dim + dims[None, :],
                                mask=q_mask, other=0.0)
                    k = tl.load(k_ptr + head_base + kv_offsets, mask=kv_mask, other=0.0)
                    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
                    # Pick this head's m and 1/l out of the register tables.
                    is_head = head_ids[:, None] == head
                    head_max = tl.sum(tl.where(is_head, row_max_per_head, 0.0), axis=0)
                    head_inv_sum = tl.sum(tl.where(is_head, inv_sum_per_head, 0.0), axis=0)
                    prob_sum += tl.exp(scores - head_max[:, None]) * head_inv_sum[:, None]
                head_mean = prob_sum / num_heads
                patch_cols = keys - num_cls
                col_ok = (keys >= num_cls) & key_ok
                if HAS_PATCH2PATCH:
                    mask = (row_ok & (rows >= num_cls))[:, None] & col_ok[None, :]
                    ptrs = (patch2patch_ptr + batch64 * num_patches * num_patches
                            + patch_rows[:, None] * num_patches + patch_cols[None, :])
                    old = tl.load(ptrs, mask=mask, other=0.0)
                    tl.store(ptrs, old + patch2patch_weight * head_mean, mask=mask)
                if HAS_CLS2PATCH:
                    mask = (rows < num_cls)[:, None] & col_ok[None, :]
                    ptrs = (cls2patch_ptr + batch64 * num_cls * num_patches
                            + rows[:, None].to(tl.int64) * num_patches + patch_cols[None, :])
                    old = tl.load(ptrs, mask=mask, other=0.0)
                    tl.store(ptrs, old + cls2patch_weight * head_mean, mask=mask)
                if HAS_CLS_ROW:
                    # Only row 0 is live: every row of the tile points at the same cls_row entry.
                    mask = (rows == 0)[:, None] & col_ok[None, :]
                    ptrs = (cls_row_ptr + batch64 * num_patches + patch_cols[None, :]
                            + rows[:, None] * 0)
                    old = tl.load(ptrs, mask=mask, other=0.0)
                    tl.store(ptrs, old + cls_row_weight * head_mean, mask=mask)


def tile_config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a flash-style sweep with a ``block_d``-wide head.

    Chosen from ptxas register reports for sm_80/sm_90 (no spills, or a few bytes): fp16/bf16 use
    tensor cores with 64-row tiles; fp32 IEEE dots run on CUDA cores and need smaller tiles."""
    if dtype == torch.float32:
        return 32, 32 if block_d <= 64 else 16, 8
    return 64, 64 if block_d <= 64 else 32, 8


FP32_DOTS_ENV = "WSSS_FAST_FP32_DOTS"


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of ``tl.dot`` for inputs of ``dtype`` on ``device`` (see the module
    docstring; 16-bit inputs ignore it)."""
    if dtype != torch.float32:
        return "tf32"
    choice = os.environ.get(FP32_DOTS_ENV, "").strip().lower()
    if not choice:
        return "tf32" if device.type == "cuda" else "ieee"
    if choice not in ("tf32", "ieee"):
        raise ValueError(f"{FP32_DOTS_ENV} must be tf32 or ieee, got {choice!r}")
    return choice


def _enabled(accumulator: Optional[torch.Tensor], weight: float) -> bool:
    return accumulator is not None and float(weight) != 0.0


def attention_stats_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           num_cls: int, cls2patch: Optional[torch.Tensor] = None,
                           cls2patch_weight: float = 0.0,
                           patch2patch: Optional[torch.Tensor] = None,
                           patch2patch_weight: float = 0.0, cls_row: Optional[torch.Tensor] = None,
                           cls_row_weight: float = 0.0, *, block_m: Optional[int] = None,
                           block_n: Optional[int] = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale) v`` for contiguous ``(B, H, T, d)`` inputs; updates the given fp32
    accumulators in place (skipped when None or weighted 0). ``block_m``/``block_n`` override the
    tile sizes (powers of two ≥ 16; tests use them to exercise multi-block loops)."""
    batch, num_heads, seq_len, head_dim = q.shape
    out = torch.empty_like(q)
    has_cls2patch = _enabled(cls2patch, cls2patch_weight)
    has_patch2patch = _enabled(patch2patch, patch2patch_weight)
    has_cls_row = _enabled(cls_row, cls_row_weight)

    # Rows of A that feed a requested statistic: [0, C) for class rows, [C, T) for patch rows.
    stats_rows_start = 0 if (has_cls2patch or has_cls_row) else num_cls
    if has_patch2patch:
        stats_rows_stop = seq_len
    elif has_cls2patch:
        stats_rows_stop = num_cls
    else:
        stats_rows_stop = 1 if has_cls_row else 0

    block_d = max(16, triton.next_power_of_2(head_dim))
    default_m, default_n, num_warps = tile_config(q.dtype, block_d)
    size_cap = max(16, triton.next_power_of_2(seq_len))
    block_m = block_m or min(default_m, size_cap)
    block_n = block_n or min(default_n, size_cap)
    # Unused accumulator slots get a valid pointer; the constexpr flags compile their code away.
    placeholder = out
    grid = (triton.cdiv(seq_len, block_m), batch)
    _attention_stats_kernel[grid](
        q, k, v, out,
        cls2patch if has_cls2patch else placeholder,
        patch2patch if has_patch2patch else placeholder,
        cls_row if has_cls_row else placeholder,
        float(cls2patch_weight), float(patch2patch_weight), float(cls_row_weight),
        float(scale), num_heads, seq_len, num_cls, head_dim,
        stats_rows_start, stats_rows_stop,
        HAS_CLS2PATCH=has_cls2patch, HAS_PATCH2PATCH=has_patch2patch, HAS_CLS_ROW=has_cls_row,
        HEADS_PAD=triton.next_power_of_2(num_heads), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_PRECISION=dot_precision(q.dtype, q.device),
        num_warps=num_warps,
    )
    return out
