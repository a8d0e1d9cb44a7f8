"""Extract CAMs of a dataset (multi-scale, flipped, resumable, sharded under torchrun).

Writes one CAM file per image into OUT/cams/ (IRN's {keys, cam, high_res} dict by default, or
MCTformer's {class: map}), optional JET overlays into OUT/overlays/, and OUT/manifest-extract.json.
Images that cannot be used (unreadable, no image-level labels, too small for the model) are
skipped, listed in the manifest, and do not stop the run. Rerunning the same command resumes.

  wsss-fast extract --data VOC2012 --split train --model mctformer_v2 \\
      --checkpoint MCTformer_v2.pth --out cams_v2
  torchrun --nproc_per_node 4 -m wsss_fast extract ...      # one shard (and GPU) per rank
  wsss-fast extract --method lpcam --prototypes prototypes.pt --model resnet50_cam ...
"""

from __future__ import annotations

import argparse

from wsss_fast.cli.common import print_summary
from wsss_fast.options import add_options_arguments, options_from_args
from wsss_fast.pipeline.extract import ExtractOptions, extract


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options_arguments(parser, ExtractOptions)


def run(args: argparse.Namespace) -> int:
    return print_summary("extract", extract(options_from_args(ExtractOptions, args)))
