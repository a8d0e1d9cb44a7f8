"""Build LPCAM's class and context prototypes of a trained IRN CAM classifier (one file).

Feature bank of the split's images (layer4 features at scale 1.0; pixels selected by the
model's IRN CAMs, computed here or read with --cams), per-class cosine k-means, prototypes chosen
by the classifier's softmax scores. Defaults follow upstream for VOC (K = 12) and COCO (K = 20,
100 images per class); --settings picks them (auto: by the dataset), options override them.
Use the file with `wsss-fast extract --method lpcam --prototypes FILE`.

  wsss-fast prototypes --data VOC2012 --split train --model resnet50_cam \\
      --checkpoint res50_cam.pth --out prototypes.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from wsss_fast.cli.common import (UsageError, add_dataset_arguments, add_runtime_arguments,
                                  open_dataset_from, require)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from wsss_fast.engine.lpcam import CLASS_FALLBACKS, LPCAM_SETTINGS
    add_dataset_arguments(parser)
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="registered IRN CAM model (resnet50_cam, resnet_cam_tiny)")
    group.add_argument("--checkpoint", help="trained weights (architecture read from them)")
    group.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="architecture argument not readable from the weights (repeatable)")
    group = parser.add_argument_group("LPCAM (defaults: --settings)")
    group.add_argument("--settings", default="auto", choices=("auto", *LPCAM_SETTINGS),
                       help="upstream defaults to start from (auto: coco for COCO, else voc)")
    group.add_argument("--clusters", type=int, help="k-means clusters per pool (VOC 12, COCO 20)")
    group.add_argument("--select-thres", type=float, help="CAM threshold selecting object pixels")
    group.add_argument("--class-thres", type=float, help="class prototypes: softmax score above")
    group.add_argument("--context-thres", type=float, help="context prototypes: score below")
    group.add_argument("--context-thres-low", type=float, help="context prototypes: score above")
    group.add_argument("--tol", type=float, help="k-means stop: (sum of centre shifts)² < tol")
    group.add_argument("--max-iter", type=int, help="k-means iteration cap (default 100)")
    group.add_argument("--images-per-class", type=int,
                       help="draw this many images per class with replacement (COCO: 100)")
    group.add_argument("--class-fallback", choices=CLASS_FALLBACKS,
                       help="no centre passes --class-thres: take the best one (argmax, "
                       "default) or leave the class without prototypes (none)")
    group.add_argument("--seed", type=int, help="seed of the k-means initial centres (default 0)")
    group.add_argument("--cams", metavar="DIR", help="IRN CAM files of the split to select "
                       "pixels with (default: computed with the irn-cam preset)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="FILE", help="prototypes file to write (.pt)")
    add_runtime_arguments(parser)


def resolve_settings(args: argparse.Namespace, dataset_name: str):
    """The LPCAM settings of ``--settings`` with the options given on the command line."""
    from wsss_fast.engine.lpcam import LPCAM_SETTINGS
    base = args.settings if args.settings != "auto" else (
        "coco" if dataset_name == "coco" else "voc")
    overrides = {name: getattr(args, name) for name in (
        "clusters", "select_thres", "class_thres", "context_thres", "context_thres_low", "tol",
        "max_iter", "images_per_class", "class_fallback", "seed")
        if getattr(args, name) is not None}
    try:
        return dataclasses.replace(LPCAM_SETTINGS[base], **overrides)
    except ValueError as error:
        raise UsageError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    from wsss_fast.engine.lpcam import build_prototypes
    from wsss_fast.cli.extract import parse_model_args
    from wsss_fast.distributed import resolve_device
    from wsss_fast.io.run_state import file_digest
    from wsss_fast.models.registry import create_model

    require(args, "data", "model", "checkpoint", "out")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {out} exists; pass --overwrite to rebuild it")
    if args.cams is not None and not Path(args.cams).is_dir():
        raise UsageError(f"--cams {args.cams}: not a folder")
    dataset = open_dataset_from(args)
    settings = resolve_settings(args, dataset.name)
    model = create_model(args.model, num_classes=dataset.num_classes,
                         checkpoint=args.checkpoint, **parse_model_args(args.model_arg))
    start = time.perf_counter()
    prototypes = build_prototypes(model, dataset, settings=settings, cams=args.cams,
                                  device=resolve_device(args.device), workers=args.workers,
                                  progress=not args.quiet, model_name=args.model,
                                  checkpoint_sha256=file_digest(args.checkpoint))
    prototypes.settings["seconds"] = round(time.perf_counter() - start, 3)
    prototypes.save(out)
    _print_summary(prototypes, out)
    return 0


def _print_summary(prototypes, out: Path) -> None:
    print(f"wsss-fast prototypes: {out} ({prototypes.settings['bank_images']} bank images, "
          f"{len(prototypes.settings['skipped'])} skipped, "
          f"{prototypes.settings['seconds']:.1f} s)", file=sys.stderr)
    for entry in prototypes.diagnostics:
        note = " (fallback: best centre)" if entry["fallback"] else ""
        print(f"  {entry['class']}: {entry['class_prototypes']} class / "
              f"{entry['context_prototypes']} context prototypes from "
              f"{entry['selected_pixels']} / {entry['other_pixels']} pixels{note}",
              file=sys.stderr)
