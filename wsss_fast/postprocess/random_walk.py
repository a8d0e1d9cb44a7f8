"""Random-walk refinement of CAMs into pseudo-labels: IRN and PSA (DESIGN §6, §3.5).

The pair affinities of both methods are turned into the per-pixel pair weights of
``wsss_fast.ops.random_walk`` (which never forms the dense ``N×N`` transition matrix):

* ``irn_affinity`` — IRN: ``a = 1 − max`` of the boundary map along the pair's path;
* ``psa_affinity`` — PSA (AffinityNet): ``a = exp(−mean_c |g_i − g_j|)`` of affinity features, for
  pairs leaving PSA's "from" region only;

and ``refine_irn`` / ``refine_psa`` reproduce IRN's ``make_sem_seg_labels`` and PSA's
``infer_aff.py`` label maps (reference/cnn_methods_postprocessing.md §3a, §3b; checked against
the dense re-implementations in ``upstream_random_walk``). ``image_edge_map`` is a boundary map from
image gradients, for users without a trained IRN boundary network.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss_fast.ops.irn_paths import irn_path
from wsss_fast.ops.random_walk import half_disk_offsets, random_walk


@dataclass(frozen=True)
class RandomWalkPreset:
    """Default hyper-parameters of one method's random-walk refinement."""

    beta: float            # affinity power
    steps: int             # walk steps (2^exp_times / 2^logt upstream)
    radius: int            # of the half disk of pair offsets
    bg_threshold: Optional[float] = None  # IRN: constant background score
    alpha: Optional[float] = None         # PSA: background power (1 − max cam)^alpha


RANDOM_WALK_PRESETS = types.MappingProxyType({
    # IRN run_sample.py: beta=10, exp_times=8, sem_seg_bg_thres=0.25.
    "irn": RandomWalkPreset(beta=10, steps=256, radius=5, bg_threshold=0.25),
    # PSA infer_aff.py: beta=8, logt=8, alpha=16.
    "psa": RandomWalkPreset(beta=8, steps=256, radius=5, alpha=16),
})
_IRN, _PSA = RANDOM_WALK_PRESETS["irn"], RANDOM_WALK_PRESETS["psa"]


