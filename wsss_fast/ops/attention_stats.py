"""``attention_stats``: attention computed once per block, plus the head-mean attention rows that
CAM methods consume, accumulated across blocks (DESIGN §3.1).

For one block with ``A = softmax(q kᵀ · scale)`` over all ``T = C + P`` keys and ``Ā = mean_h A``::

    o            = A v                                   (B, H, T, d), returned
    cls2patch   += w · Ā[:, :C, C:]                     (B, C, P)
    patch2patch += u · Ā[:, C:, C:]                     (B, P, P)
    cls_row     += r · Ā[:, 0, C:]                      (B, P)

No face ever holds an ``H×T×T`` (let alone ``L×H×T×T``) tensor except the reference.
Under autograd (any input requiring grad) the differentiable reference runs: it accumulates in
place, which ``torch.library`` autograd does not support.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from wsss_fast.ops._op import Face, cpu_kernel, define_op
from wsss_fast.ops._validate import (check_accumulator, check_finite_number, check_same_device,
                                     check_same_dtype, check_shape, check_tensor,
                                     requires_grad)

OP = "attention_stats"


def attention_stats_reference(q, k, v, scale, num_cls, cls2patch=None, cls2patch_weight=1.0,
                              patch2patch=None, patch2patch_weight=1.0, cls_row=None,
                              cls_row_weight=1.0):
    """The specification: materialize the block's attention, average heads, slice, accumulate."""
    attn = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
    out = (attn @ v.float()).to(q.dtype)
    head_mean = attn.mean(dim=1)
    c = num_cls
    if cls2patch is not None and cls2patch_weight != 0.0:
        cls2patch += cls2patch_weight * head_mean[:, :c, c:]
    if patch2patch is not None and patch2patch_weight != 0.0:
        patch2patch += patch2patch_weight * head_mean[:, c:, c:]
    if cls_row is not None and cls_row_weight != 0.0:
        cls_row += cls_row_weight * head_mean[:, 0, c:]
    return out


@define_op(OP, mutates_args=("cls2patch", "patch2patch", "cls_row"), faces=(
    Face("reference", attention_stats_reference),
    Face("cpu", cpu_kernel(OP)),
    Face("triton", "wsss_fast.kernels.attention_stats:attention_stats_triton"),
))
def attention_stats_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       num_cls: int, cls2patch: Optional[torch.Tensor], cls2patch_weight: float,
                       patch2patch: Optional[torch.Tensor], patch2patch_weight: float,
                       cls_row: Optional[torch.Tensor], cls_row_weight: float) -> torch.Tensor:
    """Validated, contiguous inputs (``attention_stats``); this body is the fake."""
    return torch.empty_like(q)


def attention_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    num_cls: int, *, cls2patch: Optional[torch.Tensor] = None,
                    cls2patch_weight: float = 1.0, patch2patch: Optional[torch.Tensor] = None,
                    patch2patch_weight: float = 1.0, cls_row: Optional[torch.Tensor] = None,
                    cls_row_weight: float = 1.0) -> torch.Tensor:
    """Attention output of one block; accumulates head-mean attention slices in place.

    Args:
        q, k, v: ``(B, H, T, d)``, one float dtype, one device. Token order is
            ``[num_cls class tokens, P patch tokens]``.
        scale: the softmax scale (usually ``d ** -0.5``).
        num_cls: ``C``, the number of class tokens (0 for a model without one).
        cls2patch: optional fp32 ``(B, C, P)`` accumulator, ``+= cls2patch_weight · Ā[:C, C:]``.
        patch2patch: optional fp32 ``(B, P, P)`` accumulator, ``+= patch2patch_weight · Ā[C:, C:]``.
        cls_row: optional fp32 ``(B, P)`` accumulator, ``+= cls_row_weight · Ā[0, C:]`` (C ≥ 1).
    Returns:
        ``softmax(q kᵀ · scale) v`` as ``(B, H, T, d)`` in the dtype of ``q``.
    """
    check_tensor(OP, "q", q, ndim=4)
    check_tensor(OP, "k", k, ndim=4)
    check_tensor(OP, "v", v, ndim=4)
    check_same_dtype(OP, q=q, k=k, v=v)
    device = check_same_device(OP, q=q, k=k, v=v)
    b, h, t, d = q.shape
    check_shape(OP, "k", k, q.shape)
    check_shape(OP, "v", v, q.shape)
    if min(b, h, t, d) == 0:
        raise ValueError(f"{OP}: q must be non-empty, got shape {tuple(q.shape)}")
    scale = check_finite_number(OP, "scale", scale, positive=True)
    if isinstance(num_cls, bool) or not isinstance(num_cls, int) or not 0 <= num_cls < t:
        raise ValueError(f"{OP}: num_cls must be an int in [0, T={t}), got {num_cls!r} "
                         f"for q of shape {tuple(q.shape)}")
    p = t - num_cls
    if num_cls == 0 and (cls2patch is not None or cls_row is not None):
        raise ValueError(f"{OP}: cls2patch and cls_row need class tokens, but num_cls=0")
    check_accumulator(OP, "cls2patch", cls2patch, (b, num_cls, p), device)
    check_accumulator(OP, "patch2patch", patch2patch, (b, p, p), device)
    check_accumulator(OP, "cls_row", cls_row, (b, p), device)
    weights = [check_finite_number(OP, name, w) for name, w in
               (("cls2patch_weight", cls2patch_weight), ("patch2patch_weight", patch2patch_weight),
                ("cls_row_weight", cls_row_weight))]
    if requires_grad(q, k, v):
        return attention_stats_reference(q, k, v, scale, num_cls, cls2patch, weights[0],
                                         patch2patch, weights[1], cls_row, weights[2])
    return attention_stats_op(q.contiguous(), k.contiguous(), v.contiguous(), scale, num_cls,
                              cls2patch, weights[0], patch2patch, weights[1], cls_row, weights[2])


