"""Upstream-faithful dense random walks: the test oracle and the benchmark baseline.

Plain re-implementations, in upstream's order of operations, of IRN's ``propagate_to_edge`` with
``make_sem_seg_labels`` and of PSA's ``infer_aff.py`` walk (reference/cnn_methods_postprocessing.md
§3a, §3b), written from that description: dense ``N×N`` matrices, built on IRN's padded grid and
cropped, column-normalized, squared ``exp_times`` / ``logt`` times. Small sizes only (a VOC image
needs ~0.7 GB and ~26 TFLOP). The fast path is ``wsss_fast.postprocess.random_walk``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def search_directions(radius: int) -> list[tuple[int, int]]:
    """The half-disk pair offsets ``(dy, dx)`` of radius ``radius``."""
    directions = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        directions += [(dy, dx) for dx in range(1 - radius, radius)
                       if dx * dx + dy * dy < radius ** 2]
    return directions


def path_cells(dy: int, dx: int) -> list[tuple[int, int]]:
    """IRN's path of an offset: the cells of the bounding box of (0, 0)…(dy, dx) whose squared
    distance to the line through both ends is below 1 (both ends included)."""
    length_sq = dy * dy + dx * dx
    return [(y, x) for y in range(min(0, dy), max(0, dy) + 1)
            for x in range(min(0, dx), max(0, dx) + 1) if (dy * x - dx * y) ** 2 / length_sq < 1]


def _dense_from_pairs(n: int, src: torch.Tensor, dst: torch.Tensor, values: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """Upstream's sparse → dense: pairs, their transposes and the identity, summed."""
    dense = torch.zeros(n, n, dtype=dtype)
    diagonal = torch.arange(n)
    index = (torch.cat([src, diagonal, dst]), torch.cat([dst, diagonal, src]))
    dense.index_put_(index, torch.cat([values, torch.ones(n, dtype=dtype), values]),
                     accumulate=True)
    return dense


def _transition(affinity: torch.Tensor, beta: float, squarings: int) -> torch.Tensor:
    scaled = affinity ** beta
    transition = scaled / scaled.sum(dim=0, keepdim=True)
    for _ in range(squarings):
        transition = transition @ transition
    return transition


