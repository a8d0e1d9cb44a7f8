"""``open_dataset``: a VOC, COCO or folder dataset by kind, or by the layout found at its root."""

from __future__ import annotations

import os

from wsss_fast.data.coco import COCODataset
from wsss_fast.data.dataset import WsssDataset
from wsss_fast.data.folder import FolderDataset
from wsss_fast.data.voc import VOCDataset


def open_dataset(kind: str, root, *, split=None, labels=None, classes=None) -> WsssDataset:
    """Open a dataset: ``kind`` is ``voc``, ``coco``, ``folder`` or ``auto`` (VOC layout if
    ``root/JPEGImages`` or ``root/VOC2012/JPEGImages`` exists, COCO if ``root/annotations``
    exists, else a folder of images)."""
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
