"""The dataset interface shared by VOC, COCO and folder datasets: ``Sample`` and ``WsssDataset``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np


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
    labels file, a labels entry without an image, ...), once per id: such items are dropped or
    get ``labels=None``, and are reported rather than silently lost.
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
        self._problems = list(_first_per_id(problems))

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


class EmptyDataset(ValueError):
    """A dataset without a usable image: nothing to do. A stage reports it with exit status 1,
    like a run whose every item was skipped (2 stays for bad commands)."""

    exit_status = 1


def require_images(dataset: WsssDataset, what: str = "images") -> None:
    """Raise ``EmptyDataset`` saying why ``dataset`` has no ids: nothing found, or everything
    found was dropped at indexing (the first few problems quoted)."""
    if dataset.ids:
        return
    problems = dataset.problems()
    why = "none found"
    if problems:
        first = "; ".join(f"{id}: {reason}" for id, reason in problems[:3])
        why = f"all {len(problems)} found were dropped at indexing ({first})"
    raise EmptyDataset(f"nothing to do: the {dataset.name} dataset at {dataset.root} has no "
                       f"{what} ({why})")


def is_whole_number(value) -> bool:
    """An integer (numpy's too), not a bool or a fraction: counts and sizes given to the data
    and training APIs are refused, never rounded, when fractional."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _first_per_id(problems: Iterable[tuple[str, str]]) -> Iterable[tuple[str, str]]:
    """One problem per id (the first found): an image missing from the split's folder and its
    orphaned labels entry are one skipped item."""
    seen = set()
    for id, reason in problems:
        if id not in seen:
            seen.add(id)
            yield id, reason


def _frozen(labels: np.ndarray) -> np.ndarray:
    labels = np.array(labels, dtype=np.float32)
    labels.flags.writeable = False
    return labels
