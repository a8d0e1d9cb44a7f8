"""The synthetic benchmark generator: determinism, VOC-layout output, exact GT with a thin 255
band, the co-occurrence design, class coverage and speed."""

import json
import math
import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from wsss_fast.data import IGNORE_INDEX, VOCDataset, generate_synthetic, read_label_png
from wsss_fast.data.synthetic import (CLASS_SPECS, SyntheticConfig, _rasterize, render_sample,
                                      synthetic_id)

SMALL = dict(num_train=10, num_val=4, image_size=((64, 96), (72, 100)))


def _tree_bytes(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, root)] = handle.read()
    return files


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path):
    serial = _tree_bytes(generate_synthetic(tmp_path / "a", seed=3, workers=0, **SMALL))
    parallel = _tree_bytes(generate_synthetic(tmp_path / "b", seed=3, workers=2, **SMALL))
    assert len(serial) == 3 * 14 + 3 + 3  # images, GT, Aug GT; 3 splits; labels, classes, json
    assert serial == parallel
    other = _tree_bytes(generate_synthetic(tmp_path / "c", seed=4, workers=0, **SMALL))
    assert set(other) == set(serial)
    changed = [name for name in serial if name.endswith(".jpg") and other[name] != serial[name]]
    assert len(changed) == 14


def test_layout_reads_as_voc_with_labels_equal_to_gt_classes(tmp_path):
    root = generate_synthetic(tmp_path / "synth", seed=0, **SMALL)
    names = tuple(spec.name for spec in CLASS_SPECS[:8])
    train = VOCDataset(root, split="train")
    val = VOCDataset(root, split="val")
    assert train.class_names == names and not train.problems()
    assert train.ids == [synthetic_id(i) for i in range(10)] == [f"2026_{i:06d}"
                                                               for i in range(1, 11)]
    assert len(val) == 4 and len(VOCDataset(root, split="trainval")) == 14
    cls_labels = np.load(os.path.join(root, "cls_labels.npy"), allow_pickle=True).item()
    assert all(isinstance(key, int) for key in cls_labels)  # IRN int-coded keys
    string_keyed = os.path.join(tmp_path, "string_keys.npy")
    np.save(string_keyed, {f"{k // 10**6}_{k % 10**6:06d}": v for k, v in cls_labels.items()},
            allow_pickle=True)
    by_string = VOCDataset(root, split="trainval", labels=string_keyed)
    for dataset in (train, val):
        for id in dataset.ids:
            sample = dataset.sample(id)
            gt = read_label_png(sample.gt_path)
            assert sample.gt_path.endswith(os.path.join("SegmentationClass", id + ".png"))
            with Image.open(sample.gt_path) as image:
                assert image.mode == "P"
            aug = os.path.join(root, "SegmentationClassAug", id + ".png")
            with Image.open(aug) as image:
                assert image.mode == "L"
            np.testing.assert_array_equal(read_label_png(aug), gt)
            present = np.zeros(8, np.float32)
            values = np.unique(gt)
            present[values[(values > 0) & (values < 255)] - 1] = 1
            assert present.any()
            np.testing.assert_array_equal(sample.labels, present)
            np.testing.assert_array_equal(by_string.sample(id).labels, present)
            image = cv2.imread(sample.image_path)
            assert image.shape[:2] == gt.shape
            assert 64 <= gt.shape[0] <= 96 and 72 <= gt.shape[1] <= 100
    with open(os.path.join(root, "classes.txt")) as handle:
        assert tuple(handle.read().split()) == names


