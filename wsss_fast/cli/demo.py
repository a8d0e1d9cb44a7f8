"""The end-to-end demo on the built-in synthetic benchmark (the README's main command).

Generates the data, trains a small model for every method (token CAM, MCTformer-V1/V2,
MCTformer-V2 trained with DOEI, TransCAM, BNR, LPCAM, EDAM; plus DOEI at inference over
MCTformer-V2's checkpoint), extracts and evaluates CAM seeds, makes
pseudo-labels with the CRF and the random walk, and writes OUT/report.md with the table, the
sweep curves (sweep_curves.png), an overlay gallery (gallery.png) and each row's step times.
Resumable.

  wsss-fast demo                  # the full demo (~17 min on 2 idle CPU cores)
  wsss-fast demo --quick          # a small smoke version (CI)
  wsss-fast demo --from-scratch   # every model from random weights, not the shipped backbones
  wsss-fast demo --gradient-rw    # +RW over image-gradient edges, no IRNet (faster)
  wsss-fast demo --jobs 1         # rows one after another (default: 2 at once on >= 2 cores)
"""

from __future__ import annotations

import argparse

from wsss_fast.options import (argparse_type, device_name, positive_int, seed_int, text,
                               worker_count)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from wsss_fast.demo import DEMO_METHODS
    parser.add_argument("--out", type=argparse_type(text), default="demo_out",
                        help="output folder (default demo_out)")
    parser.add_argument("--quick", action="store_true", help="small data and short training")
    parser.add_argument("--seed", type=argparse_type(seed_int), default=0)
    parser.add_argument("--workers", type=argparse_type(worker_count), default=2)
    parser.add_argument("--device", type=argparse_type(device_name), default="cpu")
    parser.add_argument("--jobs", type=argparse_type(positive_int), default=None,
                        help="rows run at once, in worker processes that split the cores and "
                        "--workers between them (default: 2 where there are >= 2 cores; 1: one "
                        "row after another in this process)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                       help="start every model from the shipped backbone of its family, "
                       "pretrained on the procedural source domain (pretrained/*.pt; the default)")
    start.add_argument("--from-scratch", dest="pretrained", action="store_false",
                       help="train every model from random weights instead (for comparison)")
    walk = parser.add_mutually_exclusive_group()
    walk.add_argument("--learned-rw", dest="learned_rw", action="store_true", default=True,
                      help="+RW of the strong rows (demo.LEARNED_RW) walks over the boundaries "
                      "of one IRNet, trained on the first such row's confident regions, then "
                      "IRN's label CRF (the default)")
    walk.add_argument("--gradient-rw", "--no-learned-rw", dest="learned_rw",
                      action="store_false",
                      help="+RW over image-gradient edges instead (no IRNet training)")
    parser.add_argument("--methods", nargs="+", default=list(DEMO_METHODS),
                        choices=DEMO_METHODS, help="subset of methods (default: all)")


def run(args: argparse.Namespace) -> int:
    from wsss_fast.demo import run_demo
    run_demo(args.out, quick=args.quick, seed=args.seed, workers=args.workers,
             device=args.device, methods=args.methods, pretrained=args.pretrained,
             learned_rw=args.learned_rw, jobs=args.jobs)
    return 0
