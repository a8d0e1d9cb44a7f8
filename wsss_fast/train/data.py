"""Training images with image-level labels and the augmentation of the published trainers, at
small scale (TransCAM train_TransCAM.py:45-56, the same chain PSA/IRN use):

    random resize of the long side → horizontal flip → colour jitter (optional)
    → ImageNet normalization → random crop to ``crop × crop`` with zero padding

Every random draw of an item comes from its own generator seeded by ``(seed, epoch, index)``, and
the epoch's order from one seeded by ``(seed, epoch)``, so batches depend on neither the number of
workers nor on where a run was interrupted and resumed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.utils.data

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_fast.data.dataset import EmptyDataset, WsssDataset, is_whole_number
from wsss_fast.data.images import read_image
from wsss_fast.io.interrupts import die_with_parent


@dataclass(frozen=True)
class Augmentation:
    crop: int = 128
    resize_long: tuple[int, int] = (80, 160)     # inclusive range of the long side, pixels
    flip: bool = True
    # (brightness, contrast, saturation, hue) as torchvision's ColorJitter; None: off
    color_jitter: Optional[tuple[float, float, float, float]] = (0.3, 0.3, 0.3, 0.1)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if not is_whole_number(self.crop) or self.crop < 1:
            raise ValueError(f"crop must be a positive whole number of pixels, got {self.crop!r}")
        low, high = self.resize_long
        if not (is_whole_number(low) and is_whole_number(high) and 1 <= low <= high):
            raise ValueError(f"resize_long must be whole numbers (low, high) with 1 <= low <= "
                             f"high, got {self.resize_long!r}")
        if self.color_jitter is not None and (len(self.color_jitter) != 4
                                              or min(self.color_jitter) < 0
                                              or self.color_jitter[3] > 0.5):
            raise ValueError(f"color_jitter must be (brightness, contrast, saturation, hue) with "
                             f"non-negative values and hue <= 0.5, got {self.color_jitter}")


def _gray(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale."""
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def color_jitter(image: np.ndarray, strengths, rng: np.random.Generator) -> np.ndarray:
    """ColorJitter on float RGB in [0, 1], applied in the fixed order brightness, contrast,
    saturation, hue (torchvision shuffles the order; a fixed one keeps the draw count constant)."""
    brightness, contrast, saturation, hue = strengths
    factors = [rng.uniform(max(0.0, 1 - s), 1 + s) for s in (brightness, contrast, saturation)]
    shift = rng.uniform(-hue, hue)
    image = np.clip(image * factors[0], 0, 1)
    mean_gray = _gray(image).mean()
    image = np.clip((image - mean_gray) * factors[1] + mean_gray, 0, 1)
    gray = _gray(image)[..., None]
    image = np.clip((image - gray) * factors[2] + gray, 0, 1)
    if shift:
        hsv = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2HSV)   # H in degrees
        hsv[..., 0] = (hsv[..., 0] + 360.0 * shift) % 360.0
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return image.astype(np.float32)


