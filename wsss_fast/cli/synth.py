"""Generate the synthetic benchmark (DESIGN §9) as a VOC-layout dataset.

Deterministic by seed: K shape×texture×colour classes on textured backgrounds, 1–3 objects per
image, exact GT masks with a 255 boundary band, and deliberate co-occurrence (classes on a
characteristic background, classes that usually appear together), recorded in dataset.json.

  wsss-fast synth --out data/synth --seed 0
"""

from __future__ import annotations

import argparse
import sys

from wsss_fast.options import add_options_arguments, options_from_args
from wsss_fast.pipeline.synth import SynthOptions, synth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options_arguments(parser, SynthOptions)


def run(args: argparse.Namespace) -> int:
    root = synth(options_from_args(SynthOptions, args))
    print(f"wsss-fast synth: wrote {root}", file=sys.stderr)
    return 0
