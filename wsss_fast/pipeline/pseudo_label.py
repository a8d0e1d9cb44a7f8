"""``pseudo_label``: CAM files → pseudo-label PNGs (VOC palette; 0 = background, 255 = ignore).

Rules (reference cnn_methods_postprocessing.md §3d):
  constant   argmax over [τ; CAMs] (IRN eval_cam, LPCAM, ReCAM, AMN); with crf irn the
             TransCAM / PSA CRF seed (label CRF of that argmax)
  power      background (1 − max CAM)^α; with crf psa|edam the probability CRF (PSA, EDAM)
  confident  IRN's confident regions: label CRFs at fg_threshold and bg_threshold, 255 between
CRFs run in ``workers`` processes; rerunning resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from wsss_fast.pipeline.errors import InputError, OptionsError
from wsss_fast.pipeline.job import (JobResult, JobSpec, item_path, run_dataset_job,
                                    validate_label_png, worker_work, write_outputs)
from wsss_fast.options import positive_float, probability, worker_count
from wsss_fast.pipeline.options import DatasetOptions, option, path_or_none, require

RULES = ("constant", "power", "confident")
CRFS = ("none", "irn", "psa", "edam")


@dataclass
class PseudoLabelOptions(DatasetOptions):
    cams: Optional[str] = option(None, "folder of CAM files (<id>.npy, irn or mctformer format)")
    out: Optional[str] = option(None, "output folder for <id>.png labels")
    rule: str = option("constant", choices=RULES)
    threshold: float = option(0.15, "constant background τ (IRN's cam_eval_thres)",
                              check=probability)
    alpha: Optional[float] = option(None, "power background α (default: the CRF preset's, "
                                    "else 16)", check=positive_float)
    fg_threshold: float = option(0.30, "confident: τ_fg", check=probability)
    bg_threshold: float = option(0.05, "confident: τ_bg", check=probability)
    crf: str = option("none", "dense CRF preset (confident needs a label CRF: irn)",
                      choices=CRFS)
    overlays: bool = option(False, "also write colour overlays")
    workers: int = option(2, "worker processes for the CRFs (0 = in the main process)",
                          group="runtime", check=worker_count)
    overwrite: bool = option(False, "redo every item and replace existing outputs (default: "
                             "resume, skipping finished items)", group="runtime")
    quiet: bool = option(False, "no progress bar", group="runtime")

    def __post_init__(self):
        super().__post_init__()
        self.cams, self.out = path_or_none(self.cams), path_or_none(self.out)


def rule_options(options: PseudoLabelOptions) -> dict:
    """The labeling rule of ``options`` as the dict ``make_label`` takes (``num_classes`` is
    filled in from the dataset)."""
    if options.rule == "confident" and options.crf not in ("irn",):
        raise OptionsError("--rule confident runs label CRFs: use --crf irn")
    if options.rule == "constant" and options.crf not in ("none", "irn"):
        raise OptionsError("--rule constant takes --crf none or irn (a label CRF)")
    if options.rule == "power" and options.crf == "irn":
        raise OptionsError("--rule power takes --crf none, psa or edam (a probability CRF)")
    return {"rule": options.rule, "threshold": options.threshold, "alpha": options.alpha,
            "fg_threshold": options.fg_threshold, "bg_threshold": options.bg_threshold,
            "crf": options.crf, "num_classes": None}


def make_label(image, cams, keys, options: dict) -> np.ndarray:
    """The pseudo-label of one image under ``options`` (see ``rule_options``)."""
    from wsss_fast.postprocess import pseudo_label as rules
    rule, crf = options["rule"], options["crf"]
    if rule == "constant":
        if crf == "none":
            return rules.constant_background(cams, keys, options["threshold"])
        return rules.crf_seed(image, cams, keys, options["threshold"], crf,
                              num_classes=options["num_classes"])
    if rule == "power":
        alpha = options["alpha"]
        if crf == "none":
            stack = rules.power_background(cams, 16.0 if alpha is None else alpha)
            lut = np.concatenate([[0], np.asarray(keys) + 1]).astype(np.uint8)
            return lut[np.argmax(stack, axis=0)]
        return rules.power_background_crf(image, cams, keys, alpha, crf)
    return rules.confident_regions(image, cams, keys, options["fg_threshold"],
                                   options["bg_threshold"], crf)


def label_job(item: str, cam_path: str, image_path: str, outputs: dict, options: dict):
    """One image, in a worker process: read, label, write atomically. Returns None or the
    reason the item was skipped (non-finite CAM files included: ``load_cam_file`` refuses
    them)."""
    from wsss_fast.data.images import ImageDecodeError, read_image, write_label_png
    from wsss_fast.io.cam_files import CamFileError, load_cam_file
    from wsss_fast.io.overlays import label_overlay, save_rgb_png
    if not Path(cam_path).exists():
        return f"no CAM file {cam_path}"
    try:
        record = load_cam_file(cam_path)
        image = read_image(image_path)
    except (CamFileError, ImageDecodeError) as error:
        return str(error)
    cams = record.high_res
    if record.keys.size == 0:
        cams = np.zeros((0,) + image.shape[:2], np.float32)
    if cams.shape[1:] != image.shape[:2]:
        return f"CAM size {cams.shape[1:]} differs from the image size {image.shape[:2]}"
    try:
        label = make_label(image, cams, record.keys, options)
    except ValueError as error:
        return str(error)
    def publish():
        write_label_png(outputs["label"], label)
        if "overlay" in outputs:
            save_rgb_png(outputs["overlay"], label_overlay(image, label))
    write_outputs(publish, outputs["label"])   # an unwritable folder stops the run
    return None


def pseudo_label(options: PseudoLabelOptions) -> JobResult:
    """Pseudo-label PNGs of the CAM files in ``options.cams`` into ``options.out/labels``."""
    require(options, "data", "cams", "out")
    rule = rule_options(options)
    cams_dir, out = Path(options.cams), Path(options.out)
    if not cams_dir.is_dir():
        raise InputError(f"--cams {cams_dir}: not a folder")

    def outputs(item):
        paths = {"label": item_path(out / "labels", item, ".png")}
        if options.overlays:
            paths["overlay"] = item_path(out / "overlays", item, ".png")
        return paths

    def setup(dataset, context) -> JobSpec:
        settings = {**rule, "num_classes": len(dataset.class_names)}
        config = {**settings, "cams": str(cams_dir.resolve()), "dataset": dataset.name,
                  "overlays": options.overlays}
        work = worker_work(
            label_job, lambda item: (item, str(item_path(cams_dir, item, ".npy")),
                                     dataset.sample(item).image_path, outputs(item), settings),
            outputs, workers=options.workers, progress=not options.quiet,
            desc=f"pseudo-label[{context.rank}]")
        return JobSpec(config=config, outputs=outputs, work=work, validate=validate_label_png)

    return run_dataset_job("pseudo-label", options, out, setup, device="cpu",
                           overwrite=options.overwrite)
