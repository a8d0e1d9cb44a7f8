"""Evaluate CAMs (background-threshold sweep) or label PNGs against the ground truth.

CAM mode (--cams): every threshold τ of the sweep (default SEAM's 0.00..0.59) is evaluated exactly
in one pass; prints the per-class table at the best τ, writes OUT/evaluation.json, .md and the
curve OUT/sweep.png. Label mode (--pred): the confusion matrix of the PNGs (255 counted as
background, as IRN's eval_sem_seg does; --ignore-pred-255 leaves those pixels out instead).
mIoU rules: nanmean (IRN/chainercv, default), mean (SEAM/MCTformer), present (ToCo).

  wsss-fast evaluate --data VOC2012 --split train --cams cams_v2/cams --out eval_v2
"""

from __future__ import annotations

import argparse
import sys

from wsss_fast.options import add_options_arguments, options_from_args
from wsss_fast.pipeline.evaluate import EvaluateOptions, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options_arguments(parser, EvaluateOptions)


def run(args: argparse.Namespace) -> int:
    result = evaluate(options_from_args(EvaluateOptions, args))
    print(result.headline)
    print(result.table)
    missing = result.no_ground_truth
    if missing:
        print(f"warning: {len(missing)} images without ground truth were left out (listed in "
              f"evaluation.json as no_ground_truth); first: {', '.join(missing[:5])}",
              file=sys.stderr)
    skipped = result.report["skipped"]
    if skipped:
        print(f"warning: {len(skipped)} images without a usable prediction were left out "
              f"(listed in evaluation.json); first: {skipped[0]['id']}: {skipped[0]['reason']}",
              file=sys.stderr)
    return result.exit_status
