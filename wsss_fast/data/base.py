"""The dataset interface shared by VOC, COCO and folder datasets, image-level label files, and a
DataLoader that decodes images in worker processes.

Class indices are 0-based over the foreground classes; a sample's ``labels`` is a float32
multi-hot vector over them (nonzero entries in a labels file count as present).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np
import torch.utils.data

from wsss_fast.data.classes import VOC_CLASSES, read_class_names
from wsss_fast.data.images import read_image
from wsss_fast.io.interrupts import die_with_parent

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_HEADER_ID_NAMES = ("id", "image", "image_id", "name", "filename", "file")
_HEADER_LABEL_NAMES = ("labels", "label", "classes", "class")


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make field-wise == ambiguous
class Sample:
    """One image of a dataset."""

    id: str
    image_path: str
    labels: Optional[np.ndarray]  # float32 (K,) multi-hot over foreground classes; None: unknown
    gt_path: Optional[str]  # ground-truth label PNG, or None


class WsssDataset:
    """Sorted unique ids → image path, image-level labels and ground-truth PNG.

    ``problems()`` lists what indexing found wrong (an id without an image, an id missing from the
    labels file, a labels entry without an image, ...): such items are dropped or get
    ``labels=None``, and are reported rather than silently lost.
    """

    name = "dataset"

    def __init__(self, root, class_names: Sequence[str], image_paths: dict[str, str],
                 labels: dict[str, np.ndarray], gt_paths: dict[str, str],
                 problems: Iterable[tuple[str, str]]):
        self.root = os.fspath(root)
        self.class_names = tuple(class_names)
        self.ids = sorted(image_paths)
        self._image_paths = dict(image_paths)
        self._labels = {key: _frozen(value) for key, value in labels.items()}
        self._gt_paths = dict(gt_paths)
        self._problems = list(problems)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, images={len(self)}, "
                f"classes={self.num_classes}, problems={len(self._problems)})")

    def sample(self, id: str) -> Sample:
        if id not in self._image_paths:
            raise KeyError(f"{self.name} dataset at {self.root}: no image with id {id!r}")
        return Sample(id, self._image_paths[id], self._labels_of(id), self._gt_paths.get(id))

    def _labels_of(self, id: str) -> Optional[np.ndarray]:
        return self._labels.get(id)

    def problems(self) -> list[tuple[str, str]]:
        return list(self._problems)


def _frozen(labels: np.ndarray) -> np.ndarray:
    labels = np.array(labels, dtype=np.float32)
    labels.flags.writeable = False
    return labels


# ----------------------------------------------------------------------------- labels files

def read_labels_file(path, class_names: Optional[Sequence[str]] = None
                     ) -> tuple[tuple[str, ...], dict]:
    """Read image-level labels: ``.npy`` (pickled dict ``{key: multi-hot}``, keys int-coded
    ``YYYYNNNNNN`` or strings), ``.csv`` or ``.json`` (formats in ``FolderDataset``).

    Returns the class names (``class_names`` if given, else the file's header or names, else
    ``VOC_CLASSES``) and ``{key as written: float32 (K,) multi-hot}``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"labels file {path} does not exist")
    names = None if class_names is None else tuple(class_names)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return _read_npy_labels(path, names)
    if suffix == ".csv":
        return _read_csv_labels(path, names)
    if suffix == ".json":
        return _read_json_labels(path, names)
    raise ValueError(f"labels file {path}: unsupported format {suffix!r} "
                     f"(expected .npy, .csv or .json)")


def _multi_hot(values, num_classes: int, where: str) -> np.ndarray:
    try:
        vector = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: labels must be numbers, got {values!r}") from None
    if vector.shape[0] != num_classes:
        raise ValueError(f"{where}: expected {num_classes} class entries, got {vector.shape[0]}")
    if not np.isfinite(vector).all():
        raise ValueError(f"{where}: non-finite label values {vector.tolist()}")
    return (vector > 0).astype(np.float32)


