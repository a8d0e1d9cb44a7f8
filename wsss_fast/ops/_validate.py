"""Input checks at the public op entry points: a bad call raises ``ValueError`` naming shapes,
dtypes and devices, before any kernel sees the data."""

from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"


def check_tensor(op: str, name: str, t, *, ndim: int | None = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got {_describe(t)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{op}: {name} must have dtype in ({names}), got {_describe(t)}")
    return t


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {_describe(t)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    return next(iter(devices))


def check_same_dtype(op: str, **tensors: torch.Tensor) -> torch.dtype:
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k} {v.dtype}" for k, v in tensors.items())
        raise ValueError(f"{op}: tensors must share one dtype, got {listing}")
    return next(iter(dtypes))


def check_accumulator(op: str, name: str, t: torch.Tensor | None, expected: Sequence[int],
                      device: torch.device) -> None:
    """Accumulators are updated in place: fp32, contiguous, on the inputs' device."""
    if t is None:
        return
    check_tensor(op, name, t, dtypes=(torch.float32,))
    check_shape(op, name, t, expected)
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {_describe(t)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (it is updated in place), "
                         f"got strides {t.stride()} for {_describe(t)}")


def requires_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must see the op (then the differentiable reference face runs)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_finite_number(op: str, name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")
    return value
