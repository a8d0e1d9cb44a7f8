"""AffinityNet features for PSA's random walk (psa ``infer_aff.py``; reference
affinity_networks.md §2.4): the full image at one scale, no flip, ImageNet-normalized, zero-padded
(after normalization: the mean colour) to a multiple of 8, through the network → the embedding
``g (C, ⌈H/8⌉, ⌈W/8⌉)``. ``random_walk.refine_psa`` then forms PSA's affinities
``exp(−mean_c |g_i − g_j|)^β`` over the radius-5 pairs and walks (β 8, 256 steps, background
``(1 − max)^16``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_fast.models.affinitynet import OUTPUT_STRIDE, check_affinitynet_state
from wsss_fast.models.checkpoint import read_state_dict
from wsss_fast.models.registry import create_model


def load_affinitynet(path, device="cpu"):
    """The AffinityNet of a checkpoint (its size read from the weights), in eval mode on
    ``device``. Another model's checkpoint (IRN's, a classifier's) is a ``CheckpointError``
    naming what it looks like."""
    state = read_state_dict(path)
    check_affinitynet_state(state, f"--affinity-checkpoint {path}")
    return create_model("affinitynet", checkpoint=state).to(device).eval()


def normalized_image(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` RGB → float32 ``(3, H, W)``, ImageNet mean / std."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    x = (image.astype(np.float32) / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) \
        / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@torch.no_grad()
def affinity_features(net, images: Sequence[np.ndarray], device="cpu") -> list[np.ndarray]:
    """AffinityNet embeddings of uint8 RGB images (any sizes): one float32 ``(C, ⌈H/8⌉,
    ⌈W/8⌉)`` array each. Images of one size go through the network as one batch."""
    results: list = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[:2]), []).append(index)
    for (height, width), indices in by_size.items():
        batch = torch.stack([normalized_image(images[i]) for i in indices]).to(device)
        batch = F.pad(batch, (0, -width % OUTPUT_STRIDE, 0, -height % OUTPUT_STRIDE))
        features = net(batch).float().cpu().numpy()
        for i, index in enumerate(indices):
            results[index] = features[i]
    return results