def _read_npy_labels(path, names):
    try:
        loaded = np.load(path, allow_pickle=True)
        entries = loaded.item() if loaded.dtype == object and loaded.ndim == 0 else None
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"labels file {path}: cannot be loaded ({exc})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"labels file {path}: must hold a pickled dict {{image id: multi-hot}} "
                         f"(like IRN's cls_labels.npy), got an array of shape {loaded.shape}")
    if names is None:
        lengths = {np.asarray(value).size for value in entries.values()}
        if lengths and lengths != {len(VOC_CLASSES)}:
            raise ValueError(f"labels file {path}: entries have {sorted(lengths)} classes, not the "
                             f"{len(VOC_CLASSES)} VOC classes; give the class names")
        names = VOC_CLASSES
    return names, {key: _multi_hot(value, len(names), f"labels file {path}, entry {key!r}")
                   for key, value in entries.items()}


def _split_tokens(text: str) -> list[str]:
    """Split a labels cell on ``;`` when it has one (names like "stop sign" keep their spaces),
    else on whitespace."""
    parts = text.split(";") if ";" in text else text.split()
    return [part.strip() for part in parts if part.strip()]


def _tokens_to_multi_hot(tokens, names, where) -> np.ndarray:
    """Multi-hot vector from class names and/or 0-based class indices (ints or digit strings)."""
    vector = np.zeros(len(names), dtype=np.float32)
    index_of = {name: i for i, name in enumerate(names)}
    for token in tokens:
        if isinstance(token, str) and token in index_of:
            vector[index_of[token]] = 1
            continue
        if isinstance(token, str) and re.fullmatch(r"\d+", token):
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"{where}: unknown class name {token!r} "
                             f"(known: {', '.join(names)})")
        if not 0 <= token < len(names):
            raise ValueError(f"{where}: class index {token} out of range for "
                             f"{len(names)} classes")
        vector[token] = 1
    return vector


def _names_from_tokens(token_lists: dict) -> tuple[str, ...]:
    """Class names implied by the names a labels file uses (``{where: tokens}``): the VOC classes
    when every name is one (VOC files keep VOC indices), the names sorted when none is; a mix is
    refused as a likely typo."""
    voc = set(VOC_CLASSES)
    used = {token: where for where, tokens in token_lists.items() for token in tokens
            if isinstance(token, str) and not re.fullmatch(r"\d+", token)}
    if set(used) <= voc:
        return VOC_CLASSES
    if voc.isdisjoint(used):
        return tuple(sorted(used))
    token, where = next((t, w) for t, w in used.items() if t not in voc)
    raise ValueError(f"{where}: unknown class name {token!r}: the file mixes VOC class names "
                     f"with others; give the class names to use your own classes")


def _read_csv_labels(path, names):
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheet exports
        rows = [(line, [cell.strip() for cell in row])
                for line, row in _numbered_rows(csv.reader(handle))]
    if not rows:
        return (names or VOC_CLASSES), {}
    _, first = rows[0]
    if first[0].lower() in _HEADER_ID_NAMES and len(first) >= 2:
        rows = rows[1:]
        if not (len(first) == 2 and first[1].lower() in _HEADER_LABEL_NAMES):
            return _read_wide_csv(path, first[1:], rows, names)
    entries, token_lists = {}, {}
    for line, row in rows:
        if len(row) > 2:
            raise ValueError(f"{path}:{line}: expected `id,labels` with the labels separated by "
                             f"spaces or ';' (for 0/1 columns add a header `id,<class1>,...`), "
                             f"got {len(row)} columns")
        if row[0] in token_lists:
            raise ValueError(f"{path}:{line}: id {row[0]!r} listed twice")
        token_lists[row[0]] = (line, _split_tokens(row[1]) if len(row) == 2 else [])
    names = names or _names_from_tokens(
        {f"{path}:{line}": tokens for line, tokens in token_lists.values()})
    for key, (line, tokens) in token_lists.items():
        entries[key] = _tokens_to_multi_hot(tokens, names, f"{path}:{line}")
    return names, entries


