"""Datasets (VOC, COCO, folder, synthetic), image decoding and class names."""

from wsss_fast.data.classes import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
    read_class_names,
    voc_palette,
    with_background,
)
from wsss_fast.data.coco import COCODataset, build_coco_label_masks
from wsss_fast.data.dataset import EmptyDataset, Sample, WsssDataset, require_images
from wsss_fast.data.factory import open_dataset
from wsss_fast.data.folder import FolderDataset
from wsss_fast.data.images import (
    ImageDecodeError,
    read_image,
    read_label_png,
    write_label_png,
)
from wsss_fast.data.labels import read_labels_file
from wsss_fast.data.loader import DecodedImages, image_loader
from wsss_fast.data.synthetic import generate_synthetic, render_sample
from wsss_fast.data.voc import VOCDataset

__all__ = [
    "COCODataset", "COCO_CATEGORY_IDS", "COCO_CLASSES", "DecodedImages", "EmptyDataset",
    "FolderDataset",
    "IGNORE_INDEX", "ImageDecodeError", "Sample", "VOCDataset", "VOC_CLASSES", "WsssDataset",
    "build_coco_label_masks", "generate_synthetic", "image_loader", "open_dataset",
    "read_class_names", "read_image", "read_label_png", "read_labels_file", "render_sample",
    "require_images", "voc_palette", "with_background", "write_label_png",
]
