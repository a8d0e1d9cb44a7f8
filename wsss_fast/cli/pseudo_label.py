"""Turn CAM files into pseudo-label PNGs (VOC palette; 0 = background, 255 = ignore).

Rules (reference cnn_methods_postprocessing.md §3d):
  constant   argmax over [τ; CAMs] (IRN eval_cam, LPCAM, ReCAM, AMN); with --crf irn the
             TransCAM / PSA CRF seed (label CRF of that argmax)
  power      background (1 − max CAM)^α; with --crf psa|edam the probability CRF (PSA, EDAM)
  confident  IRN's confident regions: label CRFs at --fg-threshold and --bg-threshold, 255 between
CRFs run in --workers processes. Rerunning resumes; --overlays also writes colour overlays.

  wsss-fast pseudo-label --data VOC2012 --cams cams_v2/cams --out seeds --rule confident
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from wsss_fast.cli.common import (UsageError, add_dataset_arguments, add_runtime_arguments,
                                  finish_run, item_path, open_dataset_from,
                                  record_job_results, report_problems, require,
                                  validate_label_png)

RULES = ("constant", "power", "confident")
CRFS = ("none", "irn", "psa", "edam")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--cams", help="folder of CAM files (<id>.npy, irn or mctformer format)")
    parser.add_argument("--out", help="output folder for <id>.png labels")
    parser.add_argument("--rule", default="constant", choices=RULES)
    parser.add_argument("--threshold", type=float, default=0.15,
                        help="constant background τ (default 0.15, IRN's cam_eval_thres)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="power background α (default: the CRF preset's, else 16)")
    parser.add_argument("--fg-threshold", type=float, default=0.30, help="confident: τ_fg")
    parser.add_argument("--bg-threshold", type=float, default=0.05, help="confident: τ_bg")
    parser.add_argument("--crf", default="none", choices=CRFS,
                        help="dense CRF preset (confident needs a label CRF: irn)")
    parser.add_argument("--overlays", action="store_true", help="also write colour overlays")
    add_runtime_arguments(parser, device=False)


def _rule_options(args) -> dict:
    if args.rule == "confident" and args.crf not in ("irn",):
        raise UsageError("--rule confident runs label CRFs: use --crf irn")
    if args.rule == "constant" and args.crf not in ("none", "irn"):
        raise UsageError("--rule constant takes --crf none or irn (a label CRF)")
    if args.rule == "power" and args.crf == "irn":
        raise UsageError("--rule power takes --crf none, psa or edam (a probability CRF)")
    return {"rule": args.rule, "threshold": args.threshold, "alpha": args.alpha,
            "fg_threshold": args.fg_threshold, "bg_threshold": args.bg_threshold,
            "crf": args.crf, "num_classes": None}


def make_label(image, cams, keys, options: dict) -> np.ndarray:
    """The pseudo-label of one image under ``options`` (see ``_rule_options``)."""
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
    reason the item was skipped."""
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
    write_label_png(outputs["label"], label)
    if "overlay" in outputs:
        save_rgb_png(outputs["overlay"], label_overlay(image, label))
    return None


def run(args: argparse.Namespace) -> int:
    from wsss_fast.distributed import close, init_ranks, shard
    from wsss_fast.io.run_state import RunState
    from wsss_fast.workers import run_in_workers
    require(args, "data", "cams", "out")
    options = _rule_options(args)
    cams_dir, out = Path(args.cams), Path(args.out)
    if not cams_dir.is_dir():
        raise UsageError(f"--cams {cams_dir}: not a folder")
    context = init_ranks("cpu")
    try:
        dataset = open_dataset_from(args)
        options["num_classes"] = len(dataset.class_names)
        config = {**options, "cams": str(cams_dir.resolve()), "dataset": dataset.name,
                  "overlays": args.overlays}
        state = RunState(out, "pseudo-label", config, rank=context.rank, world=context.world,
                         overwrite=args.overwrite)
        if context.is_main:
            report_problems(dataset, state)

        def outputs(item):
            paths = {"label": item_path(out / "labels", item, ".png")}
            if args.overlays:
                paths["overlay"] = item_path(out / "overlays", item, ".png")
            return paths

        ids = shard(dataset.ids, context.rank, context.world)
        state.counts["assigned"] = len(ids)
        todo = []
        for item in ids:
            if state.is_finished(item, outputs(item), validate=validate_label_png):
                state.counts["already_done"] += 1
            else:
                todo.append(item)
        jobs = [(item, str(item_path(cams_dir, item, ".npy")),
                 dataset.sample(item).image_path, outputs(item), options) for item in todo]
        results = run_in_workers(label_job, jobs, workers=args.workers,
                                 progress=not args.quiet, desc=f"pseudo-label[{context.rank}]")
        record_job_results(state, todo, results, outputs)
        return finish_run("pseudo-label", state, context)
    finally:
        close(context)
