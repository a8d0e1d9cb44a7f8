"""Triton faces of ``propagate``: attention-times-CAM refinement.

``propagate_triton`` — dense ``out[b] = affinity[b] @ cam[b]``, ``(P, P) @ (P, K) -> (P, K)``.
Tiling: one program per (``BLOCK_M`` rows, ``BLOCK_K`` classes, batch item), a ``tl.dot`` loop
over ``BLOCK_N`` blocks of the reduction dimension into an fp32 register tile; K (often 1..80) is
padded to a power of two with masks.

``propagate_streaming_triton`` — the same product with the affinity
``Σ_l w_l · mean_h softmax(q_l k_lᵀ · scale)[C:, C:]`` formed on the fly, flash-attention style with
``V = [0 for the C class keys; cam]``: the softmax normalizes over all T keys, class keys included,
but only patch keys carry a value. Tiling: one program per (``BLOCK_M`` patch query rows,
``BLOCK_K`` classes, batch item); for every layer of non-zero weight and every head an online
softmax sweep over ``BLOCK_N`` key blocks, summed into an fp32 ``(BLOCK_M, BLOCK_K)`` register
accumulator. Nothing of size P×P exists.

fp32 operands use IEEE dot products (not TF32) to meet the 1e-5 contract.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from wsss_fast.kernels.attention_stats import dot_precision, tile_config


def _matmul_tiles(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K cap, num_warps) of the dense product; fp32 IEEE dots run on CUDA
    cores and take smaller tiles to stay in registers (ptxas reports, sm_80/sm_90)."""
    if dtype == torch.float32:
        return 32, 32, 64, 4
    return 64, 64, 64, 4


