"""Class names of the supported datasets and the VOC colour palette.

Class indices are 0-based over the foreground classes (CAM channels, ``cls_labels.npy``
entries); label PNGs use ``index + 1`` with 0 = background and 255 = ignore.
"""

from __future__ import annotations

import os

from wsss_fast.constants import voc_palette  # noqa: F401  (re-exported)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

# COCO 2014 categories in ascending category-id order: contiguous index i <-> COCO_CATEGORY_IDS[i].
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91)
                          if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

IGNORE_INDEX = 255


def with_background(class_names) -> tuple[str, ...]:
    """Names of label-PNG values 0..K: background first."""
    return ("background",) + tuple(class_names)


def read_class_names(classes) -> tuple[str, ...]:
    """Foreground class names from a sequence of names or a text file (one name a line; blank
    lines and ``#`` comments skipped). Names must be non-empty and unique."""
    source = "classes"
    if isinstance(classes, (str, os.PathLike)):
        source = os.fspath(classes)
        try:
            with open(source, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as exc:
            raise ValueError(f"{source}: cannot read the class-name file ({exc})") from None
        names = [line.strip() for line in lines
                 if line.strip() and not line.lstrip().startswith("#")]
    else:
        names = [str(name).strip() for name in classes]
    if not names:
        raise ValueError(f"{source}: no class names given")
    if any(not name for name in names):
        raise ValueError(f"{source}: empty class name in {names}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{source}: duplicate class names {duplicates}")
    return tuple(names)