def _as_float_tensor(name: str, value, ndim: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if not (tensor.is_floating_point() and tensor.dim() == ndim):
        raise ValueError(f"{name} must be a {ndim}-dimensional float array, got shape "
                         f"{tuple(tensor.shape)} and dtype {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite (shape {tuple(tensor.shape)})")
    return tensor


def _positive(name: str, value) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def irn_affinity(edge, beta: float = _IRN.beta, radius: int = _IRN.radius) -> torch.Tensor:
    """IRN pair weights from a boundary map.

    Args:
        edge: ``(h, w)`` boundary probabilities in [0, 1] (IRN: stride 4).
        beta: affinity power. radius: of the half disk of pair offsets.
    Returns:
        ``(O, h, w)`` weights ``(1 − max_{p ∈ path} edge_p)^beta`` for every pair whose both
        ends are on the grid (IRN pads the map with 1.0 and crops the matrix back: no border pair
        is lost), 0 for the others; float64 for a float64 map, else float32.
    """
    edge = _as_float_tensor("edge", edge, 2)
    if bool(((edge < 0) | (edge > 1)).any()):
        raise ValueError(f"edge must lie in [0, 1], got min {edge.min().item()}, "
                         f"max {edge.max().item()}")
    beta = _positive("beta", beta)
    edge = edge.to(_compute_dtype(edge))
    h, w = edge.shape
    offsets = half_disk_offsets(radius)
    weights = edge.new_zeros((len(offsets), h, w))
    for o, (dy, dx) in enumerate(offsets):
        x_lo, x_hi = max(0, -dx), min(w, w - dx)  # columns whose partner is on the grid
        rows = h - dy
        if rows <= 0 or x_lo >= x_hi:
            continue
        path_max = torch.stack([edge[py: py + rows, x_lo + px: x_hi + px]
                                for py, px in irn_path(dy, dx)]).amax(dim=0)
        weights[o, :rows, x_lo:x_hi] = (1 - path_max) ** beta
    return weights


def psa_affinity(features, beta: float = _PSA.beta, radius: int = _PSA.radius) -> torch.Tensor:
    """PSA (AffinityNet) pair weights from affinity features.

    Args:
        features: ``(C, h, w)`` affinity features (PSA: its stride-8 feature map; any feature map
            works, e.g. the down-sampled image or a classifier's features).
        beta: affinity power. radius: of the half disk of pair offsets.
    Returns:
        ``(O, h, w)`` weights ``exp(−mean_c |g_i − g_j|)^beta`` for pairs leaving PSA's "from"
        region — rows ``[0, h − r + 1)``, columns ``[r − 1, w − r + 1)`` — and 0 for every other
        pair (upstream has no padding: pixels near the bottom and side borders lose pairs, the
        bottom-left corner keeps only its self-loop); float64 for float64 features, else float32.
    """
    features = _as_float_tensor("features", features, 3)
    beta = _positive("beta", beta)
    features = features.to(_compute_dtype(features))
    _, h, w = features.shape
    offsets = half_disk_offsets(radius)
    floor = radius - 1
    rows, cols = h - floor, w - 2 * floor
    weights = features.new_zeros((len(offsets), h, w))
    if rows <= 0 or cols <= 0:
        return weights
    origin = features[:, :rows, floor: floor + cols]
    for o, (dy, dx) in enumerate(offsets):
        partner = features[:, dy: dy + rows, floor + dx: floor + dx + cols]
        affinity = torch.exp(-(partner - origin).abs().mean(dim=0))
        weights[o, :rows, floor: floor + cols] = affinity ** beta
    return weights


def _keys(keys, count: int) -> list[int]:
    keys = [int(k) for k in np.asarray(keys).reshape(-1)]
    if len(keys) != count:
        raise ValueError(f"got {len(keys)} keys for {count} CAM planes")
    if len(set(keys)) != len(keys) or any(not 0 <= k < 254 for k in keys):
        raise ValueError(f"keys must be distinct class indices in [0, 254), got {keys}")
    return keys


IRN_NORMALIZATIONS = ("global", "class")


def fill_boundary_cells(walked: torch.Tensor, edge: torch.Tensor, threshold: float
                        ) -> torch.Tensor:
    """Walked maps whose boundary cells (``edge >= threshold``) take, class by class, the
    largest value of their nearest non-boundary cells (3×3 rings grown outwards until every
    boundary cell connected to one is reached).

    Why: IRN's ``x0 = cams · (1 − edge)`` zeroes boundary cells and their near-zero affinities keep
    them at 0 through the walk; at VOC's ~125×94 stride-4 grid they are a thin line, on small
    images a large share of each object (an option, off in IRN's pipeline).
    """
    known = edge < threshold
    if bool(known.all()) or not bool(known.any()):
        return walked
    values = torch.where(known, walked, walked.new_tensor(float("-inf")))
    while not bool(known.all()):
        reached = F.max_pool2d(known[None, None].float(), 3, 1, 1)[0, 0].bool() & ~known
        if not bool(reached.any()):
            break
        values = torch.where(reached, F.max_pool2d(values[None], 3, 1, 1)[0], values)
        known = known | reached
    return torch.where(known, values, walked)


WALK_UPSAMPLES = (1, 2, 4)


def irn_walk_scores(cams_lowres, edge, image_size: tuple[int, int], *, beta: float = _IRN.beta,
                    steps: int = _IRN.steps, radius: int = _IRN.radius,
                    normalize: str = "global", boundary_fill: Optional[float] = None,
                    keep_boundary_cams: bool = False, upsample: int = 1) -> torch.Tensor:
    """IRN's walked class scores of one image before the background plane, ``(n, H, W)``.

    ``x0 = cams · (1 − edge)`` (``keep_boundary_cams``: ``x0 = cams``, so boundary cells keep
    their own CAM values instead of starting at 0 — for small images, where they are a large
    share of each object) walked ``steps`` times with ``irn_affinity(edge, beta, radius)``,
    optionally ``fill_boundary_cells`` (``boundary_fill``: its edge threshold; None: off, as
    upstream), bilinear ×4 (align_corners=False), cropped to ``image_size``, normalized:
    ``"global"`` (IRN) divides by the max over all classes, ``"class"`` each class by its own max
    (a weak class is not drowned by a strong one). An all-zero map stays 0.

    ``upsample`` (1: IRN's stride-4 grid): the walk runs on a grid that many times finer — the
    CAMs and the boundary map upsampled bilinearly (align_corners=False) before it, ``radius`` in
    fine cells, the walked maps upsampled by ``4 / upsample`` after it — so that on small images
    the labels' borders follow the boundaries more closely than one stride-4 cell.
    """
    cams = _as_float_tensor("cams_lowres", cams_lowres, 3)
    edge = _as_float_tensor("edge", edge, 2)
    n, h, w = cams.shape
    height, width = (int(s) for s in image_size)
    if tuple(edge.shape) != (h, w):
        raise ValueError(f"edge of shape {tuple(edge.shape)} does not match cams_lowres of shape "
                         f"{tuple(cams.shape)}")
    if not (0 < height <= 4 * h and 0 < width <= 4 * w):
        raise ValueError(f"image_size {(height, width)} must be positive and at most 4× the CAM "
                         f"grid {(h, w)}")
    if normalize not in IRN_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {IRN_NORMALIZATIONS}, got {normalize!r}")
    if boundary_fill is not None and not 0 < boundary_fill <= 1:
        raise ValueError(f"boundary_fill must be an edge threshold in (0, 1], got {boundary_fill}")
    if upsample not in WALK_UPSAMPLES:
        raise ValueError(f"upsample must be one of {WALK_UPSAMPLES} (a divisor of the CAMs' "
                         f"stride 4), got {upsample!r}")
    if n == 0:
        return cams.new_zeros((0, height, width), dtype=torch.float32)
    edge = edge.to(device=cams.device, dtype=torch.float32)
    cams = cams.float()
    if upsample > 1:
        cams = F.interpolate(cams[None], scale_factor=upsample, mode="bilinear",
                             align_corners=False)[0]
        edge = F.interpolate(edge[None, None], scale_factor=upsample, mode="bilinear",
                             align_corners=False)[0, 0]
    x0 = cams if keep_boundary_cams else cams * (1 - edge)
    walked = random_walk(x0, irn_affinity(edge, beta, radius), steps, radius=radius)
    if boundary_fill is not None:
        walked = fill_boundary_cells(walked, edge, boundary_fill)
    if upsample < 4:
        walked = F.interpolate(walked[None], scale_factor=4 // upsample, mode="bilinear",
                               align_corners=False)[0]
    up = walked[:, :height, :width]
    peak = up.amax(dim=(1, 2), keepdim=True) if normalize == "class" else up.max()
    return up / torch.where(peak > 0, peak, torch.ones_like(peak))


def refine_irn(cams_lowres, keys: Sequence[int], edge, image_size: tuple[int, int], *,
               beta: float = _IRN.beta, steps: int = _IRN.steps,
               bg_threshold: float = _IRN.bg_threshold, radius: int = _IRN.radius,
               normalize: str = "global", boundary_fill: Optional[float] = None,
               keep_boundary_cams: bool = False, upsample: int = 1,
               return_scores: bool = False):
    """IRN's ``make_sem_seg_labels`` for one image.

    ``irn_walk_scores`` (the walk, ×4, crop, IRN's global-max normalization by default), a
    constant background plane ``bg_threshold`` prepended, argmax, mapped through
    ``[0] + (keys + 1)``.

    Args:
        cams_lowres: ``(n, h, w)`` stride-4 CAMs of the image's classes (IRN's ``cam``).
        keys: the n 0-based class indices, in the order of ``cams_lowres``.
        edge: ``(h, w)`` boundary map in [0, 1] (IRN's boundary network, or ``image_edge_map``).
        image_size: ``(H, W)`` with ``H <= 4h``, ``W <= 4w``.
        normalize, boundary_fill, keep_boundary_cams, upsample: see ``irn_walk_scores``
            (defaults: upstream's).
        return_scores: also return the walked, normalized ``(n, H, W)`` maps the background
            plane is set against (``irn_walk_scores``'), e.g. to choose ``bg_threshold`` later.
    Returns:
        uint8 ``(H, W)`` labels (0 background, class index + 1), or ``(labels, scores)``. An
        all-zero walk (or n = 0) gives all background, where upstream would divide by 0.
    """
    cams = _as_float_tensor("cams_lowres", cams_lowres, 3)
    keys = _keys(keys, cams.shape[0])
    up = irn_walk_scores(cams, edge, image_size, beta=beta, steps=steps, radius=radius,
                         normalize=normalize, boundary_fill=boundary_fill,
                         keep_boundary_cams=keep_boundary_cams, upsample=upsample)
    labels = irn_labels(up, keys, bg_threshold)
    return (labels, up) if return_scores else labels


def irn_labels(scores: torch.Tensor, keys: Sequence[int], bg_threshold: float) -> np.ndarray:
    """uint8 labels of ``(n, H, W)`` class scores with a constant background plane."""
    scores = torch.cat([scores.new_full((1, *scores.shape[1:]), float(bg_threshold)), scores])
    lookup = np.asarray([0] + [k + 1 for k in keys], dtype=np.uint8)
    return lookup[scores.argmax(dim=0).cpu().numpy()]


def refine_psa(cams_highres, keys: Sequence[int], features, *, alpha: float = _PSA.alpha,
               beta: float = _PSA.beta, steps: int = _PSA.steps,
               radius: int = _PSA.radius) -> np.ndarray:
    """PSA's ``infer_aff.py`` for one image.

    Background ``(1 − max(0, max_c cam))^alpha`` (the max over PSA's 20 class planes, absent ones
    0) stacked before the CAMs in class order, zero-padded to a multiple of 8, average-pooled
    8×8, walked ``steps`` times with ``psa_affinity(features, beta)``, upsampled bilinearly
    (align_corners=False) to the padded size, argmax, cropped.

    Args:
        cams_highres: ``(n, H, W)`` full-resolution CAMs of the image's classes.
        keys: the n 0-based class indices (any order; PSA's stack is in class order).
        features: ``(C, ⌈H/8⌉, ⌈W/8⌉)`` affinity features: AffinityNet's, or any stand-in
            (e.g. the image down-sampled ×8, or classifier features).
    Returns:
        uint8 ``(H, W)`` labels (0 background, class index + 1).
    """
    cams = _as_float_tensor("cams_highres", cams_highres, 3)
    features = _as_float_tensor("features", features, 3)
    n, height, width = cams.shape
    keys = _keys(keys, n)
    padded_h, padded_w = 8 * math.ceil(height / 8), 8 * math.ceil(width / 8)
    if tuple(features.shape[1:]) != (padded_h // 8, padded_w // 8):
        raise ValueError(f"features must have shape (C, {padded_h // 8}, {padded_w // 8}) for "
                         f"CAMs of shape {tuple(cams.shape)}, got {tuple(features.shape)}")
    order = sorted(range(n), key=lambda i: keys[i])
    cams = cams.float()[order]
    top = cams.amax(dim=0).clamp_min(0) if n else cams.new_zeros((height, width))
    stack = torch.cat([((1 - top) ** float(alpha))[None], cams])
    stack = F.pad(stack, (0, padded_w - width, 0, padded_h - height))
    pooled = F.avg_pool2d(stack[None], 8, 8)[0]
    weights = psa_affinity(features.to(cams.device, torch.float32), beta, radius)
    walked = random_walk(pooled, weights, steps, radius=radius)
    up = F.interpolate(walked[None], size=(padded_h, padded_w), mode="bilinear",
                       align_corners=False)[0]
    lookup = np.asarray([0] + [keys[i] + 1 for i in order], dtype=np.uint8)
    return lookup[up.argmax(dim=0)[:height, :width].cpu().numpy()]


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2
                     / (2 * sigma * sigma))
    return taps / taps.sum()


def image_edge_map(image, size: tuple[int, int], *, sigma: float = 1.0,
                   percentile: float = 0.98) -> torch.Tensor:
    """A boundary map in [0, 1] from image gradients — a documented stand-in for IRN's boundary
    network (trained from CAM-derived inter-pixel relations), for users who have none.

    Grey image → Gaussian blur (``sigma``) → Sobel gradient magnitude → adaptive max-pool to
    ``size`` (thin edges survive the stride-4 reduction) → divided by its ``percentile`` quantile
    (at least one grey level per pixel, so a flat image stays near 0) and clipped to [0, 1].
    Heuristic: texture counts as boundary.

    Args:
        image: uint8 ``(H, W, 3)`` RGB image (numpy array or tensor).
        size: ``(h, w)`` of the map, e.g. ``(⌈H/4⌉, ⌈W/4⌉)`` for ``refine_irn``.
    Returns:
        float32 ``(h, w)`` tensor.
    """
    image = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got shape {tuple(image.shape)} and "
                         f"dtype {image.dtype}")
    height, width = (int(s) for s in size)
    if not (0 < height <= image.shape[0] and 0 < width <= image.shape[1]):
        raise ValueError(f"size {(height, width)} must be positive and at most the image size "
                         f"{tuple(image.shape[:2])}")
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile must be in (0, 1], got {percentile}")
    rgb = image.cpu().float().permute(2, 0, 1) / 255
    grey = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None, None]
    kernel = _gaussian_kernel(_positive("sigma", sigma))
    k = kernel.numel() // 2
    grey = F.conv2d(F.pad(grey, (k, k, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    grey = F.conv2d(F.pad(grey, (0, 0, k, k), mode="replicate"), kernel.view(1, 1, -1, 1))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    sobel = torch.stack([sobel_x, sobel_x.t()])[:, None]
    gradient = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), sobel)
    magnitude = gradient.pow(2).sum(dim=1, keepdim=True).sqrt()
    magnitude = F.adaptive_max_pool2d(magnitude, (height, width))[0, 0]
    scale = torch.quantile(magnitude.flatten(), percentile).clamp_min(1 / 255)
    return (magnitude / scale).clamp(0, 1)
