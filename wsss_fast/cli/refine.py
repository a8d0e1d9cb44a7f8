"""Refine CAMs into pseudo-labels by an affinity random walk (IRN or PSA, DESIGN §3.5).

  irn  the stride-4 CAMs (the `cam` entry of irn-format CAM files) walk over the path-max
       affinity of a boundary map (β 10, 256 steps), then ×4 upsampling, global-max
       normalization and a constant background plane (--bg-threshold 0.25).
  psa  the full-resolution CAMs with a (1 − max)^α background walk at stride 8 over a feature
       affinity (β 8, 256 steps).
The boundary map comes from a trained IRNet (--irn-checkpoint FILE from `train --method irn`:
IRN's padded, flip-averaged single-scale inference), from maps made elsewhere (--edges DIR of
<id>.npy in [0,1] at stride 4; PSA: --features DIR of <id>.npy, C×⌈H/8⌉×⌈W/8⌉), or, without
either, from image gradients / the image's colours (a weaker, training-free substitute).

  wsss-fast refine --data VOC2012 --cams cams_v2/cams --out rw_labels --preset irn \
      --irn-checkpoint runs/irn/checkpoint.pth
"""

from __future__ import annotations

import argparse

from wsss_fast.cli.common import print_summary
from wsss_fast.options import add_options_arguments, options_from_args
from wsss_fast.pipeline.refine import RefineOptions, refine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options_arguments(parser, RefineOptions)


def run(args: argparse.Namespace) -> int:
    return print_summary("refine", refine(options_from_args(RefineOptions, args)))
