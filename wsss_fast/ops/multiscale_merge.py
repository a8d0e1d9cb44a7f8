"""``multiscale_merge``: resize every pass to the output size, flip back, merge, normalize
(DESIGN §3.4).

Each pass is a low-resolution map ``(B, K, h_i, w_i)``. Per output pixel, each pass is sampled
bilinearly (``align_corners=False``, as ``F.interpolate``) at the output size, mirrored along the
width when the pass was run on a flipped image, optionally ReLU'd, then merged:

* ``merge="sum"`` — sum over passes (MCTformer, TransCAM, IRN);
* ``merge="max_flip"`` — passes come as ``(image, flipped image)`` pairs; max within a pair, sum over
  pairs (ToCo).

The merged map is multiplied by ``labels`` (B, K) when given (zeroing absent classes), then each
``(b, k)`` plane is normalized over the full image:

* ``"minmax"`` — ``(x − min) / (max − min + eps)``, eps 1e-8 (MCTformer; ToCo uses 1e-5);
* ``"max"`` — ``x / (max + eps)``, eps 1e-5 (IRN, LPCAM); 0 where ``max + eps == 0``;
* ``"transcam"`` — TransCAM's: ``x = max(x, 0)``; ``x[x < min + eps] = 0``;
  ``(x − min − eps) / (max − min + eps)``, eps 1e-5 (an all-≤0 plane becomes −1, as upstream);
* ``"none"``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from wsss_fast.ops._op import Face, define_op, reference_autograd
from wsss_fast.ops._validate import check_finite_number, check_same_device, check_tensor

OP = "multiscale_merge"
MERGES = ("sum", "max_flip")
NORMS = ("none", "minmax", "max", "transcam")
DEFAULT_EPS = {"none": 0.0, "minmax": 1e-8, "max": 1e-5, "transcam": 1e-5}


def _normalize_reference(x, norm, eps):
    if norm == "none":
        return x
    if norm == "transcam":
        x = x.clamp_min(0)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    if norm == "minmax":
        return (x - lo) / (hi - lo + eps)
    if norm == "max":
        denom = hi + eps
        return torch.where(denom != 0, x / torch.where(denom != 0, denom, 1.0), 0.0)
    x = torch.where(x < lo + eps, torch.zeros_like(x), x)
    return (x - lo - eps) / (hi - lo + eps)


def multiscale_merge_reference(maps, flips, out_h, out_w, relu, labels, merge, norm, eps):
    """The specification: full-size temporaries per pass, in float32."""
    resized = []
    for cam, flipped in zip(maps, flips):
        up = F.interpolate(cam.float(), size=(out_h, out_w), mode="bilinear", align_corners=False)
        if flipped:
            up = up.flip(-1)
        resized.append(up.relu() if relu else up)
    if merge == "sum":
        total = torch.stack(resized).sum(dim=0)
    else:
        total = torch.stack([torch.maximum(a, b) for a, b in zip(resized[::2], resized[1::2])]).sum(0)
    if labels is not None:
        total = total * labels.float()[:, :, None, None]
    return _normalize_reference(total, norm, eps)


def _run_cpu(maps, flips, out_h, out_w, relu, labels, merge, norm, eps):
    return torch.ops.wsss_fast_C.multiscale_merge(maps, [int(f) for f in flips], out_h, out_w,
                                                  relu, labels, merge, norm, eps)


def _cuda_limits(maps, *args) -> list[str]:
    # Asked only once the library has loaded; imported here to keep it lazy.
    from wsss_fast.ops import _cuda_lib

    limit = _cuda_lib.max_passes()
    if len(maps) > limit:
        return [f"the cuda face merges at most {limit} passes, got {len(maps)}"]
    return []


@define_op(OP, faces=(
    Face("reference", multiscale_merge_reference),
    Face("cpu", _run_cpu),
    Face("triton", "wsss_fast.kernels.multiscale_merge:multiscale_merge_triton"),
    Face("cuda", "wsss_fast.ops._cuda_lib:multiscale_merge", limits=_cuda_limits),
), **reference_autograd(multiscale_merge_reference))
def multiscale_merge_op(maps: List[torch.Tensor], flips: List[bool], out_h: int, out_w: int,
                        relu: bool, labels: Optional[torch.Tensor], merge: str, norm: str,
                        eps: float) -> torch.Tensor:
    """Validated fp32 contiguous passes (``multiscale_merge``); this body is the fake."""
    b, k = maps[0].shape[:2]
    return maps[0].new_empty((b, k, out_h, out_w), dtype=torch.float32)


def multiscale_merge(maps: Sequence[torch.Tensor], out_size: tuple[int, int], *,
                     flips: Optional[Sequence[bool]] = None, relu: bool = False,
                     labels: Optional[torch.Tensor] = None, merge: str = "sum",
                     norm: str = "none", eps: Optional[float] = None) -> torch.Tensor:
    """Merge per-pass CAMs into one full-resolution, normalized ``(B, K, H, W)`` fp32 map.

    Args:
        maps: passes ``(B, K, h_i, w_i)``, any float dtype, one device; sizes may differ.
        out_size: ``(H, W)`` of the output (the original image).
        flips: per pass, whether it ran on the horizontally flipped image (default: none).
        relu: ReLU each resized pass before merging.
        labels: optional ``(B, K)`` multi-hot (non-negative) weights multiplied into the merge.
        merge: ``"sum"`` or ``"max_flip"`` (passes in (image, flipped) pairs).
        norm: ``"none"``, ``"minmax"``, ``"max"`` or ``"transcam"``; ``eps`` overrides its epsilon.
    """
    if isinstance(maps, torch.Tensor) or len(maps) == 0:
        raise ValueError(f"{OP}: maps must be a non-empty sequence of (B, K, h, w) tensors")
    for i, cam in enumerate(maps):
        check_tensor(OP, f"maps[{i}]", cam, ndim=4)
        if cam.numel() == 0:
            raise ValueError(f"{OP}: maps[{i}] is empty, shape {tuple(cam.shape)}")
        if cam.shape[:2] != maps[0].shape[:2]:
            raise ValueError(f"{OP}: every pass must share (B, K); maps[0] has shape "
                             f"{tuple(maps[0].shape)}, maps[{i}] has {tuple(cam.shape)}")
    check_same_device(OP, **{f"maps[{i}]": cam for i, cam in enumerate(maps)}, labels=labels)
    flips = [False] * len(maps) if flips is None else [bool(f) for f in flips]
    if len(flips) != len(maps):
        raise ValueError(f"{OP}: got {len(flips)} flips for {len(maps)} maps")
    if merge not in MERGES:
        raise ValueError(f"{OP}: merge must be one of {MERGES}, got {merge!r}")
    if norm not in NORMS:
        raise ValueError(f"{OP}: norm must be one of {NORMS}, got {norm!r}")
    if merge == "max_flip":
        if len(maps) % 2 or flips[0::2] != [False] * (len(maps) // 2) or not all(flips[1::2]):
            raise ValueError(f"{OP}: merge='max_flip' needs (image, flipped) pairs, i.e. flips "
                             f"[False, True, ...]; got {flips}")
        for i in range(0, len(maps), 2):
            if maps[i].shape != maps[i + 1].shape:
                raise ValueError(f"{OP}: flip pair {i // 2} differs in shape: "
                                 f"{tuple(maps[i].shape)} vs {tuple(maps[i + 1].shape)}")
    try:
        out_h, out_w = (int(s) for s in out_size)
    except (TypeError, ValueError):
        raise ValueError(f"{OP}: out_size must be (H, W), got {out_size!r}") from None
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"{OP}: out_size must be positive, got {(out_h, out_w)}")
    b, k = maps[0].shape[:2]
    if labels is not None:
        check_tensor(OP, "labels", labels, dtypes=(torch.float32, torch.float16, torch.bfloat16,
                                                   torch.float64, torch.bool, torch.uint8,
                                                   torch.int32, torch.int64))
        if tuple(labels.shape) != (b, k):
            raise ValueError(f"{OP}: labels must have shape ({b}, {k}), got {tuple(labels.shape)}")
        labels = labels.float().contiguous()
    eps = DEFAULT_EPS[norm] if eps is None else check_finite_number(OP, "eps", eps)
    maps = [cam.float().contiguous() for cam in maps]
    return multiscale_merge_op(maps, flips, out_h, out_w, bool(relu), labels, merge, norm, eps)
