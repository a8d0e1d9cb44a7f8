"""IRN's IRNet training (``irn:step/train_irn.py``; reference affinity_networks.md §1.3-§1.6) as
the training method ``irn``: ``wsss-fast train --method irn --ir-labels DIR``.

* Data: each image with its confident-region label ``DIR/<id>.png`` (``pseudo-label --rule
  confident``: 0 background, k class k, 255 unsure). Labels are checked before the run; an image
  whose label is missing, unreadable, of another size than the image, with values outside
  0..K / 255, or without a confident pixel is skipped and listed in ``train.json``.
* Augmentation (``irn:voc12/dataloader.py``): random rescale s ∈ [0.5, 1.5] (image bicubic,
  label nearest), ImageNet normalisation, joint horizontal flip, joint random crop ``crop``
  (image filled with 0 — the mean colour —, label with 255). No colour jitter.
* Loss: ``affinity.irn_targets`` (stride-4 nearest sampling, radius-10 pairs) and
  ``affinity.irn_loss`` on the network's outputs.
* Optimizer: IRN's ``PolyOptimizer``: SGD, boundary head lr ×1, displacement head lr ×10
  (IRN: 0.1 / 1.0), weight decay 1e-4, ``lr (1 − t/T)^0.9``; the momentum is the weight decay
  unless ``momentum`` is given, as upstream passes weight_decay in SGD's momentum slot. The
  backbone is frozen (IRN) when ``backbone`` names a classifier checkpoint to take it from, and
  trained with the heads (lr ×1) otherwise: from ``init`` (a classifier checkpoint or a shipped
  ``pretrained/resnet.pt``; its trunk only) or from random weights.
* After training: the MeanShift running mean of the displacement field over the training images
  (eval mode, each zero-padded top-left to ``crop``), saved with the weights.

The loop, checkpoints (a plain state dict, IRN's ``res50_irn.pth`` layout without the path
tables), resume and report are ``trainer.run_loop``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.utils.data

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_fast.data.classes import IGNORE_INDEX
from wsss_fast.data.dataset import EmptyDataset, WsssDataset, is_whole_number, require_images
from wsss_fast.data.factory import open_dataset
from wsss_fast.data.images import read_image, read_label_png
from wsss_fast.models.registry import create_model
from wsss_fast.train.affinity import IRN_RADIUS, IRN_STRIDE, irn_loss, irn_targets
from wsss_fast.train.config import TrainConfig
from wsss_fast.train.data import batches_per_epoch, random_crop_window
from wsss_fast.train.methods import Method, register_method
from wsss_fast.train.trainer import _seed_everything, run_loop

SCALE_RANGE = (0.5, 1.5)     # irn:step/train_irn.py rescale
POLY_POWER = 0.9
# The smallest crop whose stride-4 grid holds radius-10 pairs (rows >= R, cols >= 2R - 1).
MIN_CROP = IRN_STRIDE * (2 * IRN_RADIUS - 1)


def label_path(folder, item: str) -> Path:
    """``folder/<id>.png``, or ``folder/labels/<id>.png`` for a pseudo-label output folder."""
    folder = Path(folder)
    direct = folder / f"{item}.png"
    if not direct.exists() and (folder / "labels").is_dir():
        return folder / "labels" / f"{item}.png"
    return direct


def check_ir_label(label: np.ndarray, image_size: tuple[int, int], num_classes: int,
                   path) -> Optional[str]:
    """Why ``label`` cannot train IRN (None: it can): another size than the image, values other
    than 0..``num_classes`` and 255, no confident pixel."""
    if label.shape != tuple(image_size):
        return (f"{path}: label size {label.shape[0]}x{label.shape[1]} differs from the image "
                f"size {image_size[0]}x{image_size[1]}")
    values = np.unique(label)
    bad = values[(values > num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        return (f"{path}: values {', '.join(map(str, bad[:5].tolist()))} outside 0..{num_classes} "
                f"and {IGNORE_INDEX} (a confident-region label: 0 background, k class k, "
                f"{IGNORE_INDEX} unsure)")
    if np.all(values == IGNORE_INDEX):
        return f"{path}: empty confident region (every pixel is {IGNORE_INDEX}, unsure)"
    return None


def _normalized(image: np.ndarray) -> np.ndarray:
    """uint8 RGB → ImageNet-normalised float32 ``(H, W, 3)``."""
    return (image.astype(np.float32) / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) \
        / np.asarray(IMAGENET_STD, np.float32)


def irn_augment(image: np.ndarray, label: np.ndarray, crop: int, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """IRN's training view: ``(3, crop, crop)`` float32 image, ``(crop, crop)`` int64 label."""
    height, width = image.shape[:2]
    scale = rng.uniform(*SCALE_RANGE)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    x = _normalized(image)
    if rng.random() < 0.5:
        x, label = x[:, ::-1], label[:, ::-1]
    out = np.zeros((crop, crop, 3), np.float32)
    out_label = np.full((crop, crop), IGNORE_INDEX, np.int64)
    source, target = random_crop_window(x.shape[:2], crop, rng)
    out[target], out_label[target] = x[source], label[source]
    return (torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))),
            torch.from_numpy(out_label))


