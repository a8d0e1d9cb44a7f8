"""Image-level label files (``.npy``, ``.csv``, ``.json``) and matching their keys onto ids.

Class indices are 0-based over the foreground classes; labels are float32 multi-hot vectors over
them. Rules, each an error naming the file and the id rather than a silent coercion:

- a 0/1 entry (npy vector, wide-CSV column, JSON 0/1 list) holds only 0 or 1 (not 2, -1, 0.5,
  nan);
- a class name must be one of the class names given (``classes``, a VOC root's ``classes.txt``,
  a wide CSV's header); without them only the VOC classes are known, so a typo never becomes
  a class of its own (the error lists the unknown names and the known ones).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
from typing import Iterable, Optional, Sequence

import numpy as np

from wsss_fast.constants import IMAGE_EXTENSIONS
from wsss_fast.data.classes import VOC_CLASSES, read_class_names

_HEADER_ID_NAMES = ("id", "image", "image_id", "name", "filename", "file")
_HEADER_LABEL_NAMES = ("labels", "label", "classes", "class")


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
    """A 0/1 vector of ``num_classes`` entries; any other value (2, -1, 0.5, nan) is an error
    naming ``where`` (the file and the id) and the value, never coerced."""
    try:
        vector = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: labels must be numbers, got {values!r}") from None
    if vector.shape[0] != num_classes:
        raise ValueError(f"{where}: expected {num_classes} class entries, got {vector.shape[0]}")
    bad = np.flatnonzero((vector != 0) & (vector != 1))   # nan compares unequal to both
    if bad.size:
        more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
        raise ValueError(f"{where}: label value {vector[bad[0]]:g} at class index {bad[0]} is "
                         f"not 0 or 1{more}; image-level labels are 0/1 per class")
    return vector.astype(np.float32)


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


_INDEX = re.compile(r"\d+")
# Tokens that are numbers but not class indices (-1, 0.5, nan): refused as label values, not
# taken for class names.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf(inity)?)",
                     re.IGNORECASE)


def _tokens_to_multi_hot(tokens, names, where) -> np.ndarray:
    """Multi-hot vector from class names and/or 0-based class indices (ints or digit strings)."""
    vector = np.zeros(len(names), dtype=np.float32)
    index_of = {name: i for i, name in enumerate(names)}
    for token in tokens:
        if isinstance(token, str) and token in index_of:
            vector[index_of[token]] = 1
            continue
        if isinstance(token, str) and _INDEX.fullmatch(token):
            token = int(token)
        elif isinstance(token, str) and _NUMBER.fullmatch(token):
            raise ValueError(f"{where}: label value {token!r} is not a class index "
                             f"(0..{len(names) - 1}) nor a class name")
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"{where}: unknown class name {token!r} "
                             f"(known: {', '.join(names)})")
        if not 0 <= token < len(names):
            raise ValueError(f"{where}: class index {token} out of range for "
                             f"{len(names)} classes")
        vector[token] = 1
    return vector


def _check_class_names(token_lists: dict, names, given: bool) -> None:
    """Refuse class names (``{where: tokens}``) that are not among ``names``, listing every
    unknown name and the known ones: a typo never becomes a class of its own. Without given
    names only the VOC classes are known; other classes need a class-name list."""
    known = set(names)
    unknown: dict[str, str] = {}
    for where, tokens in token_lists.items():
        for token in tokens:
            if isinstance(token, str) and token not in known and not _NUMBER.fullmatch(token):
                unknown.setdefault(token, where)
    if not unknown:
        return
    (first, where), *others = unknown.items()
    more = (f" and {len(others)} more ({', '.join(repr(name) for name, _ in others)})"
            if others else "")
    hint = "" if given else ("; these are the VOC classes: give the class names (--classes "
                             "FILE) to use others")
    raise ValueError(f"{where}: unknown class name {first!r}{more} (known: {', '.join(names)}"
                     f"{hint})")


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
    given = names is not None
    names = names or VOC_CLASSES
    _check_class_names({f"{path}:{line}": tokens for line, tokens in token_lists.values()},
                       names, given)
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
        values = _multi_hot(row[1:], len(header_names), f"{path}:{line} (id {row[0]!r})")
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
    given = names is not None
    names = names or VOC_CLASSES
    _check_class_names({f"labels file {path}, entry {key!r}": value
                        for key, value in token_lists.items()}, names, given)
    # 0/1 lists when every entry is a list of K numbers (then a value other than 0/1 is an
    # error, not an index); otherwise lists of class names or indices.
    multi_hot = bool(token_lists) and numeric and all(
        len(value) == len(names) for value in token_lists.values())
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
    # Reported under the id the key stands for (IRN's int key 2007000001 is 2007_000001), so
    # that an image listed in the split but missing (or a directory) is one skip, not two.
    problems = [(_key_candidates(key)[-1],
                 f"entry {key!r} in labels file {labels_path} has no image in {source_name}")
                for key in unmatched]
    problems += [(id, f"no entry in labels file {labels_path}; labels unknown")
                 for id in ids if id not in matched]
    return names, {id: matched[id] for id in ids if id in matched}, problems
