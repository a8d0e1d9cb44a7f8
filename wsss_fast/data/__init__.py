"""Datasets (VOC, COCO, folder, synthetic), image decoding and class names."""
