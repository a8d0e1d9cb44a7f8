"""Generate the synthetic benchmark (DESIGN §9) as a VOC-layout dataset.

Deterministic by seed: K shape×texture×colour classes on textured backgrounds, 1–3 objects per
image, exact GT masks with a 255 boundary band, and deliberate co-occurrence (classes on a
characteristic background, classes that usually appear together), recorded in dataset.json.

  wsss-fast synth --out data/synth --seed 0
"""

from __future__ import annotations

import argparse
import sys

from wsss_fast.cli.common import require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="dataset folder to write (VOC layout)")
    parser.add_argument("--num-train", type=int, help="training images (default: generator's)")
    parser.add_argument("--num-val", type=int, help="validation images (default: generator's)")
    parser.add_argument("--num-classes", type=int, default=8, help="foreground classes (≤20)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="image size (default: the generator's size range)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    from wsss_fast.data.synthetic import generate_synthetic
    require(args, "out")
    options = {"num_classes": args.num_classes, "seed": args.seed, "workers": args.workers}
    if args.num_train is not None:
        options["num_train"] = args.num_train
    if args.num_val is not None:
        options["num_val"] = args.num_val
    if args.size is not None:
        options["image_size"] = tuple(args.size)
    root = generate_synthetic(args.out, **options)
    print(f"wsss-fast synth: wrote {root}", file=sys.stderr)
    return 0
