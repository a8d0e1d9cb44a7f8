"""PASCAL VOC 2012 layout: ``JPEGImages``, ``SegmentationClass[Aug]``, split lists and
``cls_labels.npy`` (also the layout the synthetic benchmark writes)."""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from wsss_fast.constants import IMAGE_EXTENSIONS
from wsss_fast.data.classes import IGNORE_INDEX, VOC_CLASSES, read_class_names
from wsss_fast.data.dataset import WsssDataset
from wsss_fast.data.images import read_label_png
from wsss_fast.data.labels import resolve_labels

GT_FOLDERS = ("SegmentationClass", "SegmentationClassAug")  # first found wins


def find_voc_root(root) -> str:
    """The VOC2012 folder: ``root`` itself or ``root/VOC2012`` (a VOCdevkit folder)."""
    root = os.fspath(root)
    for candidate in (root, os.path.join(root, "VOC2012")):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    raise ValueError(f"{root} is not a VOC2012 folder (no JPEGImages/ in it or in "
                     f"{os.path.join(root, 'VOC2012')})")


def _files_by_stem(folder: str, extensions) -> dict[str, str]:
    """``{stem: path}`` of the files in ``folder`` with one of ``extensions`` (earlier extensions
    win when two files share a stem)."""
    if not os.path.isdir(folder):
        return {}
    rank = {extension: i for i, extension in enumerate(extensions)}
    found: dict[str, tuple[int, str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, extension = os.path.splitext(entry.name)
            extension = extension.lower()
            if extension in rank and entry.is_file():
                if stem not in found or rank[extension] < found[stem][0]:
                    found[stem] = (rank[extension], entry.path)
    return {stem: path for stem, (_, path) in found.items()}


def find_split_file(root: str, split) -> str:
    """A split list: an existing file path, else ``ImageSets/Segmentation/<split>.txt``, else
    ``<root>/<split>.txt``."""
    split = os.fspath(split)
    candidates = [split, os.path.join(root, "ImageSets", "Segmentation", split + ".txt"),
                  os.path.join(root, split + ".txt")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(f"split {split!r} not found; looked for {', '.join(candidates)}")


def read_id_list(path: str, keep_folders: bool = False
                 ) -> tuple[list[str], list[tuple[str, str]]]:
    """Ids of a list file whose lines are ``id`` or, PSA/EDAM style,
    ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` (the first path names the image; only its
    file name counts unless ``keep_folders``). Returns the ids in file order without repeats,
    and a problem entry for every repeat."""
    ids, seen, problems = [], set(), []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            name = fields[0].replace("\\", "/")
            name = re.sub(r"^(\./|/)+", "", name) if keep_folders else name.rsplit("/", 1)[-1]
            stem, extension = os.path.splitext(name)
            id = stem if extension.lower() in IMAGE_EXTENSIONS else name
            if id in seen:
                problems.append((id, f"{path}:{number}: listed again; the repeat is ignored"))
                continue
            seen.add(id)
            ids.append(id)
    return ids, problems


def labels_from_label_map(label: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    """Image-level labels: the classes present in a label map (0 = background and 255 = ignore
    do not count)."""
    values = np.unique(label)
    values = values[(values != 0) & (values != IGNORE_INDEX)]
    if values.size and values.max() > num_classes:
        raise ValueError(f"{source}: label value {values.max()} exceeds the {num_classes} "
                         f"foreground classes")
    labels = np.zeros(num_classes, dtype=np.float32)
    labels[values.astype(np.int64) - 1] = 1
    return labels


class VOCDataset(WsssDataset):
    """A VOC2012 folder (or a VOCdevkit folder holding ``VOC2012``).

    - ``split``: a list name (``ImageSets/Segmentation/<split>.txt``, then ``<root>/<split>.txt``)
      or a list-file path; ``None`` = every image in ``JPEGImages``.
    - ``labels``: a labels file (``.npy`` dict with int-coded or string keys, ``.csv``,
      ``.json``); default ``<root>/cls_labels.npy``. Without one, labels come from the GT PNG
      (classes present), else ``None``.
    - GT: ``SegmentationClass/<id>.png``, else ``SegmentationClassAug/<id>.png``.
    - Class names: ``classes`` (names or a txt path), else ``<root>/classes.txt``, else the labels
      file's names, else ``VOC_CLASSES``.
    """

    name = "voc"

    def __init__(self, root, split=None, labels=None, classes=None):
        root = find_voc_root(root)
        class_file = os.path.join(root, "classes.txt")
        if classes is not None:
            class_names: Optional[tuple[str, ...]] = read_class_names(classes)
        elif os.path.isfile(class_file):
            class_names = read_class_names(class_file)
        else:
            class_names = None
        images = _files_by_stem(os.path.join(root, "JPEGImages"), IMAGE_EXTENSIONS)
        problems: list[tuple[str, str]] = []
        if split is None:
            ids = sorted(images)
        else:
            listed, problems = read_id_list(find_split_file(root, split))
            problems += [(id, "listed in the split but has no image in JPEGImages; dropped")
                         for id in listed if id not in images]
            ids = sorted(id for id in listed if id in images)

        gt_paths: dict[str, str] = {}
        for folder in reversed(GT_FOLDERS):
            gt_paths.update(_files_by_stem(os.path.join(root, folder), (".png",)))
        gt_paths = {id: gt_paths[id] for id in ids if id in gt_paths}

        default_labels = os.path.join(root, "cls_labels.npy")
        if labels is None and os.path.isfile(default_labels):
            labels = default_labels
        self._labels_from_gt = labels is None
        if labels is None:
            class_names = class_names or VOC_CLASSES
            labels_by_id: dict[str, np.ndarray] = {}
        else:
            class_names, labels_by_id, label_problems = resolve_labels(
                labels, class_names, ids, images, "JPEGImages")
            problems += label_problems
        super().__init__(root, class_names, {id: images[id] for id in ids}, labels_by_id,
                         gt_paths, problems)

    def _labels_of(self, id: str) -> Optional[np.ndarray]:
        if not self._labels_from_gt:
            return super()._labels_of(id)
        if id not in self._labels and id in self._gt_paths:  # derived once, on first use
            path = self._gt_paths[id]
            labels = labels_from_label_map(read_label_png(path), self.num_classes, path)
            labels.flags.writeable = False
            self._labels[id] = labels
        return self._labels.get(id)