def augment(image: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> torch.Tensor:
    """One training view ``(3, crop, crop)`` float32 of a uint8 ``(H, W, 3)`` RGB image."""
    height, width = image.shape[:2]
    long_side = int(rng.integers(aug.resize_long[0], aug.resize_long[1] + 1))
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    x = resized.astype(np.float32) / 255.0
    if aug.flip and rng.random() < 0.5:
        x = x[:, ::-1]
    if aug.color_jitter is not None:
        x = color_jitter(x, aug.color_jitter, rng)
    x = (x - np.asarray(aug.mean, np.float32)) / np.asarray(aug.std, np.float32)
    out = random_crop(x, aug.crop, rng)   # padding 0: the mean colour after normalization
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def random_crop_window(size: tuple[int, int], crop: int, rng: np.random.Generator):
    """imutils.RandomCrop's placement of a ``crop × crop`` window and an image of ``size``
    ``(h, w)`` at random relative offsets (rows drawn first): ``(source, target)`` slice pairs,
    image → crop."""
    h, w = size
    dy, dx = (int(rng.integers(0, abs(n - crop) + 1)) for n in (h, w))
    src_y, dst_y = (dy, 0) if h >= crop else (0, dy)
    src_x, dst_x = (dx, 0) if w >= crop else (0, dx)
    rows, cols = min(h, crop), min(w, crop)
    return ((slice(src_y, src_y + rows), slice(src_x, src_x + cols)),
            (slice(dst_y, dst_y + rows), slice(dst_x, dst_x + cols)))


def random_crop(x: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    """``imutils.RandomCrop`` of an ``(H, W, C)`` array: ``random_crop_window``'s placement;
    outside the image stays 0."""
    out = np.zeros((crop, crop) + x.shape[2:], np.float32)
    source, target = random_crop_window(x.shape[:2], crop, rng)
    out[target] = x[source]
    return out


class TrainingImages(torch.utils.data.Dataset):
    """Augmented views and labels of a dataset's images that have image-level labels.

    Items are ``(id, image (3, crop, crop) or None, labels (K,), error or None)``; an image that
    fails to decode gives ``None`` and the error (the batch collation drops and reports it).
    ``unlabelled`` lists the ids left out because their labels are unknown.
    """

    def __init__(self, dataset: WsssDataset, aug: Augmentation, seed: int = 0,
                 ids: Optional[Sequence[str]] = None):
        if not is_whole_number(seed):
            raise ValueError(f"seed must be a whole number, got {seed!r}")
        self.dataset = dataset
        self.aug = aug
        self.seed = int(seed)
        self.epoch = 0
        self.ids, self.labels, self.unlabelled = [], [], []
        for id in (dataset.ids if ids is None else ids):
            labels = dataset.sample(id).labels
            if labels is None:
                self.unlabelled.append(id)
            else:
                self.ids.append(id)
                self.labels.append(torch.as_tensor(np.array(labels, dtype=np.float32)))
        if not self.ids:
            raise EmptyDataset(f"nothing to train on: no image of the {dataset.name} dataset at "
                               f"{dataset.root} has image-level labels "
                               f"({len(self.unlabelled)} without)")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        id = self.ids[index]
        try:
            image = read_image(self.dataset.sample(id).image_path)
        except (ValueError, OSError) as error:  # ImageDecodeError names the file
            return id, None, self.labels[index], str(error)
        return id, augment(image, self.aug, rng), self.labels[index], None


def collate(items):
    """``(images (B, 3, crop, crop), labels (B, K), [(id, error)])``: undecodable items are
    dropped and listed (images and labels are None when no item is left)."""
    kept = [(image, labels) for _, image, labels, _ in items if image is not None]
    failed = [(id, error) for id, image, _, error in items if image is None]
    if not kept:
        return None, None, failed
    images, labels = zip(*kept)
    return torch.stack(images), torch.stack(labels), failed


class EpochSampler(torch.utils.data.Sampler):
    """The epoch's seeded permutation, from batch ``start_batch`` on (to resume mid-epoch)."""

    def __init__(self, size: int, seed: int, epoch: int, batch_size: int, start_batch: int = 0):
        generator = torch.Generator().manual_seed(_mix(seed, epoch))
        self.order = torch.randperm(size, generator=generator)[start_batch * batch_size:].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


def _seed_worker(worker_id: int) -> None:
    """Libraries drawing from the global generators inside workers see a per-worker seed."""
    die_with_parent()   # killed with the run, even by SIGKILL, instead of loading on as an orphan
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setNumThreads(0)


def batches_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches only (drop_last); a set smaller than one batch gives one short batch."""
    return max(1, num_images // batch_size)


def epoch_loader(images: TrainingImages, batch_size: int, epoch: int, start_batch: int = 0,
                 workers: int = 2):
    """A DataLoader over epoch ``epoch`` from batch ``start_batch``: full batches only (a set
    smaller than one batch gives one short batch)."""
    counts = {"batch_size": batch_size, "epoch": epoch, "start_batch": start_batch,
              "workers": workers}
    bad = [f"{name}={value!r}" for name, value in counts.items()
           if not is_whole_number(value) or value < (1 if name == "batch_size" else 0)]
    if bad:
        raise ValueError(f"epoch_loader: expected whole numbers (batch_size >= 1, the others "
                         f">= 0), got {', '.join(bad)}")
    images.epoch = epoch
    sampler = EpochSampler(len(images), images.seed, epoch, batch_size, start_batch)
    drop_last = len(images) >= batch_size
    generator = torch.Generator().manual_seed(_mix(images.seed, epoch, 1))
    return torch.utils.data.DataLoader(
        images, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate, drop_last=drop_last, worker_init_fn=_seed_worker if workers else None,
        generator=generator, persistent_workers=False)