def padded_view(image: np.ndarray, crop: int) -> torch.Tensor:
    """The normalised image zero-padded (or cut) top-left to ``crop × crop`` (IRN's MeanShift
    pass)."""
    x = _normalized(image)
    out = np.zeros((crop, crop, 3), np.float32)
    rows, cols = min(crop, x.shape[0]), min(crop, x.shape[1])
    out[:rows, :cols] = x[:rows, :cols]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


class IrLabelImages(torch.utils.data.Dataset):
    """Training views with their confident-region labels: items ``(id, image (3, crop, crop),
    label (crop, crop) int64, error)`` (``TrainingImages``' layout, so ``trainer.run_loop``
    and ``data.collate`` take them). ``skipped`` maps the ids left out to the reason."""

    def __init__(self, dataset: WsssDataset, ir_labels, crop: int, seed: int = 0,
                 ids: Optional[Sequence[str]] = None):
        if not is_whole_number(crop) or crop < MIN_CROP or crop % IRN_STRIDE:
            raise ValueError(f"irn: crop must be a multiple of {IRN_STRIDE} and at least "
                             f"{MIN_CROP} (radius-{IRN_RADIUS} pairs on the stride-4 grid), got "
                             f"{crop!r}")
        folder = Path(ir_labels)
        if not folder.is_dir():
            raise ValueError(f"--ir-labels {folder}: not a folder")
        self.dataset, self.crop, self.seed, self.epoch = dataset, int(crop), int(seed), 0
        self.ids, self.labels, self.skipped = [], [], {}
        for item in (dataset.ids if ids is None else ids):
            path = label_path(folder, item)
            problem = None
            if not path.exists():
                problem = f"no confident-region label {path}"
            else:
                try:
                    label = read_label_png(path)
                    with_size = _image_size(dataset.sample(item).image_path)
                    problem = check_ir_label(label, with_size, dataset.num_classes, path)
                except (ValueError, OSError) as error:
                    problem = str(error)
            if problem:
                self.skipped[item] = problem
            else:
                self.ids.append(item)
                self.labels.append(path)
        if not self.ids:
            first = next(iter(self.skipped.values()), "no images")
            raise EmptyDataset(f"nothing to train IRN on: no image of the {dataset.name} dataset "
                               f"at {dataset.root} has a usable confident-region label in "
                               f"{folder} ({len(self.skipped)} skipped; first: {first})")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        item = self.ids[index]
        try:
            image = read_image(self.dataset.sample(item).image_path)
            label = read_label_png(self.labels[index])
        except (ValueError, OSError) as error:
            return item, None, None, str(error)
        image_view, label_view = irn_augment(image, label, self.crop, rng)
        return item, image_view, label_view, None


def _image_size(path) -> tuple[int, int]:
    import PIL.Image
    with PIL.Image.open(path) as image:
        return image.height, image.width


def irn_batch_loss(model, images: torch.Tensor, labels: torch.Tensor):
    """IRN's loss of a batch of views and their ``(B, crop, crop)`` labels (255 unsure)."""
    edge, displacement = model(images)
    total, terms = irn_loss(edge, displacement, irn_targets(labels, num_labels=IGNORE_INDEX))
    return total, terms


def poly_lr(step: int, total_steps: int, lr: float) -> float:
    """IRN's ``PolyOptimizer``: ``lr (1 − step / total)^0.9``."""
    return lr * (1 - step / max(1, total_steps)) ** POLY_POWER


def irn_optimizer(net, lr: float, weight_decay: float,
                  momentum: Optional[float] = None) -> torch.optim.SGD:
    """IRN's ``PolyOptimizer`` groups (``IrNet.trainable_parameters``: boundary ×1,
    displacement ×10, a trained backbone ×1) with ``weight_decay``; ``momentum=None`` is
    upstream's: the weight decay (passed in SGD's momentum slot)."""
    groups = [dict(group, weight_decay=weight_decay) for group in net.trainable_parameters()]
    return torch.optim.SGD(groups, lr=lr, momentum=weight_decay if momentum is None else momentum)


