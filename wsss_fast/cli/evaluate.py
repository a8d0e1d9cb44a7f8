"""Evaluate CAMs (background-threshold sweep) or label PNGs against the ground truth.

CAM mode (--cams): every threshold τ of the sweep (default SEAM's 0.00..0.59) is evaluated exactly
in one pass; prints the per-class table at the best τ, writes OUT/evaluation.json, .md and the
curve OUT/sweep.png. Label mode (--pred): the confusion matrix of the PNGs (255 counted as
background, as IRN's eval_sem_seg does; --ignore-pred-255 leaves those pixels out instead).
mIoU rules: nanmean (IRN/chainercv, default), mean (SEAM/MCTformer), present (ToCo).

  wsss-fast evaluate --data VOC2012 --split train --cams cams_v2/cams --out eval_v2
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from wsss_fast.cli.common import (UsageError, add_dataset_arguments, item_path,
                                  open_dataset_from, require)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cams", help="folder of CAM files (<id>.npy)")
    source.add_argument("--pred", help="folder of label PNGs (<id>.png)")
    parser.add_argument("--thresholds", help="sweep: START:STOP:STEP (STOP excluded) or a "
                        "comma-separated list (default 0:0.6:0.01)")
    parser.add_argument("--rule", default="nanmean", choices=("nanmean", "mean", "present"))
    parser.add_argument("--ignore-pred-255", action="store_true",
                        help="label mode: leave predicted-255 pixels out instead of background")
    parser.add_argument("--out", help="folder for evaluation.json/.md and sweep.png")
    parser.add_argument("--name", help="curve / report name (default: the input folder's)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (0: none)")


def parse_thresholds(text):
    if text is None:
        return None
    text = str(text)
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            count = int(round((stop - start) / step))
            return [round(start + i * step, 10) for i in range(count)]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--thresholds {text!r}: expected START:STOP:STEP or a list") from None


def _evaluate_shard(task) -> tuple:
    """Accumulate a shard of images in one process: (accumulator, [(id, reason) skipped])."""
    from wsss_fast.data.images import ImageDecodeError, read_label_png
    from wsss_fast.evaluate import ConfusionMatrix, ThresholdSweep
    from wsss_fast.io.cam_files import CamFileError, load_cam_file
    mode, folder, items, num_classes, thresholds, pred_ignore_as = task
    if mode == "cams":
        accumulator = ThresholdSweep(thresholds, num_classes)
    else:
        accumulator = ConfusionMatrix(num_classes, pred_ignore_as=pred_ignore_as)
    skipped = []
    for item, gt_path in items:
        suffix = ".npy" if mode == "cams" else ".png"
        path = item_path(Path(folder), item, suffix)
        if not path.exists():
            skipped.append((item, f"no prediction {path}"))
            continue
        try:
            gt = read_label_png(gt_path)
            if mode == "cams":
                record = load_cam_file(path)
                cams = record.high_res if record.keys.size else np.zeros((0,) + gt.shape,
                                                                          np.float32)
                accumulator.update(cams, record.keys, gt)
            else:
                accumulator.update(read_label_png(path), gt)
        except (CamFileError, ImageDecodeError, ValueError) as error:
            skipped.append((item, str(error)))
    return accumulator, skipped


def run(args: argparse.Namespace) -> int:
    from wsss_fast.data.classes import with_background
    from wsss_fast.evaluate import plot_sweep
    from wsss_fast.io.atomic import atomic_write_bytes, atomic_write_json
    require(args, "data")
    if not (args.cams or args.pred):
        raise UsageError("give --cams (CAM files) or --pred (label PNGs)")
    folder = Path(args.cams or args.pred)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    mode = "cams" if args.cams else "pred"
    dataset = open_dataset_from(args)
    names = with_background(dataset.class_names)
    items, no_gt = [], []
    for item in dataset.ids:
        gt_path = dataset.sample(item).gt_path
        (items.append((item, gt_path)) if gt_path else no_gt.append(item))
    if not items:
        raise UsageError(f"no ground-truth labels found for the {len(dataset.ids)} images")
    thresholds = parse_thresholds(args.thresholds)
    pred_ignore_as = "exclude" if args.ignore_pred_255 else 0
    shards = max(1, args.workers)
    tasks = [(mode, str(folder), items[i::shards], len(names), thresholds, pred_ignore_as)
             for i in range(shards)]
    if args.workers > 0:
        with ProcessPoolExecutor(args.workers) as pool:
            parts = list(pool.map(_evaluate_shard, tasks))
    else:
        parts = [_evaluate_shard(task) for task in tasks]
    total = parts[0][0]
    for accumulator, _ in parts[1:]:
        total = total.merge(accumulator)
    skipped = sorted(s for _, part in parts for s in part)
    name = args.name or folder.name
    report = {"name": name, "mode": mode, "rule": args.rule, "images": len(items) - len(skipped),
              "skipped": [{"id": i, "reason": r} for i, r in skipped],
              "no_ground_truth": len(no_gt), "class_names": list(names)}
    if mode == "cams":
        best_threshold, best_miou = total.best(args.rule)
        index = int(np.flatnonzero(np.isclose(total.thresholds, best_threshold))[0])
        matrix = total.matrix_at(index)
        report.update(best_threshold=best_threshold, best_miou=best_miou,
                      thresholds=total.thresholds.tolist(),
                      miou_curve=[None if np.isnan(v) else float(v)
                                  for v in total.miou(args.rule)])
        headline = (f"{name}: best background threshold {best_threshold:.2f}, "
                    f"mIoU {100 * best_miou:.2f} ({args.rule}) over {report['images']} images")
    else:
        matrix = total
        headline = (f"{name}: mIoU {100 * matrix.miou(args.rule):.2f} ({args.rule}) over "
                    f"{report['images']} images")
    report["at_best"] = matrix.to_dict()
    table = matrix.table(names, args.rule)
    print(headline)
    print(table)
    if skipped:
        print(f"warning: {len(skipped)} images without a usable prediction were left out "
              f"(listed in evaluation.json); first: {skipped[0][0]}: {skipped[0][1]}",
              file=sys.stderr)
    if args.out:
        out = Path(args.out)
        atomic_write_json(out / "evaluation.json", report)
        atomic_write_bytes(out / "evaluation.md", f"# {headline}\n\n{table}\n".encode())
        if mode == "cams":
            plot_sweep({name: (total.thresholds, total.miou(args.rule))}, out / "sweep.png",
                       title=f"background-threshold sweep ({args.rule} mIoU)")
    return 0 if report["images"] > 0 else 1
