"""Confusion matrix and the segmentation scores derived from it.

Rows of a confusion matrix are ground-truth classes, columns predicted classes; pixels whose
ground truth equals the ignore index (255) are not counted. Per-class IoU is
``tp / (gt_k + pred_k − tp)``. Three incompatible mIoU averaging rules are in use in the field;
all three are available by name (``MIOU_RULES``):

- ``"nanmean"`` — IRN / LPCAM / ReCAM / AMN (``step/eval_cam.py``, ``step/eval_sem_seg.py`` through
  chainercv's ``calc_semantic_segmentation_iou``): mean over classes with a defined IoU; a class
  absent from both ground truth and prediction (IoU 0/0) is skipped.
- ``"mean"`` — SEAM / EDAM / MCTformer ``evaluation.py`` (``do_python_eval``): IoU computed as
  ``TP / (T + P − TP + 1e-10)`` and averaged over *all* classes, so an absent class counts as 0.
- ``"present"`` — ToCo ``utils/evaluate.py`` (``scores``): mean over the classes that occur in the
  ground truth (``hist.sum(axis=1) > 0``); a class that is only predicted does not count.

The three agree whenever every class occurs in the ground truth.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from wsss_fast.data.classes import IGNORE_INDEX

MIOU_RULES = ("nanmean", "mean", "present")
_SEAM_EPS = 1e-10  # the additive epsilon of the SEAM/MCTformer IoU denominator


def check_num_classes(num_classes) -> int:
    """``num_classes`` as an int, or a ``ValueError`` unless it is a positive integer."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def check_label_array(name: str, array) -> np.ndarray:
    """``array`` as a numpy integer array, or a ``ValueError`` naming its dtype and shape."""
    array = np.asarray(array)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label array, "
                         f"got dtype {array.dtype}, shape {array.shape}")
    return array


