"""A procedural *source domain* for pretraining the tiny backbones: what ImageNet is to VOC.

Multi-label images are rendered on the fly (nothing on disk), deterministically: image ``i`` of
stream ``s`` ("train" 0, "val" 1) with seed ``seed`` draws from ``default_rng([seed, s, i])``
alone. Every family of the source domain is disjoint from the synthetic benchmark's
(``wsss_fast.data.synthetic``), so that a benchmark trained from these backbones measures
transfer, not memorization:

- **shapes** — 12 outlines none of which is a benchmark shape: gear, clover, chevron, bolt,
  ushape, pinwheel, zshape, dumbbell, comb, stairs, squiggle, kite3 (an arrowhead with a notch).
  ``tests/test_source_domain.py`` checks that no source shape overlaps any benchmark shape by an
  IoU above ``MAX_SHAPE_IOU`` at any rotation and aspect the benchmark draws (equal areas,
  centroids aligned);
- **textures** — 6 patterns none of which is a benchmark texture: spokes (angular sectors),
  spiral, cells (Voronoi borders), speckle (dark flecks about 3 px across), ramp (a shaded gradient across the
  object) and blotch (thresholded smooth noise, camouflage-like). The test compares power spectra
  (shift-invariant) with the benchmark's seven textures;
- **colour families** — object hues lie in green, teal, cyan, azure and blue (0.28–0.66); the
  benchmark's class hues (red, orange, yellow, violet, pink: 0.0–0.15 and 0.78–0.9, each ±0.04)
  lie outside, with a margin of at least 0.06;
- **backgrounds** — plasma (multi-octave noise), bricks, radial and flat grain: none of the
  benchmark's five families (noise, gradient, stripes, grass, water).

A class is one shape with one texture and a preferred colour family (used with probability 0.8;
otherwise any source family). An image of ``SOURCE_SIZE`` px holds 1–4 objects (later ones
occlude earlier ones) with per-object size, aspect, rotation, hue, saturation, brightness and
texture scale/phase; its labels are the classes with at least 40 visible pixels and a third of
their area visible. There are no masks: the source domain only teaches image classification.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD

SOURCE_SIZE = 96
STREAMS = {"train": 0, "val": 1}
MAX_SHAPE_IOU = 0.8     # the disjointness bound that tests/test_source_domain.py checks


@dataclass(frozen=True)
class SourceClass:
    name: str
    shape: str
    texture: str
    hue: float      # preferred colour family's centre hue


# ----------------------------------------------------------------------------- shapes

def _radial(radius_of_angle, points: int = 96) -> np.ndarray:
    angles = np.linspace(0, 2 * math.pi, points, endpoint=False)
    radii = radius_of_angle(angles)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _gear() -> np.ndarray:
    """Six square teeth on a hub of radius 0.55."""
    return _radial(lambda a: np.where(np.cos(6 * a) > 0, 1.0, 0.55), 240)


def _clover() -> np.ndarray:
    """Three round lobes with deep notches between them."""
    return _radial(lambda a: 0.15 + 0.85 * np.abs(np.cos(1.5 * a)) ** 1.5, 180)


def _pinwheel() -> np.ndarray:
    """Four swept blades: the radius rises slowly then drops at each blade's edge."""
    return _radial(lambda a: 0.3 + 0.7 * ((2 * a / math.pi) % 1.0) ** 1.5, 240)


def _squiggle() -> np.ndarray:
    """A thick sinusoidal band."""
    x = np.linspace(-1, 1, 48)
    y = 0.45 * np.sin(1.5 * math.pi * x)
    return np.concatenate([np.stack([x, y - 0.22], 1), np.stack([x[::-1], y[::-1] + 0.22], 1)])


def _circle(radius: float, center) -> np.ndarray:
    return _radial(lambda a: np.full_like(a, radius), 48) + np.asarray(center)


def _poly(*points) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


