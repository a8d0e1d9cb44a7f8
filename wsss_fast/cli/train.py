"""Train a CAM classifier with its method's loss (resumable, deterministic by seed).

Writes OUT/checkpoint.pth (the upstream format of the method: MCTformer {'model': sd}, TransCAM
a plain state dict), OUT/train_state.pth (for --resume) and OUT/train.json (settings, losses per
epoch, time, skipped images). Options not given take the method's recommended settings for the
synthetic benchmark (wsss_fast.train.DEMO_SETTINGS). --max-steps stops early; the schedule still
spans --epochs, and --resume continues.

  wsss-fast train --method mctformer_v2 --data data/synth --out runs/v2
  wsss-fast extract --data data/synth --split val --model mctformer_v2_tiny \\
      --checkpoint runs/v2/checkpoint.pth --out cams_v2
"""

from __future__ import annotations

import argparse
import json
import sys

from wsss_fast.cli.common import UsageError, add_dataset_arguments, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from wsss_fast.train import list_methods
    group = parser.add_argument_group("method")
    group.add_argument("--method", choices=list_methods(), help="training method")
    group.add_argument("--model", help="registered model name (default: the method's small "
                       "configuration, e.g. mctformer_v2_tiny)")
    group.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="architecture argument, e.g. depth=6 (repeatable)")
    add_dataset_arguments(parser)
    group = parser.add_argument_group("optimization (default: the method's settings)")
    group.add_argument("--epochs", type=int, help="epochs the schedule spans")
    group.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in "
                       "total (the schedule still spans --epochs)")
    group.add_argument("--batch-size", type=int)
    group.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    group.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay")
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--warmup-epochs", type=float, help="linear warm-up length in epochs")
    group.add_argument("--clip-grad", type=float, help="max gradient norm (0: off)")
    group = parser.add_argument_group("augmentation")
    group.add_argument("--crop", type=int, help="square training crop, pixels")
    group.add_argument("--resize-long", type=int, nargs=2, metavar=("MIN", "MAX"),
                       help="random long side before cropping (default 0.625-1.25 x crop)")
    group.add_argument("--no-color-jitter", action="store_true", help="no colour jitter")
    group = parser.add_argument_group("run")
    group.add_argument("--out", help="output folder")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last saved state")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh even if --out holds a run")
    group.add_argument("--save-every", type=int, help="also save every N steps "
                       "(default: every epoch)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    group.add_argument("--workers", type=int, default=2,
                       help="data loading processes (0: in this process; no effect on results)")
    group.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is "
                       "often faster on a CPU busy with other work)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from wsss_fast.cli.extract import parse_model_args
    from wsss_fast.train import train

    require(args, "method", "data", "out")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    checkpoint = train(
        args.method, args.data, args.out, split=args.split or "train", dataset=args.dataset,
        labels=args.labels, classes=args.classes, model=args.model,
        model_args=parse_model_args(args.model_arg), epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, crop=args.crop,
        resize_long=args.resize_long, color_jitter=False if args.no_color_jitter else None,
        clip_grad=args.clip_grad, seed=args.seed, workers=args.workers, device=args.device,
        resume=args.resume, overwrite=args.overwrite, save_every=args.save_every,
        threads=args.threads, progress=not args.quiet)
    with open(checkpoint.parent / "train.json", encoding="utf-8") as handle:
        report = json.load(handle)
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
