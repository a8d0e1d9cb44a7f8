"""Train a CAM classifier with its method's loss (resumable, deterministic by seed).

Writes OUT/checkpoint.pth (the upstream format of the method: MCTformer {'model': sd}, TransCAM
a plain state dict), OUT/train_state.pth (for --resume) and OUT/train.json (settings, losses per
epoch, time, skipped images). The flags are TrainConfig's fields; their defaults are generic (for
real datasets). --recipe synthetic starts from the method's settings for the built-in synthetic
benchmark (printed; options given still win). --max-steps stops early; the schedule still spans
--epochs, and --resume continues.

  wsss-fast train --method mctformer_v2 --data VOC2012 --out runs/v2
  wsss-fast train --method mctformer_v2 --recipe synthetic --data data/synth --out runs/v2
  wsss-fast train --method irn --data VOC2012 --ir-labels ir_labels --backbone cam/checkpoint.pth \
      --model resnet50_irn --crop 512 --out runs/irn

--method irn trains IRN's IRNet from confident-region labels with IRN's SGD-poly optimizer; its
momentum defaults to the weight decay, as upstream passes weight_decay in SGD's momentum slot
(--momentum 0.9 for textbook SGD).
"""

from __future__ import annotations

import argparse
import sys

from wsss_fast.options import add_options_arguments
from wsss_fast.pipeline.options import require
from wsss_fast.pipeline.train import train
from wsss_fast.train import RECIPES, TrainConfig, recipe_settings
from wsss_fast.train.methods import METHODS, get_method


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options_arguments(parser, TrainConfig)
    parser.add_argument("--recipe", choices=RECIPES, help="start from these settings of the "
                        "method instead of the generic defaults (synthetic: the built-in "
                        "benchmark's; printed)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the flags given (and of --recipe), printing what the recipe set."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name: value for name, value in vars(args).items() if name in names}
    recipe = getattr(args, "recipe", None)
    settings = recipe_settings(recipe, given.get("method"))
    applied = {k: v for k, v in settings.items() if k not in given}
    if recipe is None and given.get("method") in METHODS:   # the method's own (IRN's, PSA's SGD)
        applied = {k: v for k, v in get_method(given["method"]).defaults.items()
                   if given.get(k) is None}
    if applied:
        source = f"recipe {recipe}" if recipe else "upstream settings"
        print(f"wsss-fast train: {source} for {given.get('method')}: "
              + ", ".join(f"{k}={v}" for k, v in applied.items()), file=sys.stderr)
    return TrainConfig(**{**settings, **given})


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    require(config, "method", "data", "out")
    result = train(config)
    report, checkpoint = result.report, result.checkpoint
    final = report["final"] or report["partial_epoch"] or {}
    losses = ", ".join(f"{k} {v:.4f}" for k, v in final.items()
                       if k not in ("epoch", "step", "updates", "lr", "elapsed"))
    print(f"wsss-fast train: {report['steps']}/{report['total_steps']} steps in "
          f"{report['seconds']:.1f} s ({losses}); wrote {checkpoint}", file=sys.stderr)
    skipped = report["skipped"]
    for item in skipped[:20]:
        print(f"  skipped {item['id']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"  ... {len(skipped) - 20} more in {checkpoint.parent / 'train.json'}",
              file=sys.stderr)
    return 0