LayerSpec = Union[None, int, str, Sequence[int]]


def block_weights(num_blocks: int, layers: LayerSpec, reduce: str = "sum") -> tuple[float, ...]:
    """Per-block weights for a statistic: ``layers`` is None (no block), an int K (the last K
    blocks; all of them when K exceeds their number), ``"all"``, or block indices (negative from
    the end); ``reduce`` is ``"sum"`` (weight 1) or ``"mean"`` (weight 1/n over the selected
    blocks)."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    if layers is None:
        chosen: set[int] = set()
    elif layers == "all":
        chosen = set(range(num_blocks))
    elif isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 1:
            raise ValueError(f"last-K layers must be >= 1, got {layers}")
        # K > num_blocks means all blocks, like upstream's attn[-K:] slicing.
        chosen = set(range(max(0, num_blocks - layers), num_blocks))
    else:
        chosen = set()
        for index in layers:
            if not -num_blocks <= index < num_blocks:
                raise ValueError(f"block index {index} out of range for {num_blocks} blocks")
            chosen.add(index % num_blocks)
    weight = 1.0 if reduce == "sum" or not chosen else 1.0 / len(chosen)
    return tuple(weight if i in chosen else 0.0 for i in range(num_blocks))


@dataclass
class AttentionStats:
    """The accumulators of one forward pass and the per-block weights that feed them.

    >>> stats = AttentionStats.allocate(batch=2, num_cls=20, num_patches=196, num_blocks=12,
    ...                                 cls2patch_layers=3, patch2patch_layers="all")
    >>> # in block i: o = attention_stats(q, k, v, scale, 20, **stats.block_kwargs(i))
    """

    cls2patch: Optional[torch.Tensor]
    patch2patch: Optional[torch.Tensor]
    cls_row: Optional[torch.Tensor]
    cls2patch_weights: tuple[float, ...] = field(default=())
    patch2patch_weights: tuple[float, ...] = field(default=())
    cls_row_weights: tuple[float, ...] = field(default=())

    @classmethod
    def allocate(cls, batch: int, num_cls: int, num_patches: int, num_blocks: int, *,
                 cls2patch_layers: LayerSpec = None, cls2patch_reduce: str = "sum",
                 patch2patch_layers: LayerSpec = None, patch2patch_reduce: str = "sum",
                 cls_row_layers: LayerSpec = None, cls_row_reduce: str = "sum",
                 device: torch.device | str = "cpu") -> "AttentionStats":
        def zeros(layers, *shape):
            return None if layers is None else torch.zeros(*shape, dtype=torch.float32,
                                                           device=device)

        return cls(
            cls2patch=zeros(cls2patch_layers, batch, num_cls, num_patches),
            patch2patch=zeros(patch2patch_layers, batch, num_patches, num_patches),
            cls_row=zeros(cls_row_layers, batch, num_patches),
            cls2patch_weights=block_weights(num_blocks, cls2patch_layers, cls2patch_reduce),
            patch2patch_weights=block_weights(num_blocks, patch2patch_layers, patch2patch_reduce),
            cls_row_weights=block_weights(num_blocks, cls_row_layers, cls_row_reduce),
        )

    def block_kwargs(self, index: int) -> dict:
        """Keyword arguments of ``attention_stats`` for block ``index``; a statistic whose weight
        is 0 in this block is not passed, so the kernel skips it."""
        kwargs = {}
        for name in ("cls2patch", "patch2patch", "cls_row"):
            tensor, weight = getattr(self, name), getattr(self, f"{name}_weights")[index]
            if tensor is not None and weight != 0.0:
                kwargs[name] = tensor
                kwargs[f"{name}_weight"] = weight
        return kwargs