def propagate_to_edge(cams: torch.Tensor, edge: torch.Tensor, *, radius: int = 5,
                      beta: float = 10, exp_times: int = 8,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """IRN's walk: ``(n, h, w)`` stride-4 CAMs and an ``(h, w)`` boundary map in [0, 1] →
    ``(n, h, w)`` walked maps, ``(cams·(1−B)) @ T^(2^exp_times)``."""
    h, w = edge.shape
    padded_h, padded_w = h + radius, w + 2 * radius
    floor = radius - 1
    edge = edge.to(dtype)
    padded = F.pad(edge[None, None], (radius, radius, 0, radius), value=1.0)[0, 0]
    index = torch.arange(padded_h * padded_w).view(padded_h, padded_w)
    rows, cols = padded_h - floor, padded_w - 2 * floor  # the "from" region, at (0, floor)
    src, dst, values = [], [], []
    for dy, dx in search_directions(radius):
        path_max = torch.stack([padded[py: py + rows, floor + px: floor + px + cols]
                                for py, px in path_cells(dy, dx)]).amax(dim=0)
        src.append(index[:rows, floor: floor + cols].reshape(-1))
        dst.append(index[dy: dy + rows, floor + dx: floor + dx + cols].reshape(-1))
        values.append((1 - path_max).reshape(-1))
    dense = _dense_from_pairs(padded_h * padded_w, torch.cat(src), torch.cat(dst),
                              torch.cat(values), dtype)
    dense = dense.view(padded_h, padded_w, padded_h, padded_w)
    dense = dense[:h, radius: radius + w, :h, radius: radius + w].reshape(h * w, h * w)
    transition = _transition(dense, beta, exp_times)
    x = cams.to(dtype).reshape(-1, h, w) * (1 - edge)
    return (x.reshape(-1, h * w) @ transition).view(-1, h, w)


def irn_sem_seg_labels(cams: torch.Tensor, keys: Sequence[int], edge: torch.Tensor,
                       image_size: tuple[int, int], *, beta: float = 10, exp_times: int = 8,
                       bg_threshold: float = 0.25, dtype: torch.dtype = torch.float32
                       ) -> np.ndarray:
    """IRN's ``make_sem_seg_labels`` for one image: walk, bilinear ×4, crop, divide by the global
    max, background plane, argmax, keys → uint8 ``(H, W)``."""
    height, width = image_size
    rw = propagate_to_edge(cams, edge, beta=beta, exp_times=exp_times, dtype=dtype)
    rw_up = F.interpolate(rw[:, None], scale_factor=4, mode="bilinear",
                          align_corners=False)[:, 0, :height, :width]
    rw_up = rw_up / rw_up.max()
    scores = torch.cat([torch.full((1, height, width), bg_threshold, dtype=dtype), rw_up])
    lookup = np.concatenate([[0], np.asarray(keys) + 1])
    return lookup[scores.argmax(dim=0).numpy()].astype(np.uint8)


def psa_random_walk(cam_vec: torch.Tensor, features: torch.Tensor, *, radius: int = 5,
                    beta: float = 8, logt: int = 8, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """PSA's walk: ``(c, h, w)`` maps and ``(C, h, w)`` affinity features → ``(c, h, w)``:
    ``cam_vec @ T^(2^logt)``, pairs only from rows ``[0, h−r+1)``, cols ``[r−1, w−r+1)``."""
    _, h, w = features.shape
    floor = radius - 1
    features = features.to(dtype)
    index = torch.arange(h * w).view(h, w)
    rows, cols = h - floor, w - 2 * floor
    src, dst, values = [], [], []
    if rows > 0 and cols > 0:
        origin = features[:, :rows, floor: floor + cols]
        for dy, dx in search_directions(radius):
            partner = features[:, dy: dy + rows, floor + dx: floor + dx + cols]
            values.append(torch.exp(-(partner - origin).abs().mean(dim=0)).reshape(-1))
            src.append(index[:rows, floor: floor + cols].reshape(-1))
            dst.append(index[dy: dy + rows, floor + dx: floor + dx + cols].reshape(-1))
    empty = torch.zeros(0, dtype=torch.long)
    dense = _dense_from_pairs(h * w, torch.cat(src) if src else empty,
                              torch.cat(dst) if dst else empty,
                              torch.cat(values) if values else torch.zeros(0, dtype=dtype), dtype)
    transition = _transition(dense, beta, logt)
    return (cam_vec.to(dtype).reshape(-1, h * w) @ transition).view(-1, h, w)


def psa_rw_labels(cams: torch.Tensor, keys: Sequence[int], features: torch.Tensor, *,
                  num_classes: int = 20, alpha: float = 16, beta: float = 8, logt: int = 8,
                  dtype: torch.dtype = torch.float32) -> np.ndarray:
    """PSA's ``infer_aff.py`` for one image: ``(n, H, W)`` CAMs of classes ``keys`` placed in a
    ``num_classes + 1`` stack, power background, zero pad to a multiple of 8, avg-pool 8, walk,
    bilinear to the padded size, argmax, crop → uint8 ``(H, W)`` (channel index = class + 1)."""
    _, height, width = cams.shape
    padded_h, padded_w = 8 * math.ceil(height / 8), 8 * math.ceil(width / 8)
    full = torch.zeros(num_classes + 1, height, width, dtype=dtype)
    for cam, key in zip(cams, keys):
        full[key + 1] = cam.to(dtype)
    full[0] = (1 - full[1:].amax(dim=0)) ** alpha
    full = F.pad(full, (0, padded_w - width, 0, padded_h - height))
    pooled = F.avg_pool2d(full, 8, 8)
    rw = psa_random_walk(pooled, features, beta=beta, logt=logt, dtype=dtype)
    rw = F.interpolate(rw[None], size=(padded_h, padded_w), mode="bilinear", align_corners=False)
    return rw[0].argmax(dim=0)[:height, :width].numpy().astype(np.uint8)
