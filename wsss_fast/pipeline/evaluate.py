"""``evaluate``: CAMs (background-threshold sweep) or label PNGs against the ground truth.

CAM mode (``cams``): every threshold τ of the sweep (default SEAM's 0.00..0.59) is evaluated
exactly in one pass; the per-class table at the best τ, OUT/evaluation.json, .md and the curve
OUT/sweep.png. Label mode (``pred``): the confusion matrix of the PNGs (255 counted as background,
as IRN's eval_sem_seg does; ``ignore_pred_255`` leaves those pixels out instead).
mIoU rules: nanmean (IRN/chainercv, default), mean (SEAM/MCTformer), present (ToCo).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from wsss_fast.options import finite_float, probability, worker_count
from wsss_fast.pipeline.errors import InputError, NothingToDo, OptionsError
from wsss_fast.pipeline.job import item_path
from wsss_fast.pipeline.options import (DatasetOptions, open_dataset_of, option, path_or_none,
                                        require)

MIOU_RULES = ("nanmean", "mean", "present")
MAX_THRESHOLDS = 10_000      # one confusion matrix each


def threshold_values(text) -> list[float]:
    """The sweep of ``START:STOP:STEP`` (STOP excluded) or ``a,b,...``: sorted, unique, in
    [0, 1], at most MAX_THRESHOLDS; else ValueError."""
    text = str(text).strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"expected START:STOP:STEP, got {text!r}")
        try:
            start, stop, step = (finite_float(part) for part in parts)
        except ValueError:
            raise ValueError(f"expected START:STOP:STEP of finite numbers, got {text!r}") \
                from None
        if not step > 0 or not stop > start:
            raise ValueError(f"expected START:STOP:STEP with STEP > 0 and STOP > START, got "
                             f"{text!r}")
        count = (stop - start) / step
        if count > MAX_THRESHOLDS:
            raise ValueError(f"expected at most {MAX_THRESHOLDS} thresholds, got {text!r} "
                             f"({count:.3g})")
        values = [round(start + i * step, 10) for i in range(max(1, int(round(count))))]
    else:
        try:
            values = [finite_float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"expected START:STOP:STEP or a comma-separated list of numbers, "
                             f"got {text!r}") from None
        if not values:
            raise ValueError(f"expected START:STOP:STEP or a list of thresholds, got {text!r}")
        if len(values) > MAX_THRESHOLDS:
            raise ValueError(f"expected at most {MAX_THRESHOLDS} thresholds, got {len(values)}")
    outside = [v for v in values if probability.maximum < v or v < probability.minimum]
    if outside:
        raise ValueError(f"expected thresholds in [0, 1], got {text!r} (holds {outside[0]:g})")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"expected sorted, distinct thresholds, got {text!r}")
    return values


def check_thresholds(value) -> str:
    """The option's check: ``value`` (text, or a list of numbers from Python or YAML) as the
    text ``threshold_values`` reads, once it reads."""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise ValueError(f"expected START:STOP:STEP or a list of thresholds, got {value!r}")
    threshold_values(value)
    return value


@dataclass
class EvaluateOptions(DatasetOptions):
    cams: Optional[str] = option(None, "folder of CAM files (<id>.npy)")
    pred: Optional[str] = option(None, "folder of label PNGs (<id>.png)")
    thresholds: Optional[str] = option(None, "sweep: START:STOP:STEP (STOP excluded) or a "
                                       "comma-separated list (default 0:0.6:0.01)",
                                       check=check_thresholds)
    rule: str = option("nanmean", choices=MIOU_RULES)
    ignore_pred_255: bool = option(False, "label mode: leave predicted-255 pixels out instead "
                                   "of background")
    out: Optional[str] = option(None, "folder for evaluation.json/.md and sweep.png")
    name: Optional[str] = option(None, "curve / report name (default: the input folder's)")
    workers: int = option(2, "worker processes (0: none)", check=worker_count)

    def __post_init__(self):
        super().__post_init__()
        self.cams, self.pred, self.out = map(path_or_none, (self.cams, self.pred, self.out))


@dataclass
class EvaluateResult:
    report: dict          # what evaluation.json holds
    headline: str
    table: str            # the per-class markdown table (at the best threshold)

    @property
    def images(self) -> int:
        return self.report["images"]

    @property
    def no_ground_truth(self) -> list:
        """Ids of the dataset left out because they have no ground-truth label PNG."""
        return self.report["no_ground_truth"]

    @property
    def exit_status(self) -> int:
        return 0 if self.images > 0 else 1


def parse_thresholds(text):
    """The thresholds of the option (None: the sweep's default); ``OptionsError`` if bad."""
    if text is None:
        return None
    try:
        return threshold_values(text)
    except ValueError as error:
        raise OptionsError(f"--thresholds: {error}") from error


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


def evaluate(options: EvaluateOptions) -> EvaluateResult:
    """Evaluate ``options.cams`` or ``options.pred``; writes the report into ``options.out``
    when given. Images without ground truth are left out and listed (``no_ground_truth``), as
    are images whose prediction is missing or unusable (``skipped``); ``NothingToDo`` when no
    image is left to evaluate."""
    from wsss_fast.data.classes import with_background
    from wsss_fast.evaluate import plot_sweep
    from wsss_fast.io.atomic import atomic_write_bytes, atomic_write_json
    require(options, "data")
    if bool(options.cams) == bool(options.pred):
        raise OptionsError("give --cams (CAM files) or --pred (label PNGs)")
    folder = Path(options.cams or options.pred)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    mode = "cams" if options.cams else "pred"
    dataset = open_dataset_of(options)
    names = with_background(dataset.class_names)
    items, no_gt = [], []
    for item in dataset.ids:
        gt_path = dataset.sample(item).gt_path
        (items.append((item, gt_path)) if gt_path else no_gt.append(item))
    if not items:
        raise NothingToDo(f"nothing to evaluate: none of the {len(dataset.ids)} images of the "
                          f"{dataset.name} dataset at {dataset.root} has a ground-truth label "
                          f"PNG (first: {', '.join(no_gt[:3])})")
    thresholds = parse_thresholds(options.thresholds)
    pred_ignore_as = "exclude" if options.ignore_pred_255 else 0
    shards = max(1, options.workers)
    tasks = [(mode, str(folder), items[i::shards], len(names), thresholds, pred_ignore_as)
             for i in range(shards)]
    if options.workers > 0:
        with ProcessPoolExecutor(options.workers) as pool:
            parts = list(pool.map(_evaluate_shard, tasks))
    else:
        parts = [_evaluate_shard(task) for task in tasks]
    total = parts[0][0]
    for accumulator, _ in parts[1:]:
        total = total.merge(accumulator)
    skipped = sorted(s for _, part in parts for s in part)
    if len(skipped) == len(items):
        first = "; ".join(f"{i}: {r}" for i, r in skipped[:3])
        raise NothingToDo(f"nothing could be evaluated: all {len(items)} images with ground "
                          f"truth were skipped ({first})")
    name = options.name or folder.name
    rule = options.rule
    report = {"name": name, "mode": mode, "rule": rule, "images": len(items) - len(skipped),
              "skipped": [{"id": i, "reason": r} for i, r in skipped],
              "no_ground_truth": no_gt, "class_names": list(names)}
    if mode == "cams":
        best_threshold, best_miou = total.best(rule)
        index = int(np.flatnonzero(np.isclose(total.thresholds, best_threshold))[0])
        matrix = total.matrix_at(index)
        report.update(best_threshold=best_threshold, best_miou=best_miou,
                      thresholds=total.thresholds.tolist(),
                      miou_curve=[None if np.isnan(v) else float(v) for v in total.miou(rule)])
        headline = (f"{name}: best background threshold {best_threshold:.2f}, "
                    f"mIoU {100 * best_miou:.2f} ({rule}) over {report['images']} images")
    else:
        matrix = total
        headline = (f"{name}: mIoU {100 * matrix.miou(rule):.2f} ({rule}) over "
                    f"{report['images']} images")
    report["at_best"] = matrix.to_dict()
    table = matrix.table(names, rule)
    if options.out:
        out = Path(options.out)
        atomic_write_json(out / "evaluation.json", report)
        atomic_write_bytes(out / "evaluation.md", f"# {headline}\n\n{table}\n".encode())
        if mode == "cams":
            plot_sweep({name: (total.thresholds, total.miou(rule))}, out / "sweep.png",
                       title=f"background-threshold sweep ({rule} mIoU)")
    return EvaluateResult(report=report, headline=headline, table=table)
