"""LPCAM (Chen & Sun, CVPR 2023): class and context prototypes of an IRN CAM classifier, and the
prototype heatmaps that replace its CAMs (DESIGN §5.4; reference/cnn_methods_postprocessing.md §1).

1. **Feature bank** (§1.2): for every image of the bank split, the classifier's layer4 features
   at scale 1.0 (no flip) and its ordinary IRN CAMs (from CAM files, or computed with the
   "irn_cam" preset). Per class ``c`` of the image, the CAM ``high_res[c]`` is resized to the
   feature grid (nearest) and splits the pixels into *selected* (``cam > select_thres``) and *not
   selected* (``cam < select_thres``; equal pixels are dropped). Class ``c`` pools these over the
   images labelled ``c`` (VOC: all of them; COCO: ``images_per_class`` draws with replacement,
   repeats counted again).
2. **Clustering** (§1.3): cosine k-means (``wsss_fast.ops.kmeans``) of each pool into
   ``clusters`` centres (``tol`` 5, v0.3's stop rule).
3. **Prototypes** (§1.4): with ``p = softmax(U · wᵀ)`` over classes (``w`` the bias-free
   classifier), the class prototypes are the selected-pixel centres with ``p[:, c] > class_thres``
   and the context prototypes the other pool's centres with
   ``context_thres_low < q[:, c] < context_thres``.
4. **Heatmap** (§1.5–1.6): per scale of (1.0, 0.5, 1.5, 2.0), ``F = f(x) + flip(f(flip(x)))``,
   ``A_c = F̂ · (p̄_c − q̄_c)``, ReLU'd when ``Q_c`` is non-empty (``wsss_fast.ops.prototype_cam``);
   bilinear to ``⌈H/4⌉×⌈W/4⌉`` and to ``16⌈H/16⌉×16⌈W/16⌉`` cropped to ``H×W``, mean over scales,
   divided by the per-class maximum (no epsilon).

Documented deviations from upstream:

* No class prototype passes ``class_thres``: VOC upstream crashes (``torch.cat([])``); we take
  COCO's fallback for every dataset — the single centre of highest ``p[:, c]`` —
  (``class_fallback="none"`` keeps the class without prototypes: its maps are 0).
* A pool with fewer points than ``clusters`` gets as many clusters as points (upstream's
  ``np.random.choice`` raises); an empty pool gives no centres. Empty k-means clusters are
  re-seeded (see ``wsss_fast.ops.kmeans``) and k-means stops after ``max_iter`` iterations.
* A map whose maximum is 0 stays 0 (upstream divides 0 by 0). Features are post-ReLU, so the
  maps are never negative and upstream's missing epsilon matters only there.
* COCO's sampling: classes without images draw nothing (upstream's ``np.random.choice`` raises).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsss_fast import ops
from wsss_fast.engine.cam_engine import CamEngine, CamResult, load_image, to_normalized_tensor
from wsss_fast.engine.presets import Preset
from wsss_fast.models.checkpoint import read_torch_file
from wsss_fast.ops.prototype_cam import prototype_cam, prototype_weight

PROTOTYPES_FORMAT = "wsss-fast/lpcam-prototypes"
PROTOTYPES_VERSION = 1
OUTPUT_STRIDE = 16          # IRN's get_strided_up_size(size, 16) for the full-resolution maps
LOW_RES_STRIDE = 4          # IRN's get_strided_size(size, 4) for the stored "cam"
CLASS_FALLBACKS = ("argmax", "none")

# The heatmap passes: IRN's multi-scale, flipped inference (make_lpcam.py:156). Only the resize,
# normalization and flip fields are used; aggregation is ``aggregate_scales``.
LPCAM_PRESET = Preset("lpcam", scales=(1.0, 0.5, 1.5, 2.0), flip=True, norm="max", eps=0.0)


@dataclass(frozen=True)
class LpcamSettings:
    """Prototype construction; defaults are VOC's (``make_lpcam.py:56``)."""

    clusters: int = 12
    select_thres: float = 0.1
    class_thres: float = 0.9
    context_thres: float = 0.9
    context_thres_low: float = 0.05
    tol: float = 5.0
    max_iter: int = 100                      # upstream: unbounded
    images_per_class: Optional[int] = None   # None: every image of the class (VOC)
    sample_seed: int = 666                   # COCO's split_100 seed
    seed: int = 0                            # k-means initial draws
    class_fallback: str = "argmax"

    def __post_init__(self):
        for name in ("clusters", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LPCAM {name} must be an int >= 1, got {value!r}")
        if self.images_per_class is not None and self.images_per_class < 1:
            raise ValueError(f"images_per_class must be >= 1, got {self.images_per_class}")
        for name in ("select_thres", "class_thres", "context_thres", "context_thres_low", "tol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LPCAM {name} must be a finite number, got {value!r}")
        if self.class_fallback not in CLASS_FALLBACKS:
            raise ValueError(f"class_fallback must be one of {CLASS_FALLBACKS}, got "
                             f"{self.class_fallback!r}")


LPCAM_SETTINGS = {
    "voc": LpcamSettings(),
    # step_coco/make_lpcam.py:16-30, :66 (100 images per class drawn with replacement, seed 666).
    "coco": LpcamSettings(clusters=20, select_thres=0.25, context_thres=0.5,
                          context_thres_low=0.0, images_per_class=100),
}


# ----------------------------------------------------------------------------- prototypes

@dataclass
class PrototypeChoice:
    class_prototypes: torch.Tensor      # (n_p, D) raw centres
    context_prototypes: torch.Tensor    # (n_q, D)
    class_scores: torch.Tensor          # (k_fg,) softmax score of the class for every fg centre
    context_scores: torch.Tensor        # (k_bg,)
    fallback: bool                      # no centre passed class_thres; the argmax was taken


def select_prototypes(fg_centres: torch.Tensor, bg_centres: torch.Tensor,
                      classifier_weight: torch.Tensor, class_index: int, *,
                      class_thres: float, context_thres: float, context_thres_low: float,
                      class_fallback: str = "argmax") -> PrototypeChoice:
    """LPCAM's prototype choice for class ``class_index`` (§1.4): ``softmax(U·wᵀ)[:, c] >
    class_thres`` (else the argmax centre under ``class_fallback="argmax"``) and
    ``context_thres_low < softmax(V·wᵀ)[:, c] < context_thres``. ``classifier_weight`` is
    ``(C, D)``; centres are ``(k, D)`` (``k`` may be 0)."""
    if class_fallback not in CLASS_FALLBACKS:
        raise ValueError(f"class_fallback must be one of {CLASS_FALLBACKS}, got "
                         f"{class_fallback!r}")
    w = classifier_weight.float()
    class_scores = torch.softmax(fg_centres.float() @ w.t(), dim=1)[:, class_index]
    context_scores = torch.softmax(bg_centres.float() @ w.t(), dim=1)[:, class_index]
    chosen = class_scores > class_thres
    fallback = not bool(chosen.any()) and class_fallback == "argmax" and class_scores.numel() > 0
    if fallback:
        chosen = torch.zeros_like(chosen)
        chosen[class_scores.argmax()] = True
    context = (context_scores > context_thres_low) & (context_scores < context_thres)
    return PrototypeChoice(fg_centres[chosen], bg_centres[context], class_scores, context_scores,
                           fallback)


@dataclass
class Prototypes:
    """Per class (dataset order) the class and context prototypes, with what produced them."""

    class_names: tuple
    class_prototypes: list            # [(n_p, D) float32] per class
    context_prototypes: list          # [(n_q, D) float32] per class
    settings: dict
    model: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    diagnostics: list = field(default_factory=list)   # per class: pool sizes, scores, ...

    @property
    def feature_dim(self) -> int:
        return int(self.class_prototypes[0].shape[1])

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W (K, D), relu (K,) bool)`` of ``prototype_cam``."""
        pairs = [prototype_weight(p, q) for p, q in zip(self.class_prototypes,
                                                        self.context_prototypes)]
        return (torch.stack([w for w, _ in pairs]),
                torch.tensor([relu for _, relu in pairs], dtype=torch.bool))

    def save(self, path) -> None:
        from wsss_fast.io.atomic import atomic_write
        payload = {"format": PROTOTYPES_FORMAT, "version": PROTOTYPES_VERSION,
                   **dataclasses.asdict(self)}
        payload["class_names"] = list(self.class_names)
        with atomic_write(path) as handle:
            torch.save(payload, handle)

    @classmethod
    def load(cls, path) -> "Prototypes":
        try:
            payload = read_torch_file(path, "wsss-fast LPCAM prototypes file",
                                      required=("format", "version"))
        except FileNotFoundError:
            raise ValueError(f"prototypes file not found: {path}") from None
        if not isinstance(payload, dict) or payload.get("format") != PROTOTYPES_FORMAT:
            raise ValueError(f"{path}: not a wsss-fast LPCAM prototypes file")
        if payload.get("version") != PROTOTYPES_VERSION:
            raise ValueError(f"{path}: prototypes file version {payload.get('version')}, "
                             f"expected {PROTOTYPES_VERSION}")
        fields = {f.name for f in dataclasses.fields(cls)}
        prototypes = cls(**{k: v for k, v in payload.items() if k in fields})
        prototypes.class_names = tuple(prototypes.class_names)
        sizes = {len(prototypes.class_names), len(prototypes.class_prototypes),
                 len(prototypes.context_prototypes)}
        dims = {int(t.shape[1]) for t in (*prototypes.class_prototypes,
                                          *prototypes.context_prototypes)}
        if len(sizes) != 1 or len(dims) != 1:
            raise ValueError(f"{path}: inconsistent prototypes (classes {sizes}, dims {dims})")
        return prototypes


# ----------------------------------------------------------------------------- feature bank

def select_pixels(cams: torch.Tensor, grid: tuple[int, int],
                  select_thres: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected, not_selected)`` ``(n, h·w)`` bool masks: the CAMs ``(n, H, W)`` resized to the
    feature grid with nearest sampling (``F.interpolate``'s default), ``> select_thres`` and
    ``< select_thres`` (§1.2)."""
    small = F.interpolate(cams.float()[None], size=tuple(grid), mode="nearest")[0]
    small = small.flatten(1)
    return small > select_thres, small < select_thres