SOURCE_SHAPES = {
    "gear": [(_gear(), 1)],
    "clover": [(_clover(), 1)],
    "chevron": [(_poly((-1, -0.7), (-0.55, -0.7), (0, 0.05), (0.55, -0.7), (1, -0.7),
                       (0, 0.7)), 1)],
    "bolt": [(_poly((-0.2, -1), (0.55, -1), (0.1, -0.15), (0.6, -0.15), (-0.35, 1),
                    (-0.05, 0.15), (-0.55, 0.15)), 1)],
    "ushape": [(_poly((-0.9, -0.9), (-0.45, -0.9), (-0.45, 0.45), (0.45, 0.45), (0.45, -0.9),
                      (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)), 1)],
    "pinwheel": [(_pinwheel(), 1)],
    "zshape": [(_poly((-0.9, -0.9), (0.9, -0.9), (0.9, -0.55), (-0.3, 0.55), (0.9, 0.55),
                      (0.9, 0.9), (-0.9, 0.9), (-0.9, 0.55), (0.3, -0.55), (-0.9, -0.55)), 1)],
    "dumbbell": [(_circle(0.38, (-0.62, 0)), 1), (_circle(0.38, (0.62, 0)), 1),
                 (_poly((-0.62, -0.12), (0.62, -0.12), (0.62, 0.12), (-0.62, 0.12)), 1)],
    "comb": [(_poly((-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (0.55, 0.9), (0.55, -0.3),
                    (0.18, -0.3), (0.18, 0.9), (-0.18, 0.9), (-0.18, -0.3), (-0.55, -0.3),
                    (-0.55, 0.9), (-0.9, 0.9)), 1)],
    "stairs": [(_poly((-0.9, 0.9), (-0.9, 0.3), (-0.3, 0.3), (-0.3, -0.3), (0.3, -0.3),
                      (0.3, -0.9), (0.9, -0.9), (0.9, -0.5), (0.7, -0.5), (0.7, 0.1),
                      (0.1, 0.1), (0.1, 0.7), (-0.5, 0.7), (-0.5, 0.9)), 1)],
    "squiggle": [(_squiggle(), 1)],
    "kite3": [(_poly((0, -1), (0.85, 0.85), (0, 0.05), (-0.85, 0.85)), 1)],
}

# ----------------------------------------------------------------------------- textures

SOURCE_TEXTURES = ("spokes", "spiral", "cells", "speckle", "ramp", "blotch")


def _smooth_noise(rng, height: int, width: int, cell: float) -> np.ndarray:
    grid = rng.random((max(2, round(height / cell) + 1), max(2, round(width / cell) + 1)),
                      dtype=np.float32)
    return np.clip(cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC), 0, 1)


def source_texture(kind: str, u: np.ndarray, v: np.ndarray, rng) -> np.ndarray:
    """Pattern in [0, 1] over object coordinates ``u, v`` (units of the object radius)."""
    scale = rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * math.pi)
    angle, radius = np.arctan2(v, u), np.hypot(u, v)
    if kind == "spokes":
        return (np.sin(5 * angle + phase) > 0).astype(np.float32) * 0.85 + 0.15
    if kind == "spiral":
        return 0.5 + 0.5 * np.sin(3 * angle + 7 * scale * radius + phase)
    if kind == "cells":
        seeds = rng.uniform(-1.2, 1.2, (14, 2))
        distances = np.sort(np.hypot(u[..., None] - seeds[:, 0], v[..., None] - seeds[:, 1]),
                            axis=-1)
        return np.where(distances[..., 1] - distances[..., 0] < 0.09 * scale, 0.1,
                        1.0).astype(np.float32)
    if kind == "speckle":   # dark flecks about 3 px across
        return np.where(_smooth_noise(rng, *u.shape, 3.0 * scale) > 0.62, 0.2,
                        1.0).astype(np.float32)
    if kind == "ramp":
        direction = rng.uniform(0, 2 * math.pi)
        ramp = u * math.cos(direction) + v * math.sin(direction)
        return np.clip(0.5 + 0.45 * ramp, 0, 1).astype(np.float32)
    if kind == "blotch":
        height, width = u.shape
        cell = max(2.0, 0.35 * scale * min(height, width))
        return np.where(_smooth_noise(rng, height, width, cell) > 0.5, 1.0, 0.2).astype(np.float32)
    raise ValueError(f"unknown source texture {kind!r}")


# ----------------------------------------------------------------------------- classes

# Colour families: green, teal, cyan, azure, blue (benchmark class hues: 0.0-0.15, 0.78-0.9).
SOURCE_HUES = (0.3, 0.4, 0.5, 0.57, 0.64)
HUE_SPREAD = 0.02
_CLASS_TABLE = (
    ("gear", "spokes"), ("clover", "speckle"), ("chevron", "ramp"), ("bolt", "cells"),
    ("ushape", "blotch"), ("pinwheel", "spiral"), ("zshape", "speckle"), ("dumbbell", "cells"),
    ("comb", "spiral"), ("stairs", "spokes"), ("squiggle", "blotch"), ("kite3", "ramp"),
)
SOURCE_CLASSES = tuple(SourceClass(shape, shape, texture, SOURCE_HUES[i % len(SOURCE_HUES)])
                       for i, (shape, texture) in enumerate(_CLASS_TABLE))
NUM_SOURCE_CLASSES = len(SOURCE_CLASSES)
SOURCE_BACKGROUNDS = ("plasma", "bricks", "radial", "flat")


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


