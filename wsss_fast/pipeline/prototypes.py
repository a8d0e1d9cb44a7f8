"""``build_prototypes``: LPCAM's class and context prototypes of a trained IRN CAM classifier.

Feature bank of the split's images (layer4 features at scale 1.0; pixels selected by the model's
IRN CAMs, computed here or read from ``cams``), per-class cosine k-means, prototypes chosen by
the classifier's softmax scores. Defaults follow upstream for VOC (K = 12) and COCO (K = 20, 100
images per class); ``settings`` picks them (auto: by the dataset), the other options override
them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wsss_fast.engine.lpcam import CLASS_FALLBACKS, LPCAM_SETTINGS
from wsss_fast.options import (device_name, nonneg_float, positive_int, probability, seed_int,
                               worker_count)
from wsss_fast.pipeline.errors import InputError, OptionsError
from wsss_fast.pipeline.options import (DatasetOptions, open_dataset_of, option,
                                        parse_key_values, path_or_none, require)

_LPCAM = "LPCAM (default: --settings)"
# The fields of LpcamSettings that an option may override (None: the --settings value).
SETTING_NAMES = ("clusters", "select_thres", "class_thres", "context_thres", "context_thres_low",
                 "tol", "max_iter", "images_per_class", "class_fallback", "seed")


@dataclass
class PrototypesOptions(DatasetOptions):
    model: Optional[str] = option(None, "registered IRN CAM model (resnet50_cam, "
                                  "resnet_cam_tiny)", group="model")
    checkpoint: Optional[str] = option(None, "trained weights (architecture read from them)",
                                       group="model")
    model_args: dict = option(help="architecture argument not readable from the weights "
                              "(repeatable)", flag="--model-arg", repeat=True,
                              metavar="KEY=VALUE", group="model", default_factory=dict)
    settings: str = option("auto", "upstream defaults to start from (auto: coco for COCO, else "
                           "voc)", choices=("auto", *LPCAM_SETTINGS), group=_LPCAM)
    clusters: Optional[int] = option(None, "k-means clusters per pool (VOC 12, COCO 20)",
                                     group=_LPCAM, check=positive_int)
    select_thres: Optional[float] = option(None, "CAM threshold selecting object pixels",
                                           group=_LPCAM, check=probability)
    class_thres: Optional[float] = option(None, "class prototypes: softmax score above",
                                          group=_LPCAM, check=probability)
    context_thres: Optional[float] = option(None, "context prototypes: score below",
                                            group=_LPCAM, check=probability)
    context_thres_low: Optional[float] = option(None, "context prototypes: score above",
                                                group=_LPCAM, check=probability)
    tol: Optional[float] = option(None, "k-means stop: (sum of centre shifts)² < tol",
                                  group=_LPCAM, check=nonneg_float)
    max_iter: Optional[int] = option(None, "k-means iteration cap (default 100)", group=_LPCAM,
                                     check=positive_int)
    images_per_class: Optional[int] = option(None, "draw this many images per class with "
                                             "replacement (COCO: 100)", group=_LPCAM,
                                             check=positive_int)
    class_fallback: Optional[str] = option(None, "no centre passes --class-thres: take the "
                                           "best one (argmax, default) or leave the class "
                                           "without prototypes (none)",
                                           choices=CLASS_FALLBACKS, group=_LPCAM)
    seed: Optional[int] = option(None, "seed of the k-means initial centres (default 0)",
                                 group=_LPCAM, check=seed_int)
    cams: Optional[str] = option(None, "IRN CAM files of the split to select pixels with "
                                 "(default: computed with the irn_cam preset)", metavar="DIR",
                                 group=_LPCAM)
    out: Optional[str] = option(None, "prototypes file to write (.pt)", metavar="FILE",
                                group="output")
    device: str = option("auto", "cpu, cuda, cuda:N or auto", group="runtime",
                         check=device_name)
    workers: int = option(2, "worker processes for image decoding (0 = in the main process)",
                          group="runtime", check=worker_count)
    overwrite: bool = option(False, "replace an existing prototypes file", group="runtime")
    quiet: bool = option(False, "no progress bar", group="runtime")

    def __post_init__(self):
        super().__post_init__()
        self.model_args = parse_key_values(self.model_args, "--model-arg")
        for name in ("checkpoint", "cams", "out"):
            setattr(self, name, path_or_none(getattr(self, name)))


def resolve_settings(options: PrototypesOptions, dataset_name: str):
    """The LPCAM settings of ``options.settings`` with the options given."""
    base = options.settings if options.settings != "auto" else (
        "coco" if dataset_name == "coco" else "voc")
    overrides = {name: getattr(options, name) for name in SETTING_NAMES
                 if getattr(options, name) is not None}
    try:
        return dataclasses.replace(LPCAM_SETTINGS[base], **overrides)
    except ValueError as error:
        raise OptionsError(str(error)) from error


def build_prototypes(options: PrototypesOptions):
    """Build and save the prototypes file ``options.out``; returns the ``Prototypes``."""
    from wsss_fast.engine.lpcam import build_prototypes as build
    from wsss_fast.distributed import resolve_device
    from wsss_fast.io.run_state import file_digest
    from wsss_fast.pipeline.extract import load_model

    require(options, "data", "model", "checkpoint", "out")
    out = Path(options.out)
    if out.exists() and not options.overwrite:
        raise OptionsError(f"--out {out} exists; pass --overwrite to rebuild it")
    if options.cams is not None and not Path(options.cams).is_dir():
        raise InputError(f"--cams {options.cams}: not a folder")
    dataset = open_dataset_of(options)
    settings = resolve_settings(options, dataset.name)
    model = load_model(options.model, dataset.num_classes, options.checkpoint,
                       options.model_args)
    start = time.perf_counter()
    prototypes = build(model, dataset, settings=settings, cams=options.cams,
                       device=resolve_device(options.device), workers=options.workers,
                       progress=not options.quiet, model_name=options.model,
                       checkpoint_sha256=file_digest(options.checkpoint))
    prototypes.settings["seconds"] = round(time.perf_counter() - start, 3)
    prototypes.save(out)
    return prototypes