def test_boundary_band_is_thin_and_separates_every_region():
    surviving = total = 0
    for index in range(40):
        label = render_sample(index, seed=1).label
        band = label == IGNORE_INDEX
        assert 0 < band.mean() < 0.2
        # No two 4-neighbours carry different non-ignore labels: the band separates regions.
        for a, b in ((label[1:], label[:-1]), (label[:, 1:], label[:, :-1])):
            assert not ((a != b) & (a != IGNORE_INDEX) & (b != IGNORE_INDEX)).any()
        # 2 px wide: eroding with a 3x3 square removes it, except where boundaries come within
        # a few pixels of each other (a sliver of an occluded object, a star tip).
        survives = int(cv2.erode(band.astype(np.uint8), np.ones((3, 3), np.uint8)).sum())
        assert survives <= 0.15 * band.sum()
        surviving, total = surviving + survives, total + int(band.sum())
        # The band outlines objects: each of its connected pieces touches an object pixel.
        objects = ((label > 0) & (label != IGNORE_INDEX)).astype(np.uint8)
        near_object = cv2.dilate(objects, np.ones((3, 3), np.uint8)).astype(bool)
        count, pieces = cv2.connectedComponents(band.astype(np.uint8), connectivity=8)
        assert set(np.unique(pieces[band & near_object])) == set(range(1, count))
    assert surviving <= 0.03 * total


def test_rasterized_masks_are_exact_shapes():
    # A disc: GT = pixels whose sub-pixel majority lies inside; away from the rim (0.75 px)
    # that is exactly "pixel centre inside the circle".
    height, width, cx, cy, radius = 60, 70, 31.3, 28.6, 17.2
    placed = _rasterize("disc", cx, cy, radius, 1.0, 0.4, height, width)
    mask = np.zeros((height, width), bool)
    h, w = placed.mask.shape
    mask[placed.y0:placed.y0 + h, placed.x0:placed.x0 + w] = placed.mask
    y, x = np.mgrid[0:height, 0:width] + 0.5
    distance = np.hypot(x - cx, y - cy)
    polygon_radius = radius * math.cos(math.pi / 64)  # the disc is a 64-gon
    certain = (distance < polygon_radius - 0.75) | (distance > radius + 0.75)
    np.testing.assert_array_equal(mask[certain], distance[certain] < radius)
    assert abs(mask.sum() - math.pi * radius ** 2) < 2 * math.pi * radius
    # An axis-aligned square with integer edges (half-side 10 px): coverage exactly 0 or 1.
    square = _rasterize("square", 20.0, 25.0, 10 * math.sqrt(2) / 1.1, 1.0, 0.0, 50, 50)
    full = np.zeros((50, 50), np.float32)
    h, w = square.coverage.shape
    full[square.y0:square.y0 + h, square.x0:square.x0 + w] = square.coverage
    expected = np.zeros((50, 50), np.float32)
    expected[15:35, 10:30] = 1
    np.testing.assert_array_equal(full, expected)


def test_cooccurrence_statistics_hold():
    config = SyntheticConfig()
    samples = [render_sample(i, seed=7, config=config) for i in range(400)]
    backgrounds = np.array([s.background for s in samples])
    present = np.array([s.labels > 0 for s in samples])
    names = [spec.name for spec in CLASS_SPECS]
    assert config.habitats == {6: "water", 4: "grass"} and config.pairs == ((7, 5),)
    assert (names[6], names[4], names[7], names[5]) == ("crescent", "triangle", "hexagon",
                                                        "cross")
    for class_index, habitat in config.habitats.items():
        with_class = present[:, class_index]
        assert with_class.sum() > 40
        on_habitat = (backgrounds[with_class] == habitat).mean()
        assert 0.72 <= on_habitat <= 0.97, (names[class_index], on_habitat)
        without = present[:, [c for c, bg in config.habitats.items() if bg == habitat]].sum(1) == 0
        stray = (backgrounds[without] == habitat).mean()
        assert 0.03 <= stray <= 0.2, (habitat, stray)
    leader, partner = config.pairs[0]
    with_leader = present[:, leader]
    assert with_leader.sum() > 30
    together = present[with_leader, partner].mean()
    assert 0.7 <= together <= 0.97
    baseline = present[~with_leader, partner].mean()
    assert baseline < 0.5 * together  # the partner is much likelier next to the leader
    for sample in samples[:50]:
        assert 1 <= len(sample.objects) <= 3


