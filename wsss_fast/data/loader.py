"""A DataLoader that decodes a dataset's images in worker processes, in order."""

from __future__ import annotations

from typing import Iterable, Sequence

import cv2
import torch.utils.data

from wsss_fast.data.dataset import WsssDataset, is_whole_number
from wsss_fast.data.images import read_image
from wsss_fast.io.interrupts import die_with_parent


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
    if not (is_whole_number(workers) and is_whole_number(prefetch)) or workers < 0 \
            or prefetch < 1:
        raise ValueError(f"workers must be an integer >= 0 and prefetch an integer >= 1, got "
                         f"{workers!r}, {prefetch!r}")
    return torch.utils.data.DataLoader(
        DecodedImages(dataset, ids), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_keep_item, worker_init_fn=_single_threaded_worker if workers else None,
        prefetch_factor=prefetch if workers else None, in_order=True)
