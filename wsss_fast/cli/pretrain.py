"""Pretrain a family's tiny backbone on the procedural source domain (multi-label
classification; images rendered on the fly, deterministic by seed, disjoint from the synthetic
benchmark's shapes, textures and colours).

Writes OUT: {'model': fp16 state dict, 'pretrain': record (family, steps, seed, source-domain
validation mAP, minutes, command)}; while it runs, OUT.state.pth (every --save-every steps,
atomic) lets --resume continue. `wsss-fast train --init OUT` starts any method of the family
from it.

  wsss-fast pretrain --family conformer --out pretrained/conformer.pt --steps 600 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from wsss_fast.options import add_options_arguments, flag_of, options_from_args
from wsss_fast.pipeline.pretrain import pretrain
from wsss_fast.train.pretrain import PretrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options_arguments(parser, PretrainConfig)


def command_line(config: PretrainConfig) -> str:
    """The command that reproduces ``config``'s weights: family, out and every setting that
    differs from its default (resume, overwrite and the progress bar left out)."""
    words = ["wsss-fast", "pretrain"]
    for field in dataclasses.fields(PretrainConfig):
        value = getattr(config, field.name)
        if field.name in ("resume", "overwrite", "quiet") or value == field.default:
            continue
        words += [flag_of(PretrainConfig, field.name)] + ([] if value is True else [str(value)])
    return " ".join(shlex.quote(word) for word in words)


def run(args: argparse.Namespace) -> int:
    config = options_from_args(PretrainConfig, args)
    result = pretrain(config, command=command_line(config))
    record = result.record
    print(f"wsss-fast pretrain: {record['family']} ({record['model']}), {record['steps']} steps "
          f"in {record['minutes']:.1f} min; source-domain val mAP {100 * record['val_map']:.1f}; "
          f"wrote {result.checkpoint}", file=sys.stderr)
    return 0
