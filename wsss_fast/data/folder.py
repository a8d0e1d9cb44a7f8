"""Any folder of images, with an optional image-level labels file."""

from __future__ import annotations

import os

from wsss_fast.constants import IMAGE_EXTENSIONS
from wsss_fast.data.classes import VOC_CLASSES, read_class_names
from wsss_fast.data.dataset import WsssDataset
from wsss_fast.data.labels import resolve_labels
from wsss_fast.data.voc import read_id_list


def index_images(root: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``{id: path}`` of the images under ``root`` (recursive; hidden folders skipped), where the id
    is the relative path without extension with ``/`` separators. When two files share an id
    (``a.jpg``, ``a.png``), the first in sorted order is kept and the other reported."""
    images: dict[str, str] = {}
    problems = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            stem, extension = os.path.splitext(name)
            if extension.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            path = os.path.join(folder, name)
            id = os.path.relpath(os.path.join(folder, stem), root).replace(os.sep, "/")
            if id in images:
                problems.append((path, f"same id {id!r} as {images[id]}; ignored"))
            else:
                images[id] = path
    return images, problems


class FolderDataset(WsssDataset):
    """Images under ``root`` (jpg, jpeg, png, bmp, webp; any case; recursive), ids sorted.

    ``labels`` (optional):
    - ``.csv`` rows ``id,labels`` — class names or 0-based indices separated by ``;`` (or by
      spaces when the cell has no ``;``), optional header ``id,labels``; or a header
      ``id,<class1>,<class2>,...`` with one 0/1 column per class;
    - ``.json`` ``{id: [names or indices]}`` or ``{id: [0/1 per class]}`` (0/1 lists when every
      entry of the file is a list of K numbers);
    - ``.npy`` dict like ``cls_labels.npy``. Keys may carry the image extension.
    0/1 values other than 0 and 1 are an error. Class names: ``classes`` (names or a txt path),
    else a wide CSV's header, else ``VOC_CLASSES``; a name outside them is an error listing the
    unknown and the known names. Images without an entry get ``labels=None``; both they
    and entries without an image are listed in ``problems()``. ``split`` (optional): a list
    file restricting the ids.
    """

    name = "folder"

    def __init__(self, root, split=None, labels=None, classes=None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"image folder {root} is not a directory")
        images, problems = index_images(root)
        ids = sorted(images)
        if split is not None:
            split = os.fspath(split)
            if not os.path.isfile(split):
                raise ValueError(f"split list {split} does not exist (a folder dataset takes a "
                                 f"list file of ids)")
            listed, problems_in_list = read_id_list(split, keep_folders=True)
            problems += problems_in_list
            problems += [(id, f"listed in {split} but no such image under {root}; dropped")
                         for id in listed if id not in images]
            ids = sorted(id for id in listed if id in images)
        class_names = None if classes is None else read_class_names(classes)
        labels_by_id = {}
        if labels is not None:
            class_names, labels_by_id, label_problems = resolve_labels(
                labels, class_names, ids, images, root)
            problems += label_problems
        super().__init__(root, class_names or VOC_CLASSES, {id: images[id] for id in ids},
                         labels_by_id, {}, problems)