def check_label_range(name: str, values: np.ndarray, num_classes: int, allowed: str) -> None:
    """``ValueError`` naming the offending values unless all ``values`` lie in
    ``[0, num_classes)``; ``allowed`` says what else the caller accepted."""
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        bad = np.unique(values[(values < 0) | (values >= num_classes)])
        listing = ", ".join(str(v) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(f"{name} holds value(s) {listing} outside [0, {num_classes}) "
                         f"{allowed}")


def _check_pred_ignore_as(value, num_classes: int) -> int | str | None:
    if value is None or value == "exclude":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value < num_classes:
        raise ValueError(f"pred_ignore_as must be a class in [0, {num_classes}), 'exclude' or "
                         f"None, got {value!r}")
    return int(value)


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = IGNORE_INDEX,
                     pred_ignore_as: int | str | None = None) -> np.ndarray:
    """``(num_classes, num_classes) int64`` counts ``[gt, pred]`` over pixels with
    ``gt != ignore_index``.

    Predictions at counted pixels must lie in ``[0, num_classes)``; one equal to ``ignore_index``
    is an error unless ``pred_ignore_as`` names the class it counts as (IRN's ``eval_sem_seg``
    counts its 255 band as background: ``pred_ignore_as=0``; ``"exclude"`` leaves those pixels
    out, as ToCo's ``pseudo_scores`` does). Unlike chainercv, the number of
    classes is fixed, so a stray label is an error instead of a silently grown matrix.
    """
    num_classes = check_num_classes(num_classes)
    pred = check_label_array("pred", pred)
    gt = check_label_array("gt", gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have one shape, got pred {pred.shape}, gt {gt.shape}")
    pred_ignore_as = _check_pred_ignore_as(pred_ignore_as, num_classes)
    valid = gt != ignore_index
    if pred_ignore_as == "exclude":
        valid &= pred != ignore_index
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if isinstance(pred_ignore_as, int):
        p[p == ignore_index] = pred_ignore_as
    check_label_range("gt", g, num_classes, f"(other than the ignore index {ignore_index})")
    allowed = (f"(the ignore index {ignore_index} counts as {pred_ignore_as})"
               if isinstance(pred_ignore_as, int) else
               f"(the ignore index {ignore_index} is accepted only with pred_ignore_as)")
    check_label_range("pred", p, num_classes, allowed)
    counts = np.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _class_totals(confusion: np.ndarray):
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.ndim < 2 or confusion.shape[-1] != confusion.shape[-2]:
        raise ValueError(f"a confusion matrix must be (..., n, n), got shape {confusion.shape}")
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    gt_total = confusion.sum(axis=-1)
    pred_total = confusion.sum(axis=-2)
    return tp, gt_total, pred_total, gt_total + pred_total - tp


def _divide(num, den) -> np.ndarray:
    """``num / den`` with NaN (not a warning) where ``den == 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def iou_from_confusion(confusion) -> np.ndarray:
    """Per-class IoU of a ``(..., n, n)`` confusion matrix; NaN where the class occurs in neither
    ground truth nor prediction."""
    tp, _, _, union = _class_totals(confusion)
    return _divide(tp, union)


def miou_from_confusion(confusion, rule: str = "nanmean"):
    """mIoU of a ``(..., n, n)`` confusion matrix under one of ``MIOU_RULES`` (module doc).
    Where no class qualifies (nothing counted) it is NaN, except under ``"mean"``, where every
    class counts and an empty one scores 0 as in SEAM."""
    tp, gt_total, _, union = _class_totals(confusion)
    if rule == "mean":
        return (tp / (union + _SEAM_EPS)).mean(axis=-1)
    if rule == "nanmean":
        counted = union > 0
    elif rule == "present":
        counted = gt_total > 0
    else:
        raise ValueError(f"unknown mIoU rule {rule!r}; expected one of {MIOU_RULES}")
    iou = np.where(counted, _divide(tp, union), 0.0)
    return _divide(iou.sum(axis=-1), counted.sum(axis=-1))


def _nan_to_none(values) -> list:
    return [None if np.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


class ConfusionMatrix:
    """Accumulates a confusion matrix over images (``update``) and over ranks (``+``/``merge``).

    ``matrix`` is the ``(num_classes, num_classes) int64`` count array, rows = ground truth.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 pred_ignore_as: int | str | None = None):
        self.num_classes = check_num_classes(num_classes)
        self.ignore_index = int(ignore_index)
        self.pred_ignore_as = _check_pred_ignore_as(pred_ignore_as, self.num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, gt) -> "ConfusionMatrix":
        self.matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore_index,
                                        self.pred_ignore_as)
        return self

    def _settings(self):
        return self.num_classes, self.ignore_index, self.pred_ignore_as

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """A new accumulator holding the counts of both (e.g. of two ranks)."""
        if not isinstance(other, ConfusionMatrix) or other._settings() != self._settings():
            theirs = other._settings() if isinstance(other, ConfusionMatrix) else type(other)
            raise ValueError("can only merge ConfusionMatrix objects with equal (num_classes, "
                             f"ignore_index, pred_ignore_as): {self._settings()} vs {theirs}")
        merged = ConfusionMatrix(*self._settings())
        merged.matrix = self.matrix + other.matrix
        return merged

    __add__ = merge

    def iou(self) -> np.ndarray:
        """Per-class IoU, NaN for a class in neither ground truth nor prediction."""
        return iou_from_confusion(self.matrix)

    def miou(self, rule: str = "nanmean") -> float:
        return float(miou_from_confusion(self.matrix, rule))

    def fp_rate(self) -> np.ndarray:
        """IRN's false-positive share of each class's union: ``1 − gt_k / (gt_k + pred_k − tp_k)``
        (= ``(pred_k − tp_k) / union_k``; ``eval_sem_seg.py``), NaN where the union is empty."""
        _, gt_total, _, union = _class_totals(self.matrix)
        return 1.0 - _divide(gt_total, union)

    def fn_rate(self) -> np.ndarray:
        """IRN's false-negative share of each class's union: ``1 − pred_k / union_k``
        (= ``(gt_k − tp_k) / union_k``), NaN where the union is empty."""
        _, _, pred_total, union = _class_totals(self.matrix)
        return 1.0 - _divide(pred_total, union)

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels (NaN before any pixel was counted)."""
        return float(_divide(np.trace(self.matrix), self.matrix.sum()))

    def table(self, class_names: Sequence[str] | None = None, rule: str = "nanmean") -> str:
        """Markdown table: class, IoU, FP, FN (percent; "n/a" where undefined), then mIoU."""
        names = ([str(i) for i in range(self.num_classes)] if class_names is None
                 else [str(n) for n in class_names])
        if len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} names for {self.num_classes} classes "
                             "(include the background, e.g. with_background(VOC_CLASSES))")

        def pct(value) -> str:
            return "n/a" if np.isnan(value) else f"{100 * value:.2f}"

        lines = ["| class | IoU (%) | FP (%) | FN (%) |", "|---|---:|---:|---:|"]
        for name, iou, fp, fn in zip(names, self.iou(), self.fp_rate(), self.fn_rate()):
            lines.append(f"| {name} | {pct(iou)} | {pct(fp)} | {pct(fn)} |")
        lines.append(f"| **mIoU ({rule})** | **{pct(self.miou(rule))}** | | |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready report: the counts (enough for ``from_dict``) plus derived scores
        (NaN written as ``None``)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "pred_ignore_as": self.pred_ignore_as,
            "confusion": self.matrix.tolist(),
            "iou": _nan_to_none(self.iou()),
            "fp_rate": _nan_to_none(self.fp_rate()),
            "fn_rate": _nan_to_none(self.fn_rate()),
            "miou": {rule: _nan_to_none([self.miou(rule)])[0] for rule in MIOU_RULES},
            "pixel_accuracy": _nan_to_none([self.pixel_accuracy()])[0],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ConfusionMatrix":
        """Rebuild from ``to_dict`` output (derived scores are recomputed, not read)."""
        missing = {"num_classes", "ignore_index", "pred_ignore_as", "confusion"} - set(data)
        if missing:
            raise ValueError(f"confusion-matrix dict lacks {sorted(missing)}")
        result = cls(data["num_classes"], data["ignore_index"], data["pred_ignore_as"])
        matrix = np.asarray(data["confusion"], dtype=np.int64)
        if matrix.shape != result.matrix.shape or (matrix < 0).any():
            raise ValueError(f"confusion must be non-negative counts of shape "
                             f"{result.matrix.shape}, got shape {matrix.shape}")
        result.matrix = matrix
        return result
