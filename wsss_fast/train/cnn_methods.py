"""Training losses of the CNN CAM methods: IRN's CAM classifier (also LPCAM's) and EDAM.

Each loss is ``loss(model, images (B, 3, H, W), labels (B, K) multi-hot) -> (loss, {name: float})``.

* ``irn_cam_loss`` — IRN ``step/train_cam.py``: multilabel soft-margin loss of the GAP logits.
* ``edam_warm_loss`` — an optional warm phase before EDAM's loss (``TrainConfig.warm_epochs``):
  the plain-CAM loss on the DA layer's raw class maps (not upstream's; the tiny trunk localizes
  as a plain CAM, README "Why EDAM does not localize here").
* ``edam_loss`` — EDAM ``train_EDAM_cls.py``: ``BCEWithLogits`` (mean) of the CMA logits of image
  pairs, every class of both images (upstream samples 20 classes per pair out of VOC's 20, i.e.
  all of them; their order does not change the logits). Upstream reads pairs sharing a class from
  a list file (``voc12/EDAM_train.txt``, not published); here the pairs are formed inside each
  batch by ``pair_by_shared_class``.

``irn_cam`` and ``edam`` register with the training layer's method registry on import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_fast.train.methods import Method, register_method


def _check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dim() != 4 or labels.dim() != 2 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"expected images (B, 3, H, W) and labels (B, K), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")


def _check_logits(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ "
                         f"(does the model have one output per dataset class?)")


def _soft_margin(logits: torch.Tensor, labels: torch.Tensor, term: str):
    _check_logits(logits, labels)
    loss = F.multilabel_soft_margin_loss(logits.float(), labels.float())
    return loss, {term: loss.item()}


def irn_cam_loss(model, images: torch.Tensor, labels: torch.Tensor):
    """``multilabel_soft_margin_loss(model(images), labels)``."""
    _check_batch(images, labels)
    return _soft_margin(model(images), labels, "cls")


def edam_warm_loss(model, images: torch.Tensor, labels: torch.Tensor):
    """EDAM's warm phase (``TrainConfig.warm_epochs``): the plain-CAM loss, multilabel soft
    margin of ``model.class_map_logits`` (GAP of the DA layer's raw class maps; no pairs, no
    CMA), as the trunk was pretrained."""
    _check_batch(images, labels)
    return _soft_margin(model.class_map_logits(images), labels, "warm_cls")


def pair_by_shared_class(labels: torch.Tensor) -> torch.Tensor:
    """Pairs ``(P, 2)`` covering every image of the batch, preferring pairs that share a class.

    Greedy, in batch order: each unpaired image takes the first unpaired image sharing a class
    with it, else the first unpaired image. With an odd batch the last image also forms a pair
    with an already paired image (sharing a class if any does), so ``P = ⌈B/2⌉``.
    """
    if labels.dim() != 2 or labels.shape[0] < 2:
        raise ValueError(f"EDAM pairs need labels (B, K) with B >= 2, got {tuple(labels.shape)}")
    labels = (labels > 0).float()
    shares = (labels @ labels.T > 0).tolist()
    unpaired = list(range(labels.shape[0]))
    pairs = []
    while len(unpaired) >= 2:
        first = unpaired.pop(0)
        partner = next((j for j in unpaired if shares[first][j]), unpaired[0])
        unpaired.remove(partner)
        pairs.append((first, partner))
    if unpaired:
        last = unpaired[0]
        others = [j for j in range(labels.shape[0]) if j != last]
        pairs.append((last, next((j for j in others if shares[last][j]), others[0])))
    return torch.tensor(pairs, dtype=torch.int64, device=labels.device)


def edam_loss(model, images: torch.Tensor, labels: torch.Tensor):
    """Mean binary cross-entropy of ``model(images, pairs) (P, 2, K)`` against both images'
    labels."""
    _check_batch(images, labels)
    pairs = pair_by_shared_class(labels)
    logits, targets = model(images, pairs), labels.float()[pairs]
    _check_logits(logits, targets)
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
    return loss, {"bce": loss.item()}


# Plain state dicts, as upstream's; the CPU-sized models (TrainConfig.model picks resnet50_cam /
# edam). The IRN CAM trains 15 epochs on the synthetic benchmark: with the tiny model's output
# stride 8 the seed rose from 43.6 (10 epochs) to 45.4 (seed 0; README, "IRN CAM and LPCAM").
register_method(Method(name="irn_cam", model="resnet_cam_tiny", loss=irn_cam_loss,
                       preset="irn_cam", checkpoint_format="plain",
                       description="IRN / LPCAM CAM classifier: multilabel soft margin on GAP "
                                   "logits", synthetic_train={"epochs": 15}))
# EDAM's CMA attends over both images' feature pixels for every class: at crop 128 a step took
# 3× a ViT's, and 10 epochs over 600 images 7 minutes on 2 cores; crop 96 halves it. The lr stays
# the recipe's 5e-4: at 2e-3 the extra DA channel took the background and the class masks lit
# object edges (seed mIoU 12.9 against 20.1, README "Demo results and findings").
register_method(Method(name="edam", model="edam_tiny", loss=edam_loss, preset="edam",
                       checkpoint_format="plain", warm_loss=edam_warm_loss,
                       description="EDAM: BCE on the Collaborative Multi-Attention logits of "
                                   "image pairs", synthetic_train={"crop": 96}))
