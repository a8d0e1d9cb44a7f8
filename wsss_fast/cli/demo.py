"""The end-to-end demo on the built-in synthetic benchmark (the README's main command).

Generates the data, trains a small model for every method (token CAM, MCTformer-V1/V2,
MCTformer-V2 trained with DOEI, TransCAM, BNR, LPCAM, EDAM; plus DOEI at inference over
MCTformer-V2's checkpoint), extracts and evaluates CAM seeds, makes
pseudo-labels with the CRF and the random walk, and writes OUT/report.md with the table, the
sweep curves (sweep_curves.png) and an overlay gallery (gallery.png). Resumable.

  wsss-fast demo                  # the full demo (≤ 20 minutes on 2 CPU cores)
  wsss-fast demo --quick          # a small smoke version (CI)
  wsss-fast demo --from-scratch   # every model from random weights (no pretrained backbone)
"""

from __future__ import annotations

import argparse

from wsss_fast.options import argparse_type, device_name, seed_int, text, worker_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from wsss_fast.demo import DEMO_METHODS
    parser.add_argument("--out", type=argparse_type(text), default="demo_out",
                        help="output folder (default demo_out)")
    parser.add_argument("--quick", action="store_true", help="small data and short training")
    parser.add_argument("--seed", type=argparse_type(seed_int), default=0)
    parser.add_argument("--workers", type=argparse_type(worker_count), default=2)
    parser.add_argument("--device", type=argparse_type(device_name), default="cpu")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train every model from random weights (default: from the shipped "
                        "backbones pretrained on the source domain, pretrained/*.pt)")
    parser.add_argument("--methods", nargs="+", default=list(DEMO_METHODS),
                        choices=DEMO_METHODS, help="subset of methods (default: all)")


def run(args: argparse.Namespace) -> int:
    from wsss_fast.demo import run_demo
    run_demo(args.out, quick=args.quick, seed=args.seed, workers=args.workers,
             device=args.device, methods=args.methods, pretrained=not args.from_scratch)
    return 0