def _numbered_rows(reader):
    for row in reader:
        if row and row[0].strip() and not row[0].lstrip().startswith("#"):
            yield reader.line_num, row


def _read_wide_csv(path, header_names, rows, names):
    header_names = read_class_names(header_names)
    if names is None:
        names = header_names
    elif set(names) != set(header_names) or len(names) != len(header_names):
        raise ValueError(f"{path}: header classes {list(header_names)} do not match the class "
                         f"names {list(names)}")
    order = [header_names.index(name) for name in names]  # file column of each class
    entries = {}
    for line, row in rows:
        if len(row) != len(header_names) + 1:
            raise ValueError(f"{path}:{line}: expected {len(header_names) + 1} columns "
                             f"(id + one 0/1 column per class), got {len(row)}")
        if row[0] in entries:
            raise ValueError(f"{path}:{line}: id {row[0]!r} listed twice")
        values = _multi_hot(row[1:], len(header_names), f"{path}:{line}")
        entries[row[0]] = values[order]
    return names, entries


def _read_json_labels(path, names):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"labels file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"labels file {path}: expected an object {{id: [labels]}}, "
                         f"got {type(data).__name__}")
    token_lists = {}
    for key, value in data.items():
        if isinstance(value, str):
            value = _split_tokens(value)
        if not (isinstance(value, list)
                and all(isinstance(v, (str, int, float)) for v in value)):
            raise ValueError(f"labels file {path}, entry {key!r}: expected a list of class "
                             f"names or indices, or a 0/1 list, got {value!r}")
        token_lists[key] = value
    numeric = all(not isinstance(v, str) for value in token_lists.values() for v in value)
    if names is None:
        names = VOC_CLASSES if numeric else _names_from_tokens(
            {f"labels file {path}, entry {key!r}": value for key, value in token_lists.items()})
    multi_hot = bool(token_lists) and numeric and all(
        len(value) == len(names) and all(_is_binary(v) for v in value)
        for value in token_lists.values())
    entries = {}
    for key, value in token_lists.items():
        where = f"labels file {path}, entry {key!r}"
        if multi_hot:
            entries[key] = _multi_hot(value, len(names), where)
        else:
            if any(isinstance(v, (bool, float)) for v in value):
                raise ValueError(f"{where}: class indices must be integers, got {value!r}")
            entries[key] = _tokens_to_multi_hot(value, names, where)
    return names, entries


def _is_binary(value) -> bool:
    return isinstance(value, (bool, int, float)) and value in (0, 1)


def _key_candidates(key) -> list[str]:
    """Ids a labels-file key may stand for: as written, without an image extension, and IRN's
    int coding ``YYYYNNNNNN`` → ``YYYY_NNNNNN``."""
    text = str(key)
    candidates = [text]
    stem, extension = os.path.splitext(text)
    if extension.lower() in IMAGE_EXTENSIONS:
        candidates.append(stem)
    if re.fullmatch(r"\d{10}", text):
        candidates.append(text[:4] + "_" + text[4:])
    return candidates


def match_label_keys(entries: dict, ids: Iterable[str], source: str
                     ) -> tuple[dict[str, np.ndarray], list]:
    """Map labels-file keys onto dataset ids; returns ``({id: labels}, keys matching no id)``."""
    known = set(ids)
    matched, unmatched, key_of = {}, [], {}
    for key, labels in entries.items():
        id = next((c for c in _key_candidates(key) if c in known), None)
        if id is None:
            unmatched.append(key)
            continue
        if id in matched:
            raise ValueError(f"labels file {source}: keys {key_of[id]!r} and {key!r} both name "
                             f"image {id!r}")
        matched[id], key_of[id] = labels, key
    return matched, unmatched


