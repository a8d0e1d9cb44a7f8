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

from wsss_fast.cli.common import print_summary
from wsss_fast.options import add_options_arguments, options_from_args
from wsss_fast.pipeline.pseudo_label import PseudoLabelOptions, pseudo_label


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options_arguments(parser, PseudoLabelOptions)


def run(args: argparse.Namespace) -> int:
    return print_summary("pseudo-label",
                         pseudo_label(options_from_args(PseudoLabelOptions, args)))
