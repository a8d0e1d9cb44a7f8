"""The procedural source domain: deterministic, multi-label, and disjoint from the synthetic
benchmark's classes in shape, texture, colour family and background."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsss_fast.data import source_domain as sd
from wsss_fast.data import synthetic

BENCHMARK_TEXTURES = sorted({spec.texture for spec in synthetic.CLASS_SPECS})
BENCHMARK_HUE_SPREAD = 0.04     # synthetic._object_colours: preferred hue ± 0.04


def test_render_is_deterministic_and_streams_differ():
    image, labels = sd.render_source(5, seed=3)
    again, labels_again = sd.render_source(5, seed=3)
    assert image.dtype == np.uint8 and image.shape == (sd.SOURCE_SIZE, sd.SOURCE_SIZE, 3)
    assert np.array_equal(image, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(image, sd.render_source(5, seed=4)[0])
    assert not np.array_equal(image, sd.render_source(5, seed=3, stream="val")[0])
    with pytest.raises(ValueError, match="stream must be one of"):
        sd.render_source(0, stream="test")


def test_labels_are_multi_label_over_every_class():
    labels = np.stack([sd.render_source(i, seed=0)[1] for i in range(120)])
    assert labels.shape == (120, sd.NUM_SOURCE_CLASSES)
    per_image = labels.sum(axis=1)
    assert (per_image >= 1).mean() > 0.95 and (per_image >= 2).mean() > 0.3
    assert (labels.sum(axis=0) > 0).all()      # every class occurs


def test_batch_is_normalized_images_and_labels():
    images, labels = sd.source_batch(0, 3, seed=1, size=64)
    assert images.shape == (3, 3, 64, 64) and labels.shape == (3, sd.NUM_SOURCE_CLASSES)
    assert images.mean().abs() < 2 and np.array_equal(labels[1].numpy(),
                                                      sd.render_source(1, seed=1, size=64)[1])


def test_names_are_disjoint_from_the_benchmark():
    assert not set(sd.SOURCE_SHAPES) & set(synthetic.SHAPES)
    assert not set(sd.SOURCE_TEXTURES) & set(BENCHMARK_TEXTURES)
    assert not set(sd.SOURCE_BACKGROUNDS) & set(synthetic.BACKGROUNDS)
    assert {c.shape for c in sd.SOURCE_CLASSES} <= set(sd.SOURCE_SHAPES)
    assert {c.texture for c in sd.SOURCE_CLASSES} <= set(sd.SOURCE_TEXTURES)


def _hue_distance(a: float, b: float) -> float:
    return abs((a - b + 0.5) % 1.0 - 0.5)


def test_colour_families_are_disjoint_from_the_benchmark_class_hues():
    for source_hue in sd.SOURCE_HUES:
        for spec in synthetic.CLASS_SPECS:
            gap = _hue_distance(source_hue, spec.hue) - sd.HUE_SPREAD - BENCHMARK_HUE_SPREAD
            assert gap >= 0.06, (source_hue, spec.name, spec.hue)


def _mask(polygons, size: int, angle: float = 0.0, aspect: float = 1.0, scale: float = 1.0):
    cos, sin = math.cos(angle), math.sin(angle)
    stretch = np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)]) * scale
    rotation = np.array([[cos, -sin], [sin, cos]])
    placed = [(((points * stretch) @ rotation.T) * size * 0.3 + size / 2, value)
              for points, value in polygons]
    return sd.shape_coverage(placed, size, size) >= 0.5


def _centred(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    middle = mask.shape[0] / 2
    return np.roll(mask, (round(middle - rows.mean()), round(middle - cols.mean())), (0, 1))


def test_no_source_shape_overlaps_a_benchmark_shape():
    """At equal areas with centroids aligned, every rotation (20° steps) and the benchmark's
    aspects, each source shape's IoU with each benchmark shape stays below MAX_SHAPE_IOU."""
    size = 64
    for name, polygons in synthetic.SHAPES.items():
        poses = [_centred(_mask(polygons, size, angle, aspect))
                 for angle in np.arange(0, 2 * math.pi, math.pi / 9) for aspect in (0.8, 1.0, 1.25)]
        area = poses[1].sum()
        for source_name, source_polygons in sd.SOURCE_SHAPES.items():
            scale = math.sqrt(area / _mask(source_polygons, size).sum())
            source = _centred(_mask(source_polygons, size, scale=scale))
            best = max((source & other).sum() / (source | other).sum() for other in poses)
            assert best < sd.MAX_SHAPE_IOU, (source_name, name, round(float(best), 3))


def _power_spectrum(texture, kind: str) -> np.ndarray:
    grid = np.linspace(-1.5, 1.5, 96, dtype=np.float32)
    u, v = np.meshgrid(grid, grid)
    total = 0
    for seed in range(6):   # averaged over frequency / phase draws
        pattern = texture(kind, u, v, np.random.default_rng(seed)).astype(np.float64)
        power = np.abs(np.fft.fft2(pattern - pattern.mean())) ** 2
        total = total + power / max(power.sum(), 1e-12)
    return total.ravel()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_source_textures_differ_from_benchmark_textures_more_than_those_differ_among_themselves():
    """Power spectra (shift-invariant): each source texture's cosine similarity with every
    benchmark texture stays below that of the closest pair of benchmark textures."""
    benchmark = {kind: _power_spectrum(synthetic._texture, kind) for kind in BENCHMARK_TEXTURES}
    closest_pair = max(_cosine(benchmark[a], benchmark[b]) for a in benchmark for b in benchmark
                       if a < b)
    for kind in sd.SOURCE_TEXTURES:
        spectrum = _power_spectrum(sd.source_texture, kind)
        similarity = max(_cosine(spectrum, other) for other in benchmark.values())
        assert similarity < min(0.7, closest_pair), (kind, similarity, closest_pair)