def resolve_labels(labels_path, class_names, ids, all_ids, source_name
                   ) -> tuple[tuple[str, ...], dict[str, np.ndarray], list]:
    """Read a labels file and match it onto ``ids``. Reports ids without an entry and entries
    whose key names none of ``all_ids`` (the images that exist, whatever the split)."""
    names, entries = read_labels_file(labels_path, class_names)
    matched, unmatched = match_label_keys(entries, all_ids, os.fspath(labels_path))
    problems = [(str(key), f"entry in labels file {labels_path} has no image in {source_name}")
                for key in unmatched]
    problems += [(id, f"no entry in labels file {labels_path}; labels unknown")
                 for id in ids if id not in matched]
    return names, {id: matched[id] for id in ids if id in matched}, problems


# ----------------------------------------------------------------------------- opening

def open_dataset(kind: str, root, *, split=None, labels=None, classes=None) -> WsssDataset:
    """Open a dataset: ``kind`` is ``voc``, ``coco``, ``folder`` or ``auto`` (VOC layout if
    ``root/JPEGImages`` or ``root/VOC2012/JPEGImages`` exists, COCO if ``root/annotations``
    exists, else a folder of images)."""
    from wsss_fast.data.coco import COCODataset
    from wsss_fast.data.folder import FolderDataset
    from wsss_fast.data.voc import VOCDataset

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"dataset root {root} is not a directory")
    kinds = {"voc": VOCDataset, "coco": COCODataset, "folder": FolderDataset}
    kind = kind.lower()
    if kind == "auto":
        if (os.path.isdir(os.path.join(root, "JPEGImages"))
                or os.path.isdir(os.path.join(root, "VOC2012", "JPEGImages"))):
            kind = "voc"
        elif os.path.isdir(os.path.join(root, "annotations")):
            kind = "coco"
        else:
            kind = "folder"
    if kind not in kinds:
        raise ValueError(f"unknown dataset kind {kind!r} (expected voc, coco, folder or auto)")
    return kinds[kind](root, split=split, labels=labels, classes=classes)


# ----------------------------------------------------------------------------- loading

class DecodedImages(torch.utils.data.Dataset):
    """Decoded images of ``ids`` in order; a decoding failure becomes an item with ``error`` set
    (and ``image=None``) instead of an exception, so one bad file never stops a run."""

    def __init__(self, dataset: WsssDataset, ids: Sequence[str]):
        known = set(dataset.ids)
        unknown = [id for id in ids if id not in known]
        if unknown:
            raise ValueError(f"{len(unknown)} ids are not in the {dataset.name} dataset at "
                             f"{dataset.root}, e.g. {unknown[:3]}")
        self.dataset = dataset
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i) -> dict:
        id = self.ids[i]
        item = {"id": id, "image": None, "labels": None, "error": None}
        try:
            sample = self.dataset.sample(id)
            item["labels"] = sample.labels
            item["image"] = read_image(sample.image_path)
        except Exception as exc:  # reported per item: a worker must never die on one image
            item["error"] = str(exc) if isinstance(exc, ValueError) else (
                f"{type(exc).__name__}: {exc}")
        return item


def _single_threaded_worker(_worker_id: int) -> None:
    die_with_parent()  # killed with the run, even by SIGKILL, instead of decoding on as an orphan
    cv2.setNumThreads(0)  # one decoding thread per worker; parallelism comes from the workers


def _keep_item(item):
    return item


def image_loader(dataset: WsssDataset, ids: Sequence[str], workers: int = 2,
                 prefetch: int = 2) -> Iterable[dict]:
    """Iterate ``{"id", "image", "labels", "error"}`` for ``ids`` in order, decoding in
    ``workers`` processes (0: in this process); images stay numpy arrays."""
    if workers < 0 or prefetch < 1:
        raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers}, {prefetch}")
    return torch.utils.data.DataLoader(
        DecodedImages(dataset, ids), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_keep_item, worker_init_fn=_single_threaded_worker if workers else None,
        prefetch_factor=prefetch if workers else None, in_order=True)
