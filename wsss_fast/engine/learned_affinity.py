"""Learned affinity networks at inference: what ``refine`` walks over when a trained network is
given (reference affinity_networks.md §1.7, §2.4).

A network is registered by name in ``AFFINITY_NETWORKS`` with the refine preset whose walk it
feeds and the option that names its checkpoint; loading it gives a callable
``side_input(image uint8 (H, W, 3)) -> np.ndarray``:

* ``irn`` (``--preset irn --irn-checkpoint``): IRNet's class-boundary map ``(⌈H/4⌉, ⌈W/4⌉)`` in
  [0, 1]: IRN's single-scale inference (``EdgeDisplacement``): the normalised image and its
  flip, zero-padded right/bottom to ``pad_size`` (512; larger images to the next multiple of
  16), boundary logits flip-averaged, sigmoid, cropped.
* ``psa`` (``--preset psa --affinity-checkpoint``): PSA's AffinityNet embedding
  ``(C, ⌈H/8⌉, ⌈W/8⌉)`` (``postprocess.psa_affinity``: one scale, no flip, zero-padded to a
  multiple of 8; ``pad_size`` does not apply). It also has ``batch(images) -> [array]``: images
  of one size go through the network together, and refine reads them in chunks.

A checkpoint of another kind is refused with one line naming what it looks like
(``checkpoint_kind``), e.g. an AffinityNet checkpoint given as an IRN one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_fast.engine.cam_engine import to_normalized_tensor
from wsss_fast.models.checkpoint import CheckpointError, read_state_dict
from wsss_fast.models.registry import create_model
from wsss_fast.registry import Registry

IRN_PAD_SIZE = 512   # irn:step/make_sem_seg_labels.py pads every image to 512 × 512

# Key prefixes that tell checkpoint kinds apart (first match wins).
_KINDS = (
    ("irn", "an IRN (IRNet boundary + displacement) checkpoint", ("fc_edge", "fc_dp")),
    ("psa", "an AffinityNet (PSA ResNet-38 affinity) checkpoint", ("f8_3.", "f9.")),
    ("resnet38", "a ResNet-38 classifier checkpoint (EDAM / PSA CAM network)", ("b2.", "conv1a.")),
    ("resnet_cam", "a ResNet CAM classifier checkpoint (irn_cam / LPCAM)", ("resnet50.",)),
    ("vit", "a ViT CAM checkpoint (MCTformer / token CAM / DeiT)", ("blocks.", "patch_embed.")),
)


def checkpoint_kind(state: dict) -> tuple[str, str]:
    """``(kind, description)`` of a state dict from its keys; ``("unknown", ...)`` if none
    fits."""
    for kind, description, prefixes in _KINDS:
        if any(key.startswith(prefix) for key in state for prefix in prefixes):
            return kind, description
    keys = ", ".join(list(state)[:3])
    return "unknown", f"an unknown checkpoint (keys {keys}, ...)"


def read_network_state(path, kind: str, flag: str) -> dict:
    """The state dict at ``path``, refused (``CheckpointError``, one line) unless it is of
    ``kind``."""
    state = read_state_dict(path)
    found, description = checkpoint_kind(state)
    if found != kind:
        wanted = next(d for k, d, _ in _KINDS if k == kind)
        hint = next((f"; use it with --preset {entry.walk} {entry.flag}"
                     for name, entry in AFFINITY_NETWORKS.items() if name == found), "")
        raise CheckpointError(f"{flag} {path}: this is {description}, not {wanted}{hint}")
    return state


@dataclass(frozen=True)
class AffinityNetwork:
    """A learned affinity for ``refine``: the walk (refine preset) it feeds, the RefineOptions
    field naming its checkpoint, and ``load(checkpoint, device, pad_size) -> side_input``
    (``pad_size``: the network's padded input side, IRN's 512; a network may ignore it). A
    ``side_input`` with a ``batch`` method computes many images at once."""

    walk: str
    option: str
    load: Callable[[str, torch.device, int], Callable[[np.ndarray], np.ndarray]]

    @property
    def flag(self) -> str:
        """The command-line option of ``option`` (``--irn-checkpoint``)."""
        return f"--{self.option.replace('_', '-')}"


AFFINITY_NETWORKS: Registry[AffinityNetwork] = Registry(
    "affinity network", builtin_modules=("wsss_fast.engine.learned_affinity",))


class IrnBoundary:
    """IRNet's boundary map of one image (see the module docstring)."""

    def __init__(self, checkpoint, device: torch.device, pad_size: int = IRN_PAD_SIZE):
        state = read_network_state(checkpoint, "irn", "--irn-checkpoint")
        self.model = create_model("resnet50_irn", checkpoint=state).to(device).eval()
        self.device, self.pad_size = device, pad_size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        size = self.pad_size if max(height, width) <= self.pad_size else None
        x = to_normalized_tensor(image, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        edge, _ = self.model.edge_and_displacement(x, size=size)
        return edge[0].float().cpu().numpy()


AFFINITY_NETWORKS.register("irn", AffinityNetwork(walk="irn", option="irn_checkpoint",
                                                  load=IrnBoundary))


class AffinityNetFeatures:
    """PSA's AffinityNet embedding of one image, or of many (``batch``; see the module
    docstring)."""

    def __init__(self, checkpoint, device: torch.device, pad_size: int = IRN_PAD_SIZE):
        from wsss_fast.postprocess.psa_affinity import load_affinitynet
        self.net, self.device = load_affinitynet(checkpoint, device), device

    def batch(self, images) -> list[np.ndarray]:
        from wsss_fast.postprocess.psa_affinity import affinity_features
        return affinity_features(self.net, images, self.device)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.batch([image])[0]


AFFINITY_NETWORKS.register("psa", AffinityNetwork(walk="psa", option="affinity_checkpoint",
                                                  load=AffinityNetFeatures))