@torch.no_grad()
def displacement_mean(net, images: IrLabelImages, batch_size: int, device) -> torch.Tensor:
    """IRN's MeanShift statistics (train_irn.py:87-110): the mean over batches of each batch's
    mean displacement over (N, h, w), in eval mode, images zero-padded top-left to the crop."""
    net.eval()
    means = []
    for first in range(0, len(images), batch_size):
        batch = torch.stack([padded_view(read_image(images.dataset.sample(item).image_path),
                                         images.crop)
                             for item in images.ids[first: first + batch_size]])
        net.mean_shift.running_mean.zero_()   # the raw field
        _, displacement = net(batch.to(device))
        means.append(displacement.mean(dim=(0, 2, 3)))
    return torch.stack(means).mean(dim=0)


def load_irn_backbone(net, config: TrainConfig, quiet: bool = False) -> Optional[dict]:
    """Load the trunk of ``config.backbone`` (frozen, IRN's regime) or ``config.init``
    (fine-tuned with the heads) into ``net`` with ``IrNet.load_backbone``; returns the report
    (source, frozen, tensors loaded, source keys not used), None when neither is given. Only
    ``resnet50.*`` keys are read: a classifier's ``stage*`` / ``backbone.*`` aliases group the
    layers differently from IRNet's, so loading by name alone could copy one layer into another.
    """
    if config.backbone is not None and config.init is not None:
        raise ValueError("--method irn: give --backbone FILE (trunk loaded and frozen) or --init "
                         "FILE (trunk loaded and fine-tuned), not both")
    source = config.backbone if config.backbone is not None else config.init
    if source is None:
        return None
    loaded = net.load_backbone(source)
    frozen = config.backbone is not None
    report = {"source": str(source), "frozen": frozen, "loaded": loaded.loaded,
              "skipped": list(loaded.skipped)}
    if not quiet:
        # A resnet_cam checkpoint does not record its layer strides: the trunk's weights run at
        # IRNet's strides (2, 2, 2, 1) whatever the classifier used (resnet_cam_tiny: output
        # stride 8).
        print(f"wsss-fast train: irn backbone {source}: loaded {loaded.loaded} trunk tensors "
              f"({'frozen' if frozen else 'fine-tuned with the heads'}, at IRNet's strides); "
              f"not used: {', '.join(loaded.skipped) or 'nothing'}", file=sys.stderr)
    return report


def run_irn(chosen: Method, config: TrainConfig, out: Path, target: torch.device, *,
            max_steps: Optional[int], workers: int, resume: bool, save_every: Optional[int],
            progress: bool) -> Path:
    """``trainer.run_loop`` with IRN's data, model, optimizer and MeanShift pass."""
    if config.ir_labels is None:
        raise ValueError("--method irn needs --ir-labels DIR (confident-region labels, e.g. "
                         "from pseudo-label --rule confident)")
    data = open_dataset(config.dataset, config.data, split=config.split, labels=config.labels,
                        classes=config.classes)
    require_images(data)
    images = IrLabelImages(data, config.ir_labels, config.crop, seed=config.seed)
    _seed_everything(config.seed)
    net = create_model(config.model, **{"freeze_backbone": config.backbone is not None,
                                        **config.model_args})
    init_report = load_irn_backbone(net, config, quiet=resume)
    net = net.to(target)
    optimizer = irn_optimizer(net, config.lr, config.weight_decay, config.momentum)
    total_steps = config.epochs * batches_per_epoch(len(images), config.batch_size)

    def store_mean_shift() -> None:
        net.mean_shift.running_mean.copy_(displacement_mean(net, images, config.batch_size,
                                                            target))

    skipped = {id: reason for id, reason in data.problems()}
    skipped.update(images.skipped)
    return run_loop(chosen, config, out, target, data=data, images=images, net=net,
                    optimizer=optimizer, total_steps=total_steps, skipped=skipped,
                    schedule=lambda step: poly_lr(step, total_steps, config.lr),
                    max_steps=max_steps, workers=workers, resume=resume, save_every=save_every,
                    progress=progress, before_last_save=store_mean_shift,
                    init_report=init_report)


# The synthetic benchmark (images of 96-160 px, CAMs of the demo's small models): crop 128
# (IRN: 512 on VOC's ~500 px images), IRN's optimizer groups with textbook momentum 0.9 and 30
# epochs: with upstream's momentum (the weight decay, 1e-4) and 8-30 epochs the boundary head
# learned a foreground mask (high inside the objects), not their boundaries (README, learned
# affinity).
register_method(Method(
    name="irn", model="irn_tiny", loss=irn_batch_loss, preset="irn_cam",
    checkpoint_format="plain",
    description="IRN's IRNet: boundary + displacement from confident-region labels (--ir-labels)",
    defaults=dict(epochs=3, batch_size=32, lr=0.1, weight_decay=1e-4),
    synthetic_train=dict(crop=128, epochs=30, batch_size=16, lr=0.1, weight_decay=1e-4,
                         momentum=0.9),
    runner=run_irn))