def test_every_class_appears_and_classes_vary():
    for num_classes, count in ((8, 150), (20, 400)):
        config = SyntheticConfig(num_classes=num_classes)
        samples = [render_sample(i, seed=11, config=config) for i in range(count)]
        totals = np.sum([s.labels for s in samples], axis=0)
        assert (totals >= 3).all(), totals
        for s in samples:
            values = np.unique(s.label)
            values = values[(values > 0) & (values != IGNORE_INDEX)]
            np.testing.assert_array_equal(np.flatnonzero(s.labels), values - 1)
    # Intra-class variation: the same class gets different sizes and colours.
    areas, colours = [], []
    for i in range(120):
        s = render_sample(i, seed=5)
        if s.objects == [0]:
            disc = s.label == 1
            areas.append(disc.sum())
            colours.append(s.image[disc].mean(axis=0))
    assert len(areas) >= 5
    assert np.std(areas) > 0.1 * np.mean(areas)
    assert np.ptp(np.array(colours), axis=0).max() > 30


def test_dataset_json_records_design_and_measurements(tmp_path):
    root = generate_synthetic(tmp_path / "synth", seed=2, **SMALL)
    with open(os.path.join(root, "dataset.json")) as handle:
        description = json.load(handle)
    assert description["settings"]["seed"] == 2 and description["settings"]["num_train"] == 10
    design = description["cooccurrence"]
    assert design["background"]["crescent"]["background"] == "water"
    assert design["background"]["triangle"]["background"] == "grass"
    assert design["pairs"][0]["leader"] == "hexagon" and design["pairs"][0]["partner"] == "cross"
    measured = description["measured_train"]
    assert set(measured["background"]) == {"crescent", "triangle"}
    assert "hexagon+cross" in measured["pairs"]
    assert [c["name"] for c in description["classes"]] == [s.name for s in CLASS_SPECS[:8]]


def test_existing_roots(tmp_path):
    root = generate_synthetic(tmp_path / "synth", seed=0, **SMALL)
    stamp = os.stat(os.path.join(root, "JPEGImages", "2026_000001.jpg")).st_mtime_ns
    assert generate_synthetic(root, seed=0, **SMALL) == root  # same settings: kept as is
    assert os.stat(os.path.join(root, "JPEGImages", "2026_000001.jpg")).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        generate_synthetic(root, seed=1, **SMALL)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no synthetic dataset"):
        generate_synthetic(tmp_path / "foreign", **SMALL)
    # An interrupted run (marker left, no dataset.json) is completed on the next call.
    before = _tree_bytes(root)
    with open(os.path.join(root, "dataset.json")) as handle:
        settings = json.load(handle)["settings"]
    with open(os.path.join(root, ".synthetic-in-progress.json"), "w") as handle:
        json.dump(settings, handle)
    os.unlink(os.path.join(root, "dataset.json"))
    os.unlink(os.path.join(root, "JPEGImages", "2026_000003.jpg"))
    generate_synthetic(root, seed=0, **SMALL)
    assert _tree_bytes(root) == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=0), "num_classes"), (dict(num_classes=21), "num_classes"),
    (dict(image_size=16), "image_size"), (dict(image_size=((90, 80), (64, 64))), "image_size"),
    (dict(num_train=0, num_val=0), "num_train"), (dict(seed=-1), "seed")])
def test_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic(tmp_path / "x", **kwargs)


def test_generation_is_quick(tmp_path):
    start = time.perf_counter()
    generate_synthetic(tmp_path / "synth", num_train=60, num_val=20, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"80 default-size images took {elapsed:.1f} s"


def test_worker_pool_ends_quietly_under_the_command_lines_signal_handlers(tmp_path):
    # The pool's workers inherit `handle_interrupts`' SIGTERM handler; ending the pool by
    # terminate() (its with-block's exit) made each idle worker print an "Interrupted: SIGTERM"
    # traceback in every CLI run that generated data with workers.
    script = (
        "from wsss_fast.io import handle_interrupts\n"
        "from wsss_fast.data import generate_synthetic\n"
        "with handle_interrupts():\n"
        "    for run in range(4):\n"
        f"        generate_synthetic(r'{tmp_path}' + f'/d{{run}}', num_train=8, num_val=0, "
        "workers=2)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Interrupted" not in done.stderr, done.stderr
