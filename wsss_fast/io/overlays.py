"""Visualizations: JET heat-map overlays of CAMs and palette overlays of label maps."""

from __future__ import annotations

import cv2
import numpy as np

from wsss_fast.constants import voc_palette
from wsss_fast.io.atomic import atomic_write_bytes


def jet_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 − alpha)·image + alpha·JET(cam)`` as uint8 RGB; ``cam`` is an ``H×W`` map, clipped to
    [0, 1] (the field's convention: pytorch-grad-cam, MCTformer)."""
    if image.shape[:2] != cam.shape:
        raise ValueError(f"image {image.shape[:2]} and CAM {cam.shape} differ in size")
    heat = np.uint8(np.round(np.clip(np.nan_to_num(cam), 0.0, 1.0) * 255))
    jet = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * jet.astype(np.float32)
    return np.uint8(np.clip(np.round(blended), 0, 255))


def label_overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with the VOC palette colours of ``label`` (background left as is)."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    colours = voc_palette()[label].astype(np.float32)
    blended = image.astype(np.float32)
    mask = label > 0
    blended[mask] = (1.0 - alpha) * blended[mask] + alpha * colours[mask]
    return np.uint8(np.clip(np.round(blended), 0, 255))


def save_rgb_png(path, image: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    atomic_write_bytes(path, encoded.tobytes())
