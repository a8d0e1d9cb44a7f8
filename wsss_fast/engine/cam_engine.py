"""``CamEngine``: multi-scale, flipped CAM extraction for one image at a time (Python API).

For each pass of its preset the image is resized exactly as the official generator does (PIL
bicubic to ``(round(W·s), round(H·s))``, or to a square), normalized, and run together with its
horizontal flip as one batch through ``model.cam_maps``; ``multiscale_merge`` then resizes every
pass to the image size, flips back, masks absent classes, merges and normalizes. The result holds
the full-resolution maps and IRN's stride-4 maps. ``extract`` batches images of equal size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from wsss_fast import ops
from wsss_fast.engine.memory import PassPlan, default_memory_budget_mib, plan_pass
from wsss_fast.engine.presets import Preset, get_preset

ImageLike = Union[str, os.PathLike, PIL.Image.Image, np.ndarray]


@dataclass
class CamResult:
    """CAMs of one image. ``high_res`` is ``(K, H, W)`` and ``low_res`` ``(K, ⌈H/4⌉, ⌈W/4⌉)`` over
    all K classes (absent ones are masked to 0 before normalization); ``keys`` are the classes
    present in the labels."""

    keys: np.ndarray
    high_res: torch.Tensor
    low_res: torch.Tensor

    def as_dict(self) -> dict[int, np.ndarray]:
        """MCTformer / TransCAM style ``{class_index: H×W float32}`` of the present classes."""
        return {int(k): self.high_res[k].cpu().numpy() for k in self.keys}


def load_image(image: ImageLike) -> PIL.Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with PIL.Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an array image must be H×W×3 uint8 RGB, got {image.shape} {image.dtype}")
        return PIL.Image.fromarray(image)
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    raise ValueError(f"cannot read an image from {type(image).__name__}")


def to_normalized_tensor(image: PIL.Image.Image, mean, std) -> torch.Tensor:
    """torchvision's ToTensor + Normalize, in the same float32 operations."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class CamEngine:
    """CAMs of a model under a preset.

    >>> engine = CamEngine(model, "mctformer_v2", scales=(1.0, 0.75, 1.25))
    >>> result = engine("2008_000101.jpg", labels)     # labels: (K,) multi-hot
    >>> result.as_dict()                                # {class: H×W}
    """

    def __init__(self, model: torch.nn.Module, preset: Union[str, Preset] = "mctformer_v2", *,
                 device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None,
                 max_affinity_mib: Optional[float] = None,
                 max_memory_mib: Optional[float] = None, **overrides):
        """
        Args:
            dtype: run the model under autocast in ``torch.bfloat16`` or ``torch.float16``
                (attention statistics and softmax stay fp32); None: fp32.
            max_affinity_mib: for models whose ``cam_maps`` take ``affinity=``, passes whose dense
                (B, P, P) patch affinity would exceed this many MiB are refined by streaming
                instead (O(T·d) memory per block rather than O(P²)).
            max_memory_mib: memory budget of one pass, checked before it runs
                (``engine.memory``): passes over it are refined by streaming where the model
                can, images still over it raise ``ImageTooLarge``. Default: half the available
                RAM on a CPU, 90% of the free GPU memory on a GPU.
            overrides: preset fields (``scales=``, ``flip=``, ...).
        """
        self.preset = get_preset(preset, **overrides)
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be None, torch.bfloat16 or torch.float16, got {dtype}")
        self.dtype = None if dtype == torch.float32 else dtype
        self.max_affinity_mib = max_affinity_mib
        if not hasattr(model, "cam_maps"):
            raise ValueError(f"{type(model).__name__} has no cam_maps(); wrap it in a wsss_fast "
                             "model class")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.eval().to(self.device)
        if max_memory_mib is not None and not max_memory_mib > 0:
            raise ValueError(f"max_memory_mib must be > 0, got {max_memory_mib}")
        self.max_memory_mib = (default_memory_budget_mib(self.device) if max_memory_mib is None
                               else float(max_memory_mib))

    def pass_inputs(self, image: PIL.Image.Image):
        """[(batch of the resized image and, if flipping, its flip)] per scale or square side."""
        width, height = image.size
        preset = self.preset
        full = None
        for size in preset.sizes:
            self._check_pass_size(width, height, size)
            if preset.resize == "tensor_bilinear":
                if full is None:
                    full = to_normalized_tensor(image, preset.mean, preset.std)[None]
                target = ((int(size), int(size)) if preset.square_sizes is not None
                          else (int(height * size), int(width * size)))
                x = F.interpolate(full, size=target, mode="bilinear", align_corners=False)[0]
            else:
                if preset.square_sizes is not None:
                    target = (int(size), int(size))
                else:
                    target = (round(width * size), round(height * size))  # Python's round
                resized = image.resize(target, resample=PIL.Image.BICUBIC)
                x = to_normalized_tensor(resized, preset.mean, preset.std)
            batch = torch.stack([x, x.flip(-1)]) if preset.flip else x[None]
            yield batch.to(self.device)

    def _pass_target(self, width: int, height: int, size) -> tuple[int, int]:
        """(height, width) of the pass at ``size`` (a scale or a square side) of an image."""
        preset = self.preset
        if preset.square_sizes is not None:
            return int(size), int(size)
        if preset.resize == "tensor_bilinear":
            return int(height * size), int(width * size)
        return round(height * size), round(width * size)

    def check_memory(self, size: tuple[int, int], images: int = 1) -> list[PassPlan]:
        """The plans of the passes of ``images`` images of ``size`` (width, height), before any
        runs; ``ImageTooLarge`` if one of them does not fit ``max_memory_mib``."""
        width, height = size
        batch = images * (2 if self.preset.flip else 1)
        return [plan_pass(self.model, batch, *self._pass_target(width, height, s),
                          self.preset.cam_kwargs, budget_mib=self.max_memory_mib,
                          max_affinity_mib=self.max_affinity_mib, image_size=size)
                for s in self.preset.sizes]

    def _check_pass_size(self, width: int, height: int, size) -> None:
        """A clear error for images too small (or too thin) for the model at some pass."""
        target = self._pass_target(width, height, size)
        grid = self.model.grid(*target) if hasattr(self.model, "grid") else target
        if min(grid) < 1:
            raise ValueError(f"image {width}×{height} is too small for the model: the pass at "
                             f"{size} is {target[1]}×{target[0]}, less than one patch")

    @torch.no_grad()
    def __call__(self, image: ImageLike, labels=None) -> CamResult:
        return self.extract([image], [labels])[0]

    @torch.no_grad()
    def extract(self, images: Sequence[ImageLike],
                labels: Optional[Sequence] = None) -> list[CamResult]:
        """CAMs of several images; images of one size share each forward (their passes and flips
        are batched together), so small images fill the batch."""
        images = [load_image(image) for image in images]
        labels = [None] * len(images) if labels is None else list(labels)
        if len(labels) != len(images):
            raise ValueError(f"got {len(labels)} label vectors for {len(images)} images")
        results = [self.result_without_forward(image.size, labels[index])
                   for index, image in enumerate(images)]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            if results[index] is None:
                groups.setdefault(image.size, []).append(index)
        for indices in groups.values():
            self.check_memory(images[indices[0]].size, len(indices))
            passes = [[] for _ in indices]   # per image, what pass_maps gave for each pass
            for batches in zip(*(self.pass_inputs(images[i]) for i in indices)):
                with torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16,
                                    enabled=self.dtype is not None):
                    outputs = self.forward_pass(torch.cat(batches))
                for slot, maps in enumerate(self.pass_maps(outputs, [labels[i] for i in indices])):
                    passes[slot].append(maps)
            for slot, index in enumerate(indices):
                results[index] = self.merge_passes(passes[slot], images[index].size, labels[index])
        return results

    # The per-pass hooks of ``extract``: a subclass with another head (LPCAM) overrides them and
    # keeps the loop (grouping by size, batching the passes of equal-size images, autocast).

    def result_without_forward(self, size: tuple[int, int], labels) -> Optional[CamResult]:
        """The result of an image that needs no forward pass, else None (every image here)."""
        return None

    def forward_pass(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's outputs for one pass of several images (run under the engine's autocast)."""
        return self.model.cam_maps(batch, **self._cam_kwargs(batch)).float()

    def pass_maps(self, outputs: torch.Tensor, labels: Sequence) -> list:
        """Split one pass's ``outputs`` by image (``labels`` has one entry per image, in batch
        order): per image, its ``[(map (1, K, h, w), flipped)]``."""
        cams = outputs[:, self.preset.drop_channels:]
        per_pass = cams.shape[0] // len(labels)
        return [[(cams[row:row + 1], j == 1)
                 for j, row in enumerate(range(slot * per_pass, (slot + 1) * per_pass))]
                for slot in range(len(labels))]

    def merge_passes(self, passes: list, size: tuple[int, int], labels) -> CamResult:
        """One image's result from its ``pass_maps`` of every pass."""
        pieces = [piece for maps in passes for piece in maps]
        return self._merge([m for m, _ in pieces], [flip for _, flip in pieces], size, labels)

    def _merge(self, maps, flips, size, labels) -> CamResult:
        width, height = size
        label_tensor = self._labels(labels, maps[0].shape[1])
        merge = dict(flips=flips, relu=self.preset.relu, labels=label_tensor[None],
                     merge=self.preset.merge, norm=self.preset.norm, eps=self.preset.eps)
        grid = self.preset.high_res_grid
        if grid is None:
            high_res = ops.multiscale_merge(maps, (height, width), **merge)[0]
        else:   # IRN: upsample to whole multiples of the grid, crop, then normalize
            padded = (grid * math.ceil(height / grid), grid * math.ceil(width / grid))
            summed = ops.multiscale_merge(maps, padded, **{**merge, "norm": "none"})
            summed = summed[..., :height, :width].contiguous()
            high_res = ops.multiscale_merge([summed], (height, width), flips=[False],
                                            relu=False, labels=label_tensor[None], merge="sum",
                                            norm=self.preset.norm, eps=self.preset.eps)[0]
        low_res = ops.multiscale_merge(maps, (math.ceil(height / 4), math.ceil(width / 4)),
                                       **merge)[0]
        keys = torch.nonzero(label_tensor > 0).flatten().cpu().numpy()
        return CamResult(keys=keys, high_res=high_res, low_res=low_res)

    def _cam_kwargs(self, batch: torch.Tensor) -> dict:
        kwargs = dict(self.preset.cam_kwargs)
        plan = plan_pass(self.model, batch.shape[0], *batch.shape[-2:], kwargs,
                         budget_mib=self.max_memory_mib, max_affinity_mib=self.max_affinity_mib)
        if plan.affinity is not None:
            kwargs["affinity"] = plan.affinity
        return kwargs

    def _labels(self, labels, num_classes: int) -> torch.Tensor:
        if labels is None:
            return torch.ones(num_classes, device=self.device)
        labels = torch.as_tensor(np.array(labels, dtype=np.float32)).flatten()
        if labels.numel() != num_classes:
            raise ValueError(f"labels must have {num_classes} entries (one per class of "
                             f"{self.preset.name}), got {labels.numel()}")
        return labels.to(self.device)
