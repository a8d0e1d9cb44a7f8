"""The synthetic WSSS benchmark (DESIGN §9): a deterministic generator of a VOC-layout dataset.

Each class is a family: one shape and one texture, with a preferred hue shared with other
classes (so colour alone does not identify a class), and per-object variation of size, aspect,
rotation, hue, saturation, brightness and texture frequency/phase. An image holds 1–3 objects
(later ones occlude earlier ones, in the image and in the GT) on a textured background from five
families. Two deliberate biases give background-noise and co-occurrence methods something to fix:

- *habitat* classes appear on their characteristic background with probability
  ``habitat_probability`` (like boats on water), while other images get that background only
  with ``stray_habitat_probability``;
- *pairs* ``(leader, partner)``: an image whose first object is the leader also holds the
  partner, placed overlapping it (like rider and horse), with probability ``pair_probability``.

The GT is exact: an object covers the pixels at least half inside its shape (4×4 supersampling;
the image gets the anti-aliased coverage, the GT does not), and, like VOC, a band 2 px wide (one
pixel on each side of every object boundary) is 255. Files are byte-identical for the same seed
and settings on the same software stack (NumPy, OpenCV, Pillow), whatever ``workers`` is.

Defaults: 600 training and 150 validation images of 96–160 px per side, 8 classes — small
enough for small models to train in minutes on 2 CPU cores.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass
from typing import Optional

import cv2
import numpy as np

from wsss_fast.data.classes import IGNORE_INDEX
from wsss_fast.data.dataset import is_whole_number
from wsss_fast.data.images import encode_label_png
from wsss_fast.io.atomic import atomic_write_bytes


@dataclass(frozen=True)
class ClassSpec:
    name: str
    shape: str
    texture: str
    hue: float  # preferred hue in [0, 1); each is shared by several classes


_HUES = (0.0, 0.09, 0.15, 0.78, 0.9)  # red, orange, yellow, violet, pink: clear of grass/water
_CLASS_TABLE = (
    ("disc", "dots"), ("star", "solid"), ("ring", "stripes"), ("square", "checker"),
    ("triangle", "waves"), ("cross", "hatch"), ("crescent", "stripes"), ("hexagon", "rings"),
    ("heart", "checker"), ("arrow", "dots"), ("diamond", "hatch"), ("capsule", "rings"),
    ("semicircle", "solid"), ("frame", "waves"), ("bowtie", "dots"), ("trapezoid", "stripes"),
    ("drop", "hatch"), ("lshape", "solid"), ("tshape", "checker"), ("pentagon", "waves"),
)
CLASS_SPECS = tuple(ClassSpec(name, name, texture, _HUES[i % len(_HUES)])
                    for i, (name, texture) in enumerate(_CLASS_TABLE))
MAX_CLASSES = len(CLASS_SPECS)

BACKGROUNDS = ("noise", "gradient", "stripes", "grass", "water")
_NEUTRAL_BACKGROUNDS = ("noise", "gradient", "stripes")
HABITATS = {6: "water", 4: "grass", 13: "water", 16: "grass"}  # class index → background
PAIRS = ((7, 5), (12, 9), (18, 15))  # (leader, partner): hexagon+cross is "horse+rider"

ID_YEAR = 2026  # ids 2026_000001...: valid as VOC string keys and as IRN int keys
_SUPERSAMPLE = 4  # sub-pixels per pixel side for the coverage (anti-aliasing) estimate


@dataclass(frozen=True)
class SyntheticConfig:
    num_classes: int = 8
    image_size: tuple = ((96, 160), (96, 160))  # ((min H, max H), (min W, max W))
    habitat_probability: float = 0.85
    stray_habitat_probability: float = 0.1  # per habitat background, images without its class
    pair_probability: float = 0.85
    object_count_probabilities: tuple = (0.45, 0.35, 0.2)  # 1, 2, 3 objects
    jpeg_quality: int = 90

    def __post_init__(self):
        if not is_whole_number(self.num_classes) or not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must lie in 1..{MAX_CLASSES}, got {self.num_classes}")
        object.__setattr__(self, "image_size", _size_ranges(self.image_size))
        for name in ("habitat_probability", "stray_habitat_probability", "pair_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if 2 * self.stray_habitat_probability > 1:
            raise ValueError("stray_habitat_probability must be at most 0.5")

    @property
    def habitats(self) -> dict[int, str]:
        return {c: bg for c, bg in HABITATS.items() if c < self.num_classes}

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple(pair for pair in PAIRS if max(pair) < self.num_classes)


def _size_ranges(image_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """``S``, ``(H, W)`` or ``((Hmin, Hmax), (Wmin, Wmax))`` → the last form."""
    if isinstance(image_size, (int, np.integer)):
        image_size = (image_size, image_size)
    try:
        ranges = tuple((side, side) if is_whole_number(side) else (side[0], side[1])
                       for side in image_size)
    except (TypeError, IndexError, ValueError):
        ranges = ()
    if not all(is_whole_number(v) for pair in ranges for v in pair):   # 96.5 is refused, not truncated
        ranges = ()
    ranges = tuple((int(lo), int(hi)) for lo, hi in ranges)
    if len(ranges) != 2 or any(not 32 <= lo <= hi <= 4096 for lo, hi in ranges):
        raise ValueError(f"image_size must be S, (H, W) or ((Hmin, Hmax), (Wmin, Wmax)) with "
                         f"sides in 32..4096, got {image_size!r}")
    return ranges


# ----------------------------------------------------------------------------- shapes

def _regular(sides: int, radius: float = 1.0, start: float = -math.pi / 2) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(sides) / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _circle(radius: float = 1.0, center=(0.0, 0.0)) -> np.ndarray:
    return _regular(64, radius) + np.asarray(center)


def _star() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    angles = -math.pi / 2 + math.pi * np.arange(10) / 5
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 16.5


def _capsule() -> np.ndarray:
    """A stadium: two half circles of radius 0.42 joined by straight sides."""
    angles = np.linspace(-math.pi / 2, math.pi / 2, 24)
    right = np.stack([0.58 + 0.42 * np.cos(angles), 0.42 * np.sin(angles)], axis=1)
    return np.concatenate([right, -right])


def _semicircle() -> np.ndarray:
    angles = np.linspace(math.pi, 2 * math.pi, 40)
    return np.stack([np.cos(angles), np.sin(angles) + 0.42], axis=1)


def _poly(*points) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


# Each shape: (polygon, value) fills in order (1 adds, 0 cuts a hole), unit radius, y down.
SHAPES = {
    "disc": [(_circle(), 1)],
    "star": [(_star(), 1)],
    "ring": [(_circle(), 1), (_circle(0.55), 0)],
    "square": [(_regular(4, 1.1, math.pi / 4), 1)],
    "triangle": [(_regular(3, 1.05), 1)],
    "cross": [(_poly((-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                     (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)), 1)],
    "crescent": [(_circle(), 1), (_circle(0.8, (0.45, -0.1)), 0)],
    "hexagon": [(_regular(6, 1.0, 0.0), 1)],
    "heart": [(_heart(), 1)],
    "arrow": [(_poly((-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25),
                     (-1, 0.25)), 1)],
    "diamond": [(_poly((0, -1), (0.62, 0), (0, 1), (-0.62, 0)), 1)],
    "capsule": [(_capsule(), 1)],
    "semicircle": [(_semicircle(), 1)],
    "frame": [(_regular(4, 1.2, math.pi / 4), 1), (_regular(4, 0.7, math.pi / 4), 0)],
    "bowtie": [(_poly((-1, -0.8), (0, -0.22), (1, -0.8), (1, 0.8), (0, 0.22), (-1, 0.8)), 1)],
    "trapezoid": [(_poly((-1, 0.6), (1, 0.6), (0.5, -0.6), (-0.5, -0.6)), 1)],
    "drop": [(_circle(0.62, (0, 0.3)), 1), (_poly((0, -1), (-0.54, 0.0), (0.54, 0.0)), 1)],
    "lshape": [(_poly((-0.8, -0.9), (-0.25, -0.9), (-0.25, 0.4), (0.8, 0.4), (0.8, 0.9),
                      (-0.8, 0.9)), 1)],
    "tshape": [(_poly((-0.9, -0.9), (0.9, -0.9), (0.9, -0.4), (0.25, -0.4), (0.25, 0.9),
                      (-0.25, 0.9), (-0.25, -0.4), (-0.9, -0.4)), 1)],
    "pentagon": [(_regular(5, 1.0), 1)],
}


@dataclass
class _Placement:
    cx: float
    cy: float
    radius: float
    angle: float
    x0: int  # window origin in the image
    y0: int
    coverage: np.ndarray  # float32 (h, w): fraction of each window pixel inside the shape
    mask: np.ndarray  # bool (h, w): coverage >= 0.5 — the GT

    @property
    def window(self) -> tuple[slice, slice]:
        h, w = self.mask.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


def _inside(points: np.ndarray, x0: int, y0: int, rows: int, cols: int) -> np.ndarray:
    """Even-odd test of the sub-pixel centres ``(x0 + (q + 0.5) / S, y0 + (p + 0.5) / S)``
    against a polygon, by scanlines: a centre is inside when an odd number of edges cross its
    row to its left. (``cv2.fillPoly`` snaps vertices to whole pixels and fills both ends.)"""
    ys = y0 + (np.arange(rows) + 0.5) / _SUPERSAMPLE
    start, end = points, np.roll(points, -1, axis=0)
    low, high = np.minimum(start[:, 1], end[:, 1]), np.maximum(start[:, 1], end[:, 1])
    row, edge = np.nonzero((low <= ys[:, None]) & (ys[:, None] < high))  # half-open in y
    t = (ys[row] - start[edge, 1]) / (end[edge, 1] - start[edge, 1])
    x = start[edge, 0] + t * (end[edge, 0] - start[edge, 0])
    # the crossing flips the parity of every centre strictly to its right
    first = np.clip(np.floor((x - x0) * _SUPERSAMPLE - 0.5).astype(np.int64) + 1, 0, cols)
    flips = np.bincount(row * (cols + 1) + first, minlength=rows * (cols + 1))
    return (np.cumsum(flips.reshape(rows, cols + 1), axis=1)[:, :cols] % 2).astype(bool)


def _rasterize(shape: str, cx: float, cy: float, radius: float, aspect: float, angle: float,
               height: int, width: int) -> Optional[_Placement]:
    """Coverage of the transformed shape over its bounding box, clipped to the image."""
    cos, sin = math.cos(angle), math.sin(angle)
    scale = np.array([radius * math.sqrt(aspect), radius / math.sqrt(aspect)])
    rotation = np.array([[cos, -sin], [sin, cos]])
    polygons = [((points * scale) @ rotation.T + (cx, cy), value)
                for points, value in SHAPES[shape]]
    corners = np.concatenate([points for points, _ in polygons])
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    rows, cols = (y1 - y0) * _SUPERSAMPLE, (x1 - x0) * _SUPERSAMPLE
    canvas = np.zeros((rows, cols), dtype=bool)
    for points, value in polygons:
        canvas[_inside(points, x0, y0, rows, cols)] = bool(value)
    coverage = canvas.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(
        axis=(1, 3), dtype=np.float32)
    return _Placement(cx, cy, radius, angle, int(x0), int(y0), coverage, coverage >= 0.5)


# ----------------------------------------------------------------------------- textures

def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pattern in [0, 1] over object coordinates (units of the object radius)."""
    frequency = rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * math.pi)
    if kind == "solid":
        return 0.8 + 0.2 * rng.random(u.shape, dtype=np.float32)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * math.pi * 2.2 * frequency * u + phase)
    if kind == "checker":
        f = 1.6 * frequency
        return ((np.floor(f * u + phase) + np.floor(f * v + phase)) % 2).astype(np.float32)
    if kind == "dots":
        f = 2.0 * frequency
        du = (f * u + phase) % 1.0 - 0.5
        dv = (f * v + phase) % 1.0 - 0.5
        return np.where(du * du + dv * dv < 0.09, 1.0, 0.15).astype(np.float32)
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * math.pi * 2.2 * frequency * np.hypot(u, v) + phase)
    if kind == "waves":
        bend = 0.25 * np.sin(2 * math.pi * 1.2 * v)
        return 0.5 + 0.5 * np.sin(2 * math.pi * 1.8 * frequency * (u + bend) + phase)
    if kind == "hatch":
        f = 1.8 * frequency
        lines = np.minimum(np.abs(np.sin(math.pi * f * u + phase)),
                           np.abs(np.sin(math.pi * f * v + phase)))
        return np.where(lines < 0.35, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _smooth_noise(rng, height: int, width: int, cell_y: float, cell_x: float) -> np.ndarray:
    """Value noise in [0, 1] with correlation lengths ``cell_y`` × ``cell_x`` pixels."""
    grid = rng.random((max(2, round(height / cell_y) + 1), max(2, round(width / cell_x) + 1)),
                      dtype=np.float32)
    noise = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(noise, 0, 1)


def _mix(low: np.ndarray, high: np.ndarray, t: np.ndarray) -> np.ndarray:
    return low + (high - low) * t[..., None]


def _background(kind: str, height: int, width: int, rng) -> np.ndarray:
    """A ``(H, W, 3)`` float32 RGB background of the given family."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind in ("noise", "gradient", "stripes"):
        hue = rng.random()
        low = _hsv(hue, rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.6))
        high = _hsv(hue + rng.uniform(-0.12, 0.12), rng.uniform(0.05, 0.35), rng.uniform(0.6, 0.9))
        if kind == "noise":
            t = 0.7 * _smooth_noise(rng, height, width, 16, 16) + 0.3 * _smooth_noise(
                rng, height, width, 4, 4)
        elif kind == "gradient":
            angle = rng.uniform(0, 2 * math.pi)
            ramp = x * math.cos(angle) + y * math.sin(angle)
            ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
            t = 0.85 * ramp + 0.15 * _smooth_noise(rng, height, width, 8, 8)
        else:
            angle, period = rng.uniform(0, math.pi), rng.uniform(10, 24)
            ramp = x * math.cos(angle) + y * math.sin(angle)
            t = 0.5 + 0.35 * np.sin(2 * math.pi * ramp / period) + 0.15 * (
                _smooth_noise(rng, height, width, 6, 6) - 0.5)
        image = _mix(low, high, t)
    elif kind == "grass":  # vertical blades: fine across, long along y
        base = _hsv(rng.uniform(0.22, 0.32), rng.uniform(0.45, 0.75), rng.uniform(0.35, 0.6))
        blades = _smooth_noise(rng, height, width, 14, 1.5)
        patches = _smooth_noise(rng, height, width, 24, 24)
        image = base * (0.55 + 0.6 * blades + 0.3 * patches)[..., None]
    elif kind == "water":  # horizontal ripples and streaks
        base = _hsv(rng.uniform(0.53, 0.6), rng.uniform(0.4, 0.7), rng.uniform(0.45, 0.75))
        period, wobble = rng.uniform(6, 12), rng.uniform(30, 60)
        ripple = 0.5 + 0.5 * np.sin(2 * math.pi * (
            y / period + 0.1 * np.sin(2 * math.pi * x / wobble + rng.uniform(0, 2 * math.pi))))
        streaks = _smooth_noise(rng, height, width, 2, 14)
        image = base * (0.7 + 0.3 * ripple + 0.25 * streaks)[..., None]
    else:
        raise ValueError(f"unknown background {kind!r}")
    return image.astype(np.float32)


# ----------------------------------------------------------------------------- samples

@dataclass
class SyntheticSample:
    image: np.ndarray  # uint8 (H, W, 3) RGB, before JPEG compression
    label: np.ndarray  # uint8 (H, W): 0 background, 1..K classes, 255 boundary band
    labels: np.ndarray  # float32 (K,): the classes present in ``label``
    background: str
    objects: list  # class index of each object, in drawing order


def _choose_classes(config: SyntheticConfig, rng) -> tuple[list[int], bool]:
    """Object classes in drawing order, and whether the second one is the first one's partner.
    Leaders appear only as the first object, so the partner probability holds exactly."""
    count = 1 + int(rng.choice(3, p=config.object_count_probabilities))
    partner_of = dict(config.pairs)
    classes = [int(rng.integers(config.num_classes))]
    paired = classes[0] in partner_of and rng.random() < config.pair_probability
    if paired:
        classes.append(partner_of[classes[0]])
    habitats = config.habitats
    while len(classes) < count:
        # Followers: no leaders, and no class whose habitat conflicts with one already chosen
        # (so that every habitat class keeps its habitat probability).
        chosen = {habitats[c] for c in classes if c in habitats}
        followers = [c for c in range(config.num_classes) if c not in partner_of and (
            c not in habitats or not chosen or habitats[c] in chosen)]
        classes.append(int(followers[rng.integers(len(followers))]))
    return classes, paired


def _choose_background(config: SyntheticConfig, classes: list[int], rng) -> str:
    habitat = next((config.habitats[c] for c in classes if c in config.habitats), None)
    draw = rng.random()
    if habitat is not None:
        if draw < config.habitat_probability:
            return habitat
        return _NEUTRAL_BACKGROUNDS[rng.integers(len(_NEUTRAL_BACKGROUNDS))]
    stray = config.stray_habitat_probability
    if draw < stray:
        return "water"
    if draw < 2 * stray:
        return "grass"
    return _NEUTRAL_BACKGROUNDS[rng.integers(len(_NEUTRAL_BACKGROUNDS))]


def _boundary_band(instances: np.ndarray) -> np.ndarray:
    """Pixels with a differently labelled 8-neighbour: one pixel on each side of a boundary."""
    kernel = np.ones((3, 3), np.uint8)
    return cv2.dilate(instances, kernel) != cv2.erode(instances, kernel)


def _position(rng, previous: Optional[_Placement], alone: bool, height: int, width: int):
    """Centre and radius of a new object: overlapping ``previous`` from (mostly) above when it is
    a partner, else anywhere with at least 40 % of its radius inside the image."""
    if previous is not None:
        radius = previous.radius * rng.uniform(0.6, 0.85)
        direction = -math.pi / 2 + rng.uniform(-0.9, 0.9)
        distance = (previous.radius + radius) * rng.uniform(0.55, 0.8)
        return (previous.cx + distance * math.cos(direction),
                previous.cy + distance * math.sin(direction), radius)
    low, high = (0.22, 0.38) if alone else (0.16, 0.3)  # single objects are larger, as in VOC
    radius = min(height, width) * rng.uniform(low, high)
    return (rng.uniform(0.6 * radius, width - 0.6 * radius),
            rng.uniform(0.6 * radius, height - 0.6 * radius), radius)


def _place(shape: str, instances: np.ndarray, areas: list[int], rng,
           partner_of: Optional[_Placement], alone: bool) -> Optional[_Placement]:
    """Up to 25 tries at a placement with at least 60 GT pixels that leaves every earlier object
    (GT areas ``areas``) at least 45 % visible; ``None`` when none is found."""
    height, width = instances.shape
    for _attempt in range(25):
        cx, cy, radius = _position(rng, partner_of, alone, height, width)
        placed = _rasterize(shape, cx, cy, radius, rng.uniform(0.8, 1.25),
                            rng.uniform(0, 2 * math.pi), height, width)
        if placed is None or placed.mask.sum() < 60:
            continue
        hidden = np.bincount(instances[placed.window][placed.mask], minlength=len(areas) + 1)
        visible = np.bincount(instances.ravel(), minlength=len(areas) + 1) - hidden
        if (visible[1:] >= 0.45 * np.asarray(areas)).all():
            return placed
    return None


def render_sample(index: int, *, seed: int = 0,
                  config: SyntheticConfig = SyntheticConfig()) -> SyntheticSample:
    """Render sample ``index`` of the dataset with ``seed`` (independent of other samples)."""
    rng = np.random.default_rng([seed, index])
    (h_lo, h_hi), (w_lo, w_hi) = config.image_size
    height, width = int(rng.integers(h_lo, h_hi + 1)), int(rng.integers(w_lo, w_hi + 1))
    classes, paired = _choose_classes(config, rng)
    background = _choose_background(config, classes, rng)
    image = _background(background, height, width, rng)
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    instances = np.zeros((height, width), np.uint8)  # 0 background, i = i-th placed object
    areas: list[int] = []
    placed_classes: list[int] = []
    leader = None
    for slot, class_index in enumerate(classes):
        spec = CLASS_SPECS[class_index]
        partner_of = leader if paired and slot == 1 else None
        placed = _place(spec.shape, instances, areas, rng, partner_of, len(classes) == 1)
        if placed is None:
            continue  # no room for this object: leave it out
        if slot == 0:
            leader = placed
        areas.append(int(placed.mask.sum()))
        placed_classes.append(class_index)
        instances[placed.window][placed.mask] = len(areas)
        image[placed.window] = _mix(image[placed.window], _object_colours(spec, placed, rng),
                                    placed.coverage)
    class_of_instance = np.array([0] + [c + 1 for c in placed_classes], dtype=np.uint8)
    label = class_of_instance[instances]
    label[_boundary_band(instances)] = IGNORE_INDEX
    labels = np.zeros(config.num_classes, np.float32)
    present = np.unique(label)
    present = present[(present != 0) & (present != IGNORE_INDEX)]
    labels[present.astype(np.int64) - 1] = 1
    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return SyntheticSample(pixels, label, labels, background, placed_classes)


def _object_colours(spec: ClassSpec, placed: _Placement, rng) -> np.ndarray:
    """Textured colours of an object over its window (float32 RGB); the texture turns with it."""
    h, w = placed.mask.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = x + placed.x0 + 0.5 - placed.cx, y + placed.y0 + 0.5 - placed.cy
    cos, sin = math.cos(placed.angle), math.sin(placed.angle)
    u = (dx * cos + dy * sin) / placed.radius
    v = (-dx * sin + dy * cos) / placed.radius
    hue = spec.hue + rng.uniform(-0.04, 0.04) if rng.random() < 0.75 else rng.random()
    bright = _hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.7, 1.0))
    dark = bright * rng.uniform(0.25, 0.45)
    colours = _mix(dark, bright, _texture(spec.texture, u, v, rng).astype(np.float32))
    return colours + rng.normal(0, 0.03, colours.shape).astype(np.float32)


# ----------------------------------------------------------------------------- dataset

def synthetic_id(index: int) -> str:
    return f"{ID_YEAR}_{index + 1:06d}"


def _write_sample(job: tuple) -> tuple[int, list[int], str]:
    root, index, seed, config = job
    sample = render_sample(index, seed=seed, config=config)
    id = synthetic_id(index)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for synthetic image {id}")
    atomic_write_bytes(os.path.join(root, "JPEGImages", id + ".jpg"), jpeg.tobytes())
    atomic_write_bytes(os.path.join(root, "SegmentationClass", id + ".png"),
                       encode_label_png(sample.label, palette=True))
    atomic_write_bytes(os.path.join(root, "SegmentationClassAug", id + ".png"),
                       encode_label_png(sample.label, palette=False))
    return index, np.flatnonzero(sample.labels).tolist(), sample.background


def _cooccurrence_design(config: SyntheticConfig) -> dict:
    names = [spec.name for spec in CLASS_SPECS[:config.num_classes]]
    return {
        "background": {names[c]: {"class_index": c, "background": bg,
                                  "probability": config.habitat_probability}
                       for c, bg in sorted(config.habitats.items())},
        "stray_background_probability": config.stray_habitat_probability,
        "pairs": [{"leader": names[a], "partner": names[b], "class_indices": [a, b],
                   "probability": config.pair_probability} for a, b in config.pairs],
    }


def _measured_cooccurrence(config: SyntheticConfig, records: list) -> dict:
    """Observed frequencies over ``records`` of ``(classes present, background)``."""
    names = [spec.name for spec in CLASS_SPECS[:config.num_classes]]

    def fraction(selected, condition):
        chosen = [r for r in records if selected(r)]
        hits = sum(1 for r in chosen if condition(r))
        return {"images": len(chosen), "fraction": round(hits / len(chosen), 4) if chosen else None}

    background = {}
    for c, bg in sorted(config.habitats.items()):
        background[names[c]] = {
            "on_habitat": fraction(lambda r: c in r[0], lambda r: r[1] == bg),
            "habitat_without_class": fraction(lambda r: c not in r[0], lambda r: r[1] == bg)}
    pairs = {f"{names[a]}+{names[b]}": {
        "partner_given_leader": fraction(lambda r: a in r[0], lambda r: b in r[0]),
        "leader_given_partner": fraction(lambda r: b in r[0], lambda r: a in r[0])}
        for a, b in config.pairs}
    return {"background": background, "pairs": pairs}


def _settings(config: SyntheticConfig, seed: int, num_train: int, num_val: int) -> dict:
    settings = asdict(config)
    settings["image_size"] = [list(side) for side in config.image_size]
    settings["object_count_probabilities"] = list(config.object_count_probabilities)
    settings.update(generator="wsss_fast.data.synthetic", version=1, seed=seed,
                    num_train=num_train, num_val=num_val)
    return settings


_MARKER = ".synthetic-in-progress.json"


def _existing_settings(root: str) -> Optional[dict]:
    for name in ("dataset.json", _MARKER):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                content = json.load(handle)
            return content.get("settings", content)
    return None


def generate_synthetic(root, *, num_train: int = 600, num_val: int = 150, num_classes: int = 8,
                       image_size=((96, 160), (96, 160)), seed: int = 0,
                       workers: int = 0) -> str:
    """Write the synthetic benchmark in VOC layout under ``root`` and return ``root``.

    Writes ``JPEGImages/<id>.jpg`` (quality 90), ``SegmentationClass/<id>.png`` (palette) and
    ``SegmentationClassAug/<id>.png`` (plain), ``ImageSets/Segmentation/{train,val,trainval}.txt``,
    ``cls_labels.npy`` (pickled dict, IRN int keys → float32 (K,)), ``classes.txt`` and
    ``dataset.json`` (settings, classes, co-occurrence design and measured frequencies).
    ``image_size``: ``S``, ``(H, W)`` or ``((Hmin, Hmax), (Wmin, Wmax))``. ``workers``:
    processes (0: this process); the output does not depend on it. A root already holding
    this dataset with the same settings is returned as is; other non-empty folders are refused.
    """
    root = os.fspath(root)
    fractional = {name: value for name, value in (("num_train", num_train), ("num_val", num_val),
                                                   ("num_classes", num_classes),
                                                   ("seed", seed), ("workers", workers))
                  if not is_whole_number(value)}
    if fractional:
        raise ValueError("expected whole numbers: " + ", ".join(
            f"{name}={value!r}" for name, value in fractional.items()))
    config = SyntheticConfig(num_classes=num_classes, image_size=image_size)
    if num_train < 0 or num_val < 0 or not 0 < num_train + num_val <= 999_999:
        raise ValueError(f"num_train + num_val must lie in 1..999999, got {num_train}, {num_val}")
    if not isinstance(seed, (int, np.integer)) or seed < 0 or workers < 0:
        raise ValueError(f"seed and workers must be non-negative integers, got {seed}, {workers}")
    settings = _settings(config, int(seed), num_train, num_val)
    if os.path.isdir(root) and os.listdir(root):
        existing = _existing_settings(root)
        if existing is None:
            raise ValueError(f"{root} is not empty and holds no synthetic dataset; "
                             f"choose an empty or new folder")
        if existing != settings:
            raise ValueError(f"{root} holds a synthetic dataset generated with other settings "
                             f"({existing}); choose another folder or delete it")
        if os.path.isfile(os.path.join(root, "dataset.json")):
            return root
    atomic_write_bytes(os.path.join(root, _MARKER), json.dumps(settings).encode())

    jobs = [(root, index, int(seed), config) for index in range(num_train + num_val)]
    if workers == 0:
        records = [_write_sample(job) for job in jobs]
    else:
        with multiprocessing.get_context().Pool(workers) as pool:
            records = pool.map(_write_sample, jobs, chunksize=8)
            # Let the workers exit on their own: the with-block's terminate() SIGTERMs them, and
            # they inherit the command line's SIGTERM handler, which prints a traceback each.
            pool.close()
            pool.join()

    ids = [synthetic_id(index) for index, _, _ in records]
    splits = {"train": ids[:num_train], "val": ids[num_train:], "trainval": ids}
    for split, split_ids in splits.items():
        atomic_write_bytes(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"),
                           "".join(id + "\n" for id in split_ids).encode())
    cls_labels = {}
    for index, present, _ in records:
        labels = np.zeros(num_classes, np.float32)
        labels[present] = 1
        cls_labels[int(synthetic_id(index).replace("_", ""))] = labels
    buffer = io.BytesIO()
    np.save(buffer, np.array(cls_labels, dtype=object), allow_pickle=True)
    atomic_write_bytes(os.path.join(root, "cls_labels.npy"), buffer.getvalue())
    specs = CLASS_SPECS[:num_classes]
    atomic_write_bytes(os.path.join(root, "classes.txt"),
                       "".join(spec.name + "\n" for spec in specs).encode())
    train_records = [(set(present), bg) for _, present, bg in records[:num_train]]
    description = {
        "settings": settings,
        "classes": [asdict(spec) for spec in specs],
        "backgrounds": list(BACKGROUNDS),
        "cooccurrence": _cooccurrence_design(config),
        "measured_train": _measured_cooccurrence(config, train_records),
    }
    atomic_write_bytes(os.path.join(root, "dataset.json"),
                       (json.dumps(description, indent=2, sort_keys=True) + "\n").encode())
    os.unlink(os.path.join(root, _MARKER))
    return root