@triton.jit
def _propagate_kernel(
    affinity_ptr, cam_ptr, out_ptr, num_patches, num_classes,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    row_block = tl.program_id(0)
    class_block = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    classes = class_block * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < num_patches
    class_ok = classes < num_classes
    affinity_rows = (affinity_ptr + batch * num_patches * num_patches
                     + rows[:, None].to(tl.int64) * num_patches)
    cam_base = cam_ptr + batch * num_patches * num_classes

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for start in range(0, num_patches, BLOCK_N):
        inner = start + tl.arange(0, BLOCK_N)
        inner_ok = inner < num_patches
        affinity = tl.load(affinity_rows + inner[None, :],
                           mask=row_ok[:, None] & inner_ok[None, :], other=0.0)
        cam = tl.load(cam_base + inner[:, None].to(tl.int64) * num_classes + classes[None, :],
                      mask=inner_ok[:, None] & class_ok[None, :], other=0.0)
        acc = tl.dot(affinity, cam, acc, input_precision=DOT_PRECISION)

    out_ptrs = (out_ptr + batch * num_patches * num_classes
                + rows[:, None].to(tl.int64) * num_classes + classes[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & class_ok[None, :])


@triton.jit
def _propagate_streaming_kernel(
    q_ptr, k_ptr, cam_ptr, out_ptr, layer_ids_ptr, layer_weights_ptr, num_active_layers,
    scale, batch_size, num_heads, seq_len, num_cls, head_dim, num_classes,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    QK_PRECISION: tl.constexpr, CAM_PRECISION: tl.constexpr,
):
    row_block = tl.program_id(0)
    class_block = tl.program_id(1)
    batch = tl.program_id(2)
    num_patches = seq_len - num_cls
    patch_rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    token_rows = num_cls + patch_rows
    patch_row_ok = patch_rows < num_patches
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q_mask = patch_row_ok[:, None] & dim_ok[None, :]
    classes = class_block * BLOCK_K + tl.arange(0, BLOCK_K)
    class_ok = classes < num_classes
    cam_base = cam_ptr + batch.to(tl.int64) * num_patches * num_classes

    out_acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for active in range(num_active_layers):
        layer = tl.load(layer_ids_ptr + active)
        layer_weight = tl.load(layer_weights_ptr + active)
        head_total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for head in range(num_heads):
            head_base = (((layer * batch_size + batch) * num_heads + head).to(tl.int64)
                         * seq_len * head_dim)
            q = tl.load(q_ptr + head_base + token_rows[:, None] * head_dim + dims[None, :],
                        mask=q_mask, other=0.0)
            row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for key_start in range(0, seq_len, BLOCK_N):
                keys = key_start + tl.arange(0, BLOCK_N)
                key_ok = keys < seq_len
                k = tl.load(k_ptr + head_base + keys[:, None] * head_dim + dims[None, :],
                            mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
                scores = tl.dot(q, tl.trans(k), input_precision=QK_PRECISION) * scale
                scores = tl.where(key_ok[None, :], scores, float("-inf"))
                new_max = tl.maximum(row_max, tl.max(scores, axis=1))
                rescale = tl.exp(row_max - new_max)
                p = tl.exp(scores - new_max[:, None])
                row_sum = row_sum * rescale + tl.sum(p, axis=1)
                # Class keys join the softmax sum but carry value 0: their cam rows load as 0.
                value_ok = key_ok & (keys >= num_cls)
                cam = tl.load(cam_base + (keys - num_cls)[:, None].to(tl.int64) * num_classes
                              + classes[None, :],
                              mask=value_ok[:, None] & class_ok[None, :], other=0.0)
                acc = acc * rescale[:, None] + tl.dot(p.to(cam.dtype), cam,
                                                      input_precision=CAM_PRECISION)
                row_max = new_max
            head_total += acc / row_sum[:, None]
        out_acc += layer_weight * (head_total / num_heads)

    out_ptrs = (out_ptr + batch.to(tl.int64) * num_patches * num_classes
                + patch_rows[:, None].to(tl.int64) * num_classes + classes[None, :])
    tl.store(out_ptrs, out_acc.to(out_ptr.dtype.element_ty),
             mask=patch_row_ok[:, None] & class_ok[None, :])


def _class_block(num_classes: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(num_classes)))


def propagate_triton(affinity: torch.Tensor, cam: torch.Tensor, *,
                     block_m: Optional[int] = None, block_n: Optional[int] = None,
                     block_k: Optional[int] = None) -> torch.Tensor:
    """``affinity @ cam`` per batch item for contiguous ``(B, P, P)`` and ``(B, P, K)`` of one
    dtype; fp32 accumulation, output in ``cam``'s dtype. ``block_*`` override the tile sizes."""
    batch, num_patches, num_classes = cam.shape
    out = torch.empty_like(cam)
    default_m, default_n, class_cap, num_warps = _matmul_tiles(cam.dtype)
    size_cap = max(16, triton.next_power_of_2(num_patches))
    block_m = block_m or min(default_m, size_cap)
    block_n = block_n or min(default_n, size_cap)
    block_k = block_k or _class_block(num_classes, class_cap)
    grid = (triton.cdiv(num_patches, block_m), triton.cdiv(num_classes, block_k), batch)
    _propagate_kernel[grid](
        affinity, cam, out, num_patches, num_classes,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION=dot_precision(cam.dtype, cam.device), num_warps=num_warps,
    )
    return out


def propagate_streaming_triton(q: torch.Tensor, k: torch.Tensor, cam: torch.Tensor, scale: float,
                               num_cls: int, weights: Sequence[float], *,
                               block_m: Optional[int] = None, block_n: Optional[int] = None,
                               block_k: Optional[int] = None) -> torch.Tensor:
    """``Σ_l weights[l] · mean_h softmax(q_l k_lᵀ · scale)[C:, C:] @ cam`` for contiguous
    ``(L, B, H, T, d)`` q, k and ``(B, P, K)`` cam; output in ``cam``'s dtype."""
    num_layers, batch, num_heads, seq_len, head_dim = q.shape
    num_classes = cam.shape[2]
    out = torch.empty_like(cam)
    # Layers of weight 0 are dropped here, so the kernel never touches their q, k.
    active = [(layer, float(w)) for layer, w in enumerate(weights) if float(w) != 0.0]
    layer_ids = torch.tensor([layer for layer, _ in active] or [0], dtype=torch.int32)
    layer_weights = torch.tensor([w for _, w in active] or [0.0], dtype=torch.float32)
    layer_ids = layer_ids.to(cam.device)
    layer_weights = layer_weights.to(cam.device)

    num_patches = seq_len - num_cls
    block_d = max(16, triton.next_power_of_2(head_dim))
    # fp32 anywhere means CUDA-core dots: the smaller tiles.
    sweep_dtype = torch.float32 if torch.float32 in (q.dtype, cam.dtype) else q.dtype
    default_m, default_n, num_warps = tile_config(sweep_dtype, block_d)
    block_m = block_m or min(default_m, max(16, triton.next_power_of_2(num_patches)))
    block_n = block_n or min(default_n, max(16, triton.next_power_of_2(seq_len)))
    # The whole class range in one program avoids recomputing the softmax per class block.
    block_k = block_k or _class_block(num_classes, 128)
    grid = (triton.cdiv(num_patches, block_m), triton.cdiv(num_classes, block_k), batch)
    _propagate_streaming_kernel[grid](
        q, k, cam, out, layer_ids, layer_weights, len(active),
        float(scale), batch, num_heads, seq_len, num_cls, head_dim, num_classes,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k,
        QK_PRECISION=dot_precision(q.dtype, q.device),
        CAM_PRECISION=dot_precision(cam.dtype, cam.device),
        num_warps=num_warps,
    )
    return out
