"""MS COCO (2014) instance annotations as a WSSS dataset: image-level labels over 80 contiguous
classes and semantic label PNGs rasterized from the instance masks.

Layout: ``<root>/{train2014,val2014}/``, ``<root>/annotations/instances_<split>.json``, label PNGs
in ``<root>/mask/<split>/<image file stem>.png``. Label PNG values: 0 background, 1..80 the
classes in ascending category-id order (``COCO_CATEGORY_IDS``), no ignore value.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import multiprocessing
import os
from collections import Counter
from typing import Optional

import numpy as np

from wsss_fast.data.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from wsss_fast.data.dataset import WsssDataset
from wsss_fast.data.images import ImageDecodeError, read_label_png, write_label_png
from wsss_fast.data.labels import resolve_labels

_SPLIT_ALIASES = {"train": "train2014", "val": "val2014"}


def find_coco_split(root, split: Optional[str]) -> tuple[str, str, str]:
    """``(split, annotation file, image folder)``; ``train``/``val`` mean the 2014 splits, and
    ``None`` picks the only ``instances_*.json`` present."""
    root = os.fspath(root)
    annotations = os.path.join(root, "annotations")
    available = sorted(os.path.basename(path)[len("instances_"):-len(".json")]
                       for path in glob.glob(os.path.join(annotations, "instances_*.json")))
    if split is None:
        if len(available) != 1:
            raise ValueError(f"{root}: give a COCO split (available: {available or 'none'})")
        split = available[0]
    if split not in available:
        split = _SPLIT_ALIASES.get(split, split)
    annotation_file = os.path.join(annotations, f"instances_{split}.json")
    if not os.path.isfile(annotation_file):
        raise ValueError(f"{root}: no annotation file {annotation_file} "
                         f"(available splits: {available or 'none'})")
    return split, annotation_file, os.path.join(root, split)


def load_annotations(annotation_file: str) -> dict:
    try:
        with open(annotation_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{annotation_file}: cannot be read as JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotation_file}: missing the {key!r} list of a COCO "
                             f"instances file")
    return data


def category_index(data: dict, source: str) -> tuple[tuple[str, ...], dict[int, int]]:
    """Class names and ``{category id: 0-based class index}``: the standard 80 COCO classes when
    every category is a standard one (names and ids as in COCO 2014), else the file's own
    categories in ascending id order."""
    categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    standard = dict(zip(COCO_CATEGORY_IDS, COCO_CLASSES))
    if all(standard.get(cat_id) == name for cat_id, name in categories):
        return COCO_CLASSES, {cat_id: i for i, cat_id in enumerate(COCO_CATEGORY_IDS)}
    if not categories:
        raise ValueError(f"{source}: no categories")
    return (tuple(name for _, name in categories),
            {cat_id: i for i, (cat_id, _) in enumerate(categories)})


def _stem(file_name: str) -> str:
    return os.path.splitext(os.path.basename(file_name))[0]


class COCODataset(WsssDataset):
    """A COCO instances split. Image-level labels: every annotation's category, crowd included
    (or a ``labels`` file); ids are the image file stems (``COCO_train2014_000000000009``);
    ``gt_path`` points at the label PNG once ``build_coco_label_masks`` has written it."""

    name = "coco"

    def __init__(self, root, split=None, labels=None, classes=None):
        if classes is not None:
            raise ValueError("COCO class names come from the annotation file; do not pass classes")
        root = os.fspath(root)
        split, annotation_file, image_dir = find_coco_split(root, split)
        data = load_annotations(annotation_file)
        class_names, index_of = category_index(data, annotation_file)
        present = set(os.listdir(image_dir)) if os.path.isdir(image_dir) else set()
        listings = Counter(_stem(image["file_name"]) for image in data["images"])
        problems, images, image_ids = [], {}, {}
        for image in data["images"]:
            file_name, id = image["file_name"], _stem(image["file_name"])
            if listings[id] > 1:
                problems.append((id, f"{annotation_file}: several images have this file stem; "
                                     f"dropped"))
            elif file_name not in present:
                problems.append((id, f"image file {os.path.join(image_dir, file_name)} "
                                     f"is missing; dropped"))
            else:
                images[id] = os.path.join(image_dir, file_name)
                image_ids[image["id"]] = id
        ids = sorted(images)

        if labels is None:
            labels_by_id = {id: np.zeros(len(class_names), np.float32) for id in ids}
            for annotation in data["annotations"]:
                category = annotation.get("category_id")
                if category not in index_of:
                    raise ValueError(f"{annotation_file}: annotation {annotation.get('id')} has "
                                     f"unknown category id {category}")
                id = image_ids.get(annotation.get("image_id"))
                if id is not None:
                    labels_by_id[id][index_of[category]] = 1
        else:
            class_names, labels_by_id, label_problems = resolve_labels(
                labels, class_names, ids, ids, image_dir)
            problems += label_problems

        mask_dir = os.path.join(root, "mask", split)
        masks = set(os.listdir(mask_dir)) if os.path.isdir(mask_dir) else set()
        gt_paths = {id: os.path.join(mask_dir, id + ".png") for id in ids if id + ".png" in masks}
        self.split = split
        super().__init__(root, class_names, images, labels_by_id, gt_paths, problems)


# ----------------------------------------------------------------------------- label PNGs

_MASK_JOB: dict = {}  # set before forking the mask workers, which inherit it


def _quiet_coco_index(data: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def coco_label_mask(coco, image: dict, index_of: dict[int, int]) -> np.ndarray:
    """The semantic label map of one image: non-crowd annotations in annotation order, later ones
    overwriting earlier ones, value = class index + 1; crowd regions stay 0."""
    label = np.zeros((int(image["height"]), int(image["width"])), dtype=np.uint8)
    for annotation in coco.imgToAnns.get(image["id"], ()):
        if annotation.get("iscrowd", 0):
            continue
        label[coco.annToMask(annotation) == 1] = index_of[annotation["category_id"]] + 1
    return label


def _mask_is_valid(path: str, image: dict, num_classes: int) -> bool:
    try:
        label = read_label_png(path)
    except ImageDecodeError:
        return False
    return (label.shape == (image["height"], image["width"])
            and int(label.max(initial=0)) <= num_classes)


def _write_masks(positions: list[int]) -> None:
    coco, images, index_of, out_dir = (_MASK_JOB[key] for key in
                                       ("coco", "images", "index_of", "out_dir"))
    for position in positions:
        image = images[position]
        path = os.path.join(out_dir, _stem(image["file_name"]) + ".png")
        if os.path.exists(path) and _mask_is_valid(path, image, len(index_of)):
            continue
        write_label_png(path, coco_label_mask(coco, image, index_of), palette=False)


def build_coco_label_masks(root, split, out_dir=None, workers: Optional[int] = None) -> str:
    """Rasterize the instance annotations of ``split`` into label PNGs (one per image listed in
    the annotation file) through pycocotools' ``annToMask``; written atomically to
    ``out_dir`` (default ``<root>/mask/<split>``), keeping files already present and valid.
    ``workers``: processes (default: all cores; 0 or 1: this process). Returns ``out_dir``."""
    split, annotation_file, _ = find_coco_split(root, split)
    data = load_annotations(annotation_file)
    _, index_of = category_index(data, annotation_file)
    for annotation in data["annotations"]:
        if annotation.get("category_id") not in index_of:
            raise ValueError(f"{annotation_file}: annotation {annotation.get('id')} has unknown "
                             f"category id {annotation.get('category_id')}")
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(
        os.fspath(root), "mask", split)
    os.makedirs(out_dir, exist_ok=True)
    workers = (os.cpu_count() or 1) if workers is None else workers
    _MASK_JOB.update(coco=_quiet_coco_index(data), images=data["images"], index_of=index_of,
                     out_dir=out_dir)
    try:
        positions = list(range(len(data["images"])))
        if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            _write_masks(positions)
        else:
            chunks = [positions[i::workers * 8] for i in range(workers * 8)]
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                pool.map(_write_masks, chunks)
                pool.close()   # exit on their own, not by terminate()'s SIGTERM (see synthetic)
                pool.join()
    finally:
        _MASK_JOB.clear()
    return out_dir
