"""``propagate``: attention-times-CAM refinement (DESIGN §3.3).

Dense: ``cam' = A* @ cam`` with a patch affinity ``A*: (B, P, P)`` and ``cam: (B, P, K)``; rows
are not re-normalized (as upstream). Streaming: the same product with
``A* = Σ_l w_l · mean_h softmax(q_l k_lᵀ · scale)[C:, C:]`` computed from saved per-block ``q, k``
like flash attention with ``V = [0 for class keys; cam]``, never forming ``P×P``.

Gradients: the dense op registers autograd (the backward differentiates the reference, two
``bmm``); the streaming op runs its differentiable reference when an input requires grad.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from wsss_fast.ops._op import Face, cpu_kernel, define_op, reference_autograd
from wsss_fast.ops._validate import (check_finite_number, check_same_device, check_same_dtype,
                                     check_shape, check_tensor, requires_grad)

OP = "propagate"
OP_STREAMING = "propagate_streaming"


def propagate_reference(affinity, cam):
    return torch.bmm(affinity.float(), cam.float()).to(cam.dtype)


def propagate_streaming_reference(q, k, cam, scale, num_cls, weights):
    c = num_cls
    out = torch.zeros(cam.shape, dtype=torch.float32, device=cam.device)
    for layer, weight in enumerate(weights):
        if weight == 0.0:
            continue
        attn = torch.softmax(q[layer].float() @ k[layer].float().transpose(-1, -2) * scale, dim=-1)
        out += weight * torch.bmm(attn.mean(dim=1)[:, c:, c:], cam.float())
    return out.to(cam.dtype)


@define_op(OP, faces=(
    Face("reference", propagate_reference),
    Face("cpu", cpu_kernel(OP)),
    Face("triton", "wsss_fast.kernels.propagate:propagate_triton"),
    Face("cuda", "wsss_fast.ops._cuda_lib:propagate"),
), **reference_autograd(propagate_reference))
def propagate_op(affinity: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Validated, contiguous inputs (``propagate``); this body is the fake."""
    return torch.empty_like(cam)


@define_op(OP_STREAMING, faces=(
    Face("reference", propagate_streaming_reference),
    Face("cpu", cpu_kernel(OP_STREAMING)),
    Face("triton", "wsss_fast.kernels.propagate:propagate_streaming_triton"),
))
def propagate_streaming_op(q: torch.Tensor, k: torch.Tensor, cam: torch.Tensor, scale: float,
                           num_cls: int, weights: List[float]) -> torch.Tensor:
    """Validated, contiguous inputs (``propagate_streaming``); this body is the fake."""
    return torch.empty_like(cam)


def propagate(affinity: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """``affinity @ cam`` per batch item: ``(B, P, P) @ (B, P, K) -> (B, P, K)``, fp32 sums."""
    check_tensor(OP, "affinity", affinity, ndim=3)
    check_tensor(OP, "cam", cam, ndim=3)
    check_same_device(OP, affinity=affinity, cam=cam)
    check_same_dtype(OP, affinity=affinity, cam=cam)
    b, p, _ = cam.shape
    check_shape(OP, "affinity", affinity, (b, p, p))
    if min(cam.shape) == 0:
        raise ValueError(f"{OP}: cam must be non-empty, got shape {tuple(cam.shape)}")
    return propagate_op(affinity.contiguous(), cam.contiguous())


def propagate_streaming(q: torch.Tensor | Sequence[torch.Tensor],
                        k: torch.Tensor | Sequence[torch.Tensor], cam: torch.Tensor, *,
                        scale: float, num_cls: int, weights: Sequence[float]) -> torch.Tensor:
    """``(Σ_l w_l · mean_h softmax(q_l k_lᵀ · scale)[C:, C:]) @ cam`` without forming ``P×P``.

    Args:
        q, k: ``(L, B, H, T, d)`` (or sequences of L ``(B, H, T, d)`` tensors), one dtype.
        cam: ``(B, P, K)`` with ``P = T - num_cls``.
        weights: L per-block weights (1 = summed, 1/L = mean, 0 = skipped).
    Returns:
        ``(B, P, K)`` in the dtype of ``cam``.
    """
    if not isinstance(q, torch.Tensor):
        q = torch.stack(list(q))
    if not isinstance(k, torch.Tensor):
        k = torch.stack(list(k))
    check_tensor(OP_STREAMING, "q", q, ndim=5)
    check_tensor(OP_STREAMING, "k", k, ndim=5)
    check_tensor(OP_STREAMING, "cam", cam, ndim=3)
    check_same_dtype(OP_STREAMING, q=q, k=k)
    check_same_device(OP_STREAMING, q=q, k=k, cam=cam)
    check_shape(OP_STREAMING, "k", k, q.shape)
    num_layers, b, h, t, d = q.shape
    if min(q.shape) == 0:
        raise ValueError(f"{OP_STREAMING}: q must be non-empty, got shape {tuple(q.shape)}")
    if isinstance(num_cls, bool) or not isinstance(num_cls, int) or not 0 <= num_cls < t:
        raise ValueError(f"{OP_STREAMING}: num_cls must be an int in [0, T={t}), got {num_cls!r}")
    if cam.shape[0] != b or cam.shape[1] != t - num_cls or cam.shape[2] == 0:
        raise ValueError(f"{OP_STREAMING}: cam must have shape ({b}, {t - num_cls}, K>0) for q of "
                         f"shape {tuple(q.shape)} and num_cls={num_cls}, got {tuple(cam.shape)}")
    scale = check_finite_number(OP_STREAMING, "scale", scale, positive=True)
    weights = [check_finite_number(OP_STREAMING, "weights[i]", w) for w in weights]
    if len(weights) != num_layers:
        raise ValueError(f"{OP_STREAMING}: got {len(weights)} weights for {num_layers} blocks")
    if requires_grad(q, k, cam):
        # Differentiable; it forms each block's P×P attention, as the gradient needs anyway.
        return propagate_streaming_reference(q, k, cam, scale, num_cls, weights)
    return propagate_streaming_op(q.contiguous(), k.contiguous(), cam.contiguous(), scale,
                                  num_cls, weights)