def _background(kind: str, size: int, rng) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    hue = rng.random()
    low = _hsv(hue, rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.55))
    high = _hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.3), rng.uniform(0.55, 0.9))
    if kind == "plasma":
        t = sum(w * _smooth_noise(rng, size, size, cell)
                for w, cell in ((0.5, 40), (0.3, 12), (0.2, 3)))
    elif kind == "bricks":
        height, width = rng.uniform(8, 16), rng.uniform(16, 32)
        row = np.floor(y / height)
        shifted = x + (row % 2) * width / 2
        mortar = (y % height < 1.5) | (shifted % width < 1.5)
        t = np.where(mortar, 0.1, 0.6 + 0.3 * rng.random((size, size)) ** 4).astype(np.float32)
    elif kind == "radial":
        cx, cy = rng.uniform(0, size, 2)
        distance = np.hypot(x - cx, y - cy) / size
        t = np.clip(1.0 - distance, 0, 1) + 0.1 * (_smooth_noise(rng, size, size, 6) - 0.5)
    elif kind == "flat":
        t = 0.5 + 0.25 * (rng.random((size, size), dtype=np.float32) - 0.5)
    else:
        raise ValueError(f"unknown source background {kind!r}")
    return low + (high - low) * np.clip(t, 0, 1)[..., None]


def _polygons(shape: str, cx, cy, radius, aspect, angle):
    cos, sin = math.cos(angle), math.sin(angle)
    scale = np.array([radius * math.sqrt(aspect), radius / math.sqrt(aspect)])
    rotation = np.array([[cos, -sin], [sin, cos]])
    return [((points * scale) @ rotation.T + (cx, cy), value)
            for points, value in SOURCE_SHAPES[shape]]


def shape_coverage(polygons, height: int, width: int) -> np.ndarray:
    """Anti-aliased coverage ``(H, W)`` float32 in [0, 1] of ``(polygon, value)`` fills in
    order (1 adds, 0 cuts), polygons in pixel coordinates."""
    bits = 4   # cv2's sub-pixel precision: coordinates × 16
    canvas = np.zeros((height, width), np.uint8)
    for points, value in polygons:
        fixed = np.round((np.asarray(points) - 0.5) * (1 << bits)).astype(np.int32)
        cv2.fillPoly(canvas, [fixed], 255 if value else 0, lineType=cv2.LINE_AA, shift=bits)
    return canvas.astype(np.float32) / 255.0


def render_source(index: int, *, seed: int = 0, stream: str = "train",
                  size: int = SOURCE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of ``stream``: ``(uint8 (size, size, 3) RGB, float32 (K,) labels)``."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {tuple(STREAMS)}, got {stream!r}")
    rng = np.random.default_rng([seed, STREAMS[stream], index])
    image = _background(SOURCE_BACKGROUNDS[rng.integers(len(SOURCE_BACKGROUNDS))], size, rng)
    owner = np.full((size, size), -1, np.int16)      # which object each pixel shows
    count = 1 + int(rng.choice(4, p=(0.3, 0.35, 0.25, 0.1)))
    classes = rng.choice(NUM_SOURCE_CLASSES, size=count, replace=rng.random() < 0.15)
    areas = []
    for slot, class_index in enumerate(classes):
        spec = SOURCE_CLASSES[class_index]
        radius = size * rng.uniform(0.12, 0.3 if count > 1 else 0.38)
        cx, cy = rng.uniform(0.5 * radius, size - 0.5 * radius, 2)
        angle = rng.uniform(0, 2 * math.pi)
        coverage = shape_coverage(_polygons(spec.shape, cx, cy, radius, rng.uniform(0.75, 1.33),
                                            angle), size, size)
        rows, cols = np.nonzero(coverage > 0)
        if rows.size == 0:
            areas.append(0)
            continue
        window = slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)
        y, x = np.mgrid[window].astype(np.float32)
        dx, dy = x + 0.5 - cx, y + 0.5 - cy
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / radius
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / radius
        family = spec.hue if rng.random() < 0.8 else SOURCE_HUES[rng.integers(len(SOURCE_HUES))]
        bright = _hsv(family + rng.uniform(-HUE_SPREAD, HUE_SPREAD), rng.uniform(0.5, 0.95),
                      rng.uniform(0.65, 1.0))
        dark = bright * rng.uniform(0.2, 0.45)
        pattern = source_texture(spec.texture, u, v, rng)
        colours = dark + (bright - dark) * pattern[..., None]
        alpha = coverage[window][..., None]
        image[window] = image[window] * (1 - alpha) + colours * alpha
        owner[window][coverage[window] >= 0.5] = slot
        areas.append(int((coverage >= 0.5).sum()))
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    visible = np.bincount(owner[owner >= 0].ravel(), minlength=count)
    labels = np.zeros(NUM_SOURCE_CLASSES, np.float32)
    for slot, class_index in enumerate(classes):
        if visible[slot] >= 40 and visible[slot] >= areas[slot] / 3:
            labels[class_index] = 1
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), labels


def source_batch(start: int, count: int, *, seed: int = 0, stream: str = "train",
                 size: int = SOURCE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start … start + count - 1`` of ``stream``, ImageNet-normalized:
    ``(images (count, 3, size, size) float32, labels (count, K) float32)``."""
    images, labels = [], []
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    for index in range(start, start + count):
        pixels, present = render_source(index, seed=seed, stream=stream, size=size)
        images.append(((pixels.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1))
        labels.append(present)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))
