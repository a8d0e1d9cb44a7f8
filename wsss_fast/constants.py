"""Constants shared across layers (below every other module: imports nothing from the package)."""

import functools

import numpy as np

# torchvision's ImageNet normalization, used by every published generator reproduced here.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Image files a dataset folder is searched for (lower case; matched case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@functools.lru_cache(maxsize=1)
def _voc_palette() -> np.ndarray:
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    palette.flags.writeable = False
    return palette


def voc_palette() -> np.ndarray:
    """The standard 256-entry VOC colour map (bit-interleaved), ``(256, 3) uint8`` (a copy)."""
    return _voc_palette().copy()
