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


_FONT = cv2.FONT_HERSHEY_SIMPLEX
_LINE = 14                       # text line height, pixels, at _SCALE
_SCALE = 0.4
_PANEL = 40                      # grey of the header, the row titles and the padding


def outline(image: np.ndarray, mask: np.ndarray, colour=(255, 255, 255)) -> np.ndarray:
    """``image`` with the 1-pixel outline of the boolean ``mask`` drawn in ``colour``."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
    return out


def text_tile(lines, height: int, width: int) -> np.ndarray:
    """A ``height × width`` grey tile with white text lines, each shrunk to fit the width."""
    tile = np.full((height, width, 3), _PANEL, np.uint8)
    for i, line in enumerate(lines):
        scale = _SCALE
        while scale > 0.2 and cv2.getTextSize(line, _FONT, scale, 1)[0][0] > width - 6:
            scale -= 0.02
        cv2.putText(tile, line, (3, _LINE * (i + 1) - 2), _FONT, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return tile


def labelled_grid(cells, column_titles, row_titles, gap: int = 2) -> np.ndarray:
    """``cells[r][c]`` (RGB uint8 tiles of any size) as one image: a header row of
    ``column_titles`` (each a list of text lines), a first column of ``row_titles`` (lists of
    lines), every tile centred in a cell of the largest tile's size."""
    if len(cells) != len(row_titles) or any(len(row) != len(column_titles) for row in cells):
        raise ValueError(f"labelled_grid: {len(cells)} rows of {[len(r) for r in cells]} cells "
                         f"for {len(row_titles)} row and {len(column_titles)} column titles")
    height = max(t.shape[0] for row in cells for t in row)
    width = max(t.shape[1] for row in cells for t in row)
    title_width = max(cv2.getTextSize(line, _FONT, _SCALE, 1)[0][0]
                      for lines in row_titles for line in lines) + 8
    header = _LINE * max(len(lines) for lines in column_titles) + 4

    def cell(tile):
        top, left = (height - tile.shape[0]) // 2, (width - tile.shape[1]) // 2
        return np.pad(tile, ((top, height - tile.shape[0] - top),
                             (left, width - tile.shape[1] - left), (0, 0)),
                      constant_values=_PANEL)

    def join(tiles, axis):
        pad = [(0, 0)] * 3
        pad[axis] = (0, gap)
        return np.concatenate([np.pad(t, pad, constant_values=255) for t in tiles], axis=axis)

    lines = [join([text_tile([], header, title_width)] +
                  [text_tile(title, header, width) for title in column_titles], axis=1)]
    for title, row in zip(row_titles, cells):
        lines.append(join([text_tile(title, height, title_width)] + [cell(t) for t in row],
                          axis=1))
    return join(lines, axis=0)