@dataclass
class _BankImage:
    features: torch.Tensor       # (h·w, D) float32
    keys: list                   # classes with masks
    selected: torch.Tensor       # (len(keys), h·w) bool
    not_selected: torch.Tensor


def class_members(dataset, ids: Sequence[str], settings: LpcamSettings) -> list[list[str]]:
    """Per class, the bank images (in ``ids`` order): every image labelled with it, or
    ``images_per_class`` draws with replacement (COCO's ``split_100``: one RandomState, classes
    in order)."""
    labels = {}
    for id in ids:
        sample_labels = dataset.sample(id).labels
        if sample_labels is not None:
            labels[id] = np.asarray(sample_labels) > 0
    rng = np.random.RandomState(settings.sample_seed)
    members = []
    for c in range(dataset.num_classes):
        having = [id for id in ids if id in labels and labels[id][c]]
        if settings.images_per_class is not None and having:
            draws = rng.choice(len(having), settings.images_per_class)
            having = [having[i] for i in draws]
        members.append(having)
    return members


def _class_pool(bank: dict, members: Sequence[str], class_index: int,
                dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    selected, not_selected = [], []
    for id in members:
        entry = bank.get(id)
        if entry is None or class_index not in entry.keys:
            continue
        row = entry.keys.index(class_index)
        selected.append(entry.features[entry.selected[row]])
        not_selected.append(entry.features[entry.not_selected[row]])
    empty = torch.zeros((0, dim))
    return (torch.cat(selected) if selected else empty,
            torch.cat(not_selected) if not_selected else empty)


def _cluster(points: torch.Tensor, settings: LpcamSettings, seed: int,
             device: torch.device) -> tuple[torch.Tensor, int]:
    """Centres ``(min(clusters, N), D)`` on the CPU and the iterations run."""
    if points.shape[0] == 0:
        return points, 0
    result = ops.kmeans(points.to(device), min(settings.clusters, points.shape[0]), seed=seed,
                        max_iter=settings.max_iter, tol=settings.tol)
    return result.centres.cpu(), result.iterations


def _bank_image(engine: CamEngine, item: dict, cams, settings: LpcamSettings) -> "_BankImage":
    """One image's entry of the feature bank: its features and the pixels its CAMs select."""
    from wsss_fast.io.cam_files import check_finite_cams, load_cam_file
    device, model = engine.device, engine.model
    image = load_image(item["image"])
    if cams is not None:
        record = load_cam_file(Path(cams) / f"{item['id']}.npy")
        keys, high_res = [int(k) for k in record.keys], torch.from_numpy(record.high_res)
    else:
        result = engine(image, item["labels"])
        keys = [int(k) for k in result.keys]
        high_res = result.high_res[torch.as_tensor(result.keys, dtype=torch.long)]
        check_finite_cams(f"CAMs of {item['id']}", high_res=high_res)
    x = to_normalized_tensor(image, LPCAM_PRESET.mean, LPCAM_PRESET.std)[None]
    features = model.features(x.to(device))[0].float()
    selected, not_selected = select_pixels(high_res.to(device), features.shape[1:],
                                           settings.select_thres)
    return _BankImage(features.flatten(1).t().contiguous().cpu(), keys, selected.cpu(),
                      not_selected.cpu())


def build_prototypes(model: torch.nn.Module, dataset, *, ids: Optional[Sequence[str]] = None,
                     settings: LpcamSettings = LpcamSettings(), cams: Union[str, Path, None] = None,
                     device: Union[str, torch.device, None] = None, workers: int = 0,
                     progress: bool = False, model_name: Optional[str] = None,
                     checkpoint_sha256: Optional[str] = None) -> Prototypes:
    """LPCAM's prototypes of ``model`` (an IRN-style CAM classifier with ``features()`` and a
    bias-free ``classifier``) from the images ``ids`` of ``dataset`` (default: all).

    ``cams``: a folder of IRN CAM files ``<id>.npy`` to select pixels with (upstream's
    ``cam_mask/``); default: computed here with the "irn_cam" preset (4 scales × flip).
    Images that cannot be read or lack a CAM file are left out of the bank and listed in the
    result's ``settings["skipped"]``.
    """
    from wsss_fast.data.loader import image_loader
    from wsss_fast.io.cam_files import CamFileError

    engine = CamEngine(model, "irn_cam", device=device)
    model = engine.model
    ids = list(dataset.ids if ids is None else ids)
    members = class_members(dataset, ids, settings)
    needed = sorted({id for ids_c in members for id in ids_c})
    bank: dict[str, _BankImage] = {}
    skipped: dict[str, str] = {}
    loader = iter(image_loader(dataset, needed, workers=workers))
    bar = tqdm(loader, total=len(needed), desc="LPCAM feature bank", unit="img",
               disable=not progress, file=sys.stderr)
    try:
        with torch.no_grad():
            for item in bar:
                if item["error"] is not None:
                    skipped[item["id"]] = item["error"]
                    continue
                try:
                    entry = _bank_image(engine, item, cams, settings)
                except Exception as error:   # one image (too large, NaN CAMs) never stops it
                    if cams is not None and isinstance(error, (CamFileError, OSError)):
                        reason = f"no usable CAM file: {error}"
                    elif isinstance(error, ValueError):
                        reason = str(error)
                    else:
                        reason = f"{type(error).__name__}: {error}"
                    skipped[item["id"]] = reason
                else:
                    bank[item["id"]] = entry
    finally:   # an interrupt: stop the decoding workers now
        getattr(loader, "_shutdown_workers", lambda: None)()
    if not bank:
        raise ValueError(f"no usable image for the LPCAM feature bank ({len(skipped)} skipped, "
                         f"e.g. {next(iter(skipped.items()), None)})")
    dim = next(iter(bank.values())).features.shape[1]
    weight = model.classifier.weight.detach().flatten(1).float().cpu()
    class_protos, context_protos, diagnostics = [], [], []
    for c, name in enumerate(dataset.class_names):
        fg, bg = _class_pool(bank, members[c], c, dim)
        fg_centres, fg_iterations = _cluster(fg, settings, settings.seed + 2 * c, device)
        bg_centres, bg_iterations = _cluster(bg, settings, settings.seed + 2 * c + 1, device)
        choice = select_prototypes(fg_centres, bg_centres, weight, c,
                                   class_thres=settings.class_thres,
                                   context_thres=settings.context_thres,
                                   context_thres_low=settings.context_thres_low,
                                   class_fallback=settings.class_fallback)
        class_protos.append(choice.class_prototypes.contiguous())
        context_protos.append(choice.context_prototypes.contiguous())
        diagnostics.append({
            "class": name, "images": len(members[c]), "selected_pixels": int(fg.shape[0]),
            "other_pixels": int(bg.shape[0]), "fg_iterations": fg_iterations,
            "bg_iterations": bg_iterations, "class_scores": choice.class_scores.tolist(),
            "context_scores": choice.context_scores.tolist(),
            "class_prototypes": int(choice.class_prototypes.shape[0]),
            "context_prototypes": int(choice.context_prototypes.shape[0]),
            "fallback": choice.fallback})
    recorded = {**dataclasses.asdict(settings), "bank_images": len(bank),
                "skipped": dict(sorted(skipped.items())),
                "cams": None if cams is None else str(Path(cams).resolve())}
    return Prototypes(tuple(dataset.class_names), class_protos, context_protos, recorded,
                      model=model_name, checkpoint_sha256=checkpoint_sha256,
                      diagnostics=diagnostics)


# ----------------------------------------------------------------------------- heatmaps

def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def aggregate_scales(maps: Sequence[torch.Tensor], height: int,
                     width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high_res (n, H, W), low_res (n, ⌈H/4⌉, ⌈W/4⌉))`` from per-scale maps ``(n, h_s, w_s)``:
    bilinear to ``⌈H/4⌉×⌈W/4⌉`` / to ``16⌈H/16⌉×16⌈W/16⌉`` then cropped, mean over scales,
    divided by each map's maximum (a map with maximum 0 stays 0)."""
    batch = [m.float()[None] for m in maps]
    low_size = (_ceil_div(height, LOW_RES_STRIDE), _ceil_div(width, LOW_RES_STRIDE))
    up_size = (_ceil_div(height, OUTPUT_STRIDE) * OUTPUT_STRIDE,
               _ceil_div(width, OUTPUT_STRIDE) * OUTPUT_STRIDE)
    low = ops.multiscale_merge(batch, low_size)[0] / len(maps)
    high = ops.multiscale_merge(batch, up_size)[0][:, :height, :width] / len(maps)

    def by_max(x: torch.Tensor) -> torch.Tensor:
        peak = x.amax(dim=(1, 2), keepdim=True)
        return torch.where(peak != 0, x / torch.where(peak != 0, peak, 1.0), 0.0)

    return by_max(high), by_max(low)


class LpcamEngine(CamEngine):
    """LPCAM heatmaps of an IRN CAM classifier under its prototypes (the ``CamEngine``
    interface, so ``wsss-fast extract --method lpcam`` reuses the extraction machinery).

    >>> engine = LpcamEngine(model, Prototypes.load("prototypes.pt"))
    >>> result = engine("2008_000101.jpg", labels)
    """

    def __init__(self, model: torch.nn.Module, prototypes: Prototypes, *,
                 device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, **overrides):
        """``overrides``: ``scales=``, ``flip=`` of the passes; ``dtype``: autocast of the
        backbone (the heatmap is computed in fp32)."""
        if not hasattr(model, "features") or not hasattr(model, "classifier"):
            raise ValueError(f"LPCAM needs an IRN-style CAM classifier with features() and a "
                             f"classifier, got {type(model).__name__}")
        super().__init__(model, LPCAM_PRESET, device=device, dtype=dtype, **overrides)
        classes, dim = model.classifier.weight.shape[:2]
        if len(prototypes.class_names) != classes or prototypes.feature_dim != dim:
            raise ValueError(f"the prototypes ({len(prototypes.class_names)} classes, D = "
                             f"{prototypes.feature_dim}) do not fit the model ({classes} classes,"
                             f" D = {dim})")
        weight, relu = prototypes.weights()
        self.weight, self.relu = weight.to(self.device), relu.to(self.device)

    def _keys(self, labels) -> torch.Tensor:
        return torch.nonzero(self._labels(labels, self.weight.shape[0]) > 0).flatten()

    def _zeros(self, size: tuple[int, int], keys: torch.Tensor) -> CamResult:
        width, height = size
        low_size = (_ceil_div(height, LOW_RES_STRIDE), _ceil_div(width, LOW_RES_STRIDE))
        num_classes = self.weight.shape[0]
        return CamResult(keys=keys.cpu().numpy(),
                         high_res=self.weight.new_zeros((num_classes, height, width)),
                         low_res=self.weight.new_zeros((num_classes, *low_size)))

    def result_without_forward(self, size, labels) -> Optional[CamResult]:
        """Images without a present class: all-zero maps, no forward pass."""
        keys = self._keys(labels)
        return self._zeros(size, keys) if keys.numel() == 0 else None

    def forward_pass(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.features(batch).float()

    def pass_maps(self, outputs: torch.Tensor, labels: Sequence) -> list:
        """Per image, the prototype heatmap ``(n, h, w)`` of its present classes at this pass."""
        passes = outputs.shape[0] // len(labels)
        maps = []
        for slot, image_labels in enumerate(labels):
            keys = self._keys(image_labels)
            f = outputs[slot * passes]
            if passes == 2:     # LPCAM sums the features of the image and its flip
                f = f + outputs[slot * passes + 1].flip(-1)
            maps.append(prototype_cam(f, self.weight[keys], self.relu[keys]))
        return maps

    def merge_passes(self, passes: list, size: tuple[int, int], labels) -> CamResult:
        """Mean over scales, max-normalized (``aggregate_scales``); absent classes stay 0, as in
        ``CamEngine``'s results."""
        keys = self._keys(labels)
        result = self._zeros(size, keys)
        width, height = size
        result.high_res[keys], result.low_res[keys] = aggregate_scales(passes, height, width)
        return result
