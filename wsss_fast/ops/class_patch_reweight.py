"""``class_patch_reweight``: row-wise confidence re-weighting of class↔patch attention (DESIGN §3.2).

For each row ``a`` (the last dimension) of non-negative attention::

    φ_γ(a) = (Σ a) · a^γ / Σ a^γ

The row mass is kept; γ > 1 amplifies high-confidence entries and suppresses low ones; γ = 1 is the
identity. Negative entries are treated as 0 (attention is never negative; this keeps fractional
powers defined). A row whose ``a^γ`` sums to 0 maps to 0. Optionally fused with MCTformer-V2's
product ``φ_γ(a) ⊙ ReLU(patchcam)`` and MCTformer+'s ``sqrt`` of that product.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from wsss_fast.ops._op import Face, cpu_kernel, define_op, reference_autograd
from wsss_fast.ops._validate import check_finite_number, check_same_device, check_tensor

OP = "class_patch_reweight"


def class_patch_reweight_reference(attn, gamma, patchcam=None, sqrt=False):
    """The specification, in float64 (differentiable)."""
    a = attn.double().clamp_min(0)
    powered = a.pow(gamma)
    denom = powered.sum(dim=-1, keepdim=True)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.where(denom > 0, a.sum(dim=-1, keepdim=True) * powered / safe,
                      torch.zeros_like(a))
    if patchcam is not None:
        out = out * patchcam.double().clamp_min(0)
    if sqrt:
        out = out.sqrt()
    return out.to(attn.dtype)


@define_op(OP, faces=(
    Face("reference", class_patch_reweight_reference),
    Face("cpu", cpu_kernel(OP)),
    Face("triton", "wsss_fast.kernels.class_patch_reweight:class_patch_reweight_triton"),
    Face("cuda", "wsss_fast.ops._cuda_lib:class_patch_reweight"),
), **reference_autograd(class_patch_reweight_reference))
def class_patch_reweight_op(attn: torch.Tensor, gamma: float, patchcam: Optional[torch.Tensor],
                            sqrt: bool) -> torch.Tensor:
    """Rows ``(R, N)`` in and out (validated by ``class_patch_reweight``); the body is the fake."""
    return torch.empty_like(attn)


def class_patch_reweight(attn: torch.Tensor, gamma: float = 1.0, *,
                         patchcam: Optional[torch.Tensor] = None,
                         sqrt: bool = False) -> torch.Tensor:
    """``φ_γ`` over the last dimension of ``attn`` (any leading shape, e.g. ``(B, C, P)``).

    Args:
        attn: non-negative attention rows, float tensor ``(..., N)``.
        gamma: the exponent, finite and > 0.
        patchcam: optional map multiplied (after ReLU) into the result: the same shape as
            ``attn``, or ``attn.shape[:-1] + (h, w)`` with ``h·w = N`` (PatchCAM ``(B, C, h, w)``).
        sqrt: take the square root at the end (MCTformer+).
    Returns:
        A tensor shaped and typed like ``attn``.
    """
    check_tensor(OP, "attn", attn)
    if attn.dim() == 0 or attn.numel() == 0:
        raise ValueError(f"{OP}: attn must be a non-empty tensor with a last dimension, "
                         f"got shape {tuple(attn.shape)}")
    gamma = check_finite_number(OP, "gamma", gamma, positive=True)
    if patchcam is not None:
        check_tensor(OP, "patchcam", patchcam)
        check_same_device(OP, attn=attn, patchcam=patchcam)
        lead = attn.dim() - 1
        if (tuple(patchcam.shape[:lead]) != tuple(attn.shape[:lead])
                or math.prod(patchcam.shape[lead:]) != attn.shape[-1]):
            raise ValueError(f"{OP}: patchcam of shape {tuple(patchcam.shape)} does not match "
                             f"attn of shape {tuple(attn.shape)} (expected {tuple(attn.shape)} "
                             f"or {tuple(attn.shape[:lead])} + (h, w) with h*w={attn.shape[-1]})")
        patchcam = patchcam.reshape(attn.shape).to(attn.dtype)
    rows = attn.reshape(-1, attn.shape[-1]).contiguous()
    if patchcam is not None:
        patchcam = patchcam.reshape(rows.shape).contiguous()
    out = class_patch_reweight_op(rows, gamma, patchcam, bool(sqrt))
    return out.reshape(attn.shape)
