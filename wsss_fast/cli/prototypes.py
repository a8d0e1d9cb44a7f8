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
import sys
from pathlib import Path

from wsss_fast.options import add_options_arguments, options_from_args
from wsss_fast.pipeline.prototypes import PrototypesOptions, build_prototypes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options_arguments(parser, PrototypesOptions)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(PrototypesOptions, args)
    prototypes = build_prototypes(options)
    _print_summary(prototypes, Path(options.out))
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
