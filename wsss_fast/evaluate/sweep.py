"""Exact background-threshold sweep of CAM pseudo-labels, one pass per image for all thresholds.

The pseudo-label at threshold τ (IRN ``eval_cam``; SEAM / MCTformer ``evaluation.py --curve``):
prepend a constant plane τ to the CAMs of the image's classes, take the argmax (the first maximum,
so ties go to background) and map channel ``i > 0`` to label ``keys[i-1] + 1``. Per pixel, with
``m = max_c cam_c`` and ``c*`` its first argmax::

    pred(τ) = keys[c*] + 1  if m > τ  else 0

With ``idx = #{thresholds < m}`` (``searchsorted(..., side="left")``) a pixel is foreground
exactly at the thresholds ``t < idx``, so one bincount over ``(gt, c*, idx)`` and a reverse
cumulative sum over ``idx`` give the confusion matrix of every threshold.

Thresholds are compared in the CAMs' floating dtype, as upstream does (its τ plane is written into
the float32 CAM array), so a CAM value equal to ``float32(τ)`` is background at τ.
"""

from __future__ import annotations

import numpy as np

from wsss_fast.data.classes import IGNORE_INDEX
from wsss_fast.evaluate.metrics import (MIOU_RULES, ConfusionMatrix, check_label_array,
                                        check_label_range, check_num_classes,
                                        miou_from_confusion)

# SEAM / MCTformer ``evaluation.py --curve``: τ = i / 100 for i = 0..59.
SEAM_THRESHOLDS = tuple(i / 100 for i in range(60))


def _check_thresholds(thresholds) -> np.ndarray:
    try:
        values = np.asarray(thresholds, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be numbers, got {thresholds!r}") from None
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D sequence, got shape {values.shape}")
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError(f"thresholds must lie in [0, 1], got {values.tolist()}")
    if (np.diff(values) <= 0).any():
        raise ValueError(f"thresholds must be sorted and unique, got {values.tolist()}")
    return values


class ThresholdSweep:
    """Confusion matrices of constant-background-threshold pseudo-labels at every threshold.

    ``thresholds=None`` means ``SEAM_THRESHOLDS``; ``num_classes`` counts the background
    (21 for VOC). Accumulates over images with ``update`` and over ranks with ``merge``/``+``.
    """

    def __init__(self, thresholds, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.thresholds = _check_thresholds(SEAM_THRESHOLDS if thresholds is None else thresholds)
        self.num_classes = check_num_classes(num_classes)
        self.ignore_index = int(ignore_index)
        self._confusions = np.zeros((self.thresholds.size, self.num_classes, self.num_classes),
                                    dtype=np.int64)

    def _check_inputs(self, cams, keys, gt):
        cams = np.asarray(cams)
        if cams.ndim != 3 or not np.issubdtype(cams.dtype, np.floating):
            raise ValueError(f"cams must be a floating (n, H, W) array, "
                             f"got dtype {cams.dtype}, shape {cams.shape}")
        gt = check_label_array("gt", gt)
        if gt.shape != cams.shape[1:]:
            raise ValueError(f"gt must be (H, W) = {cams.shape[1:]} to match cams {cams.shape}, "
                             f"got {gt.shape}")
        keys = np.asarray(keys)
        if keys.size == 0:
            keys = keys.astype(np.int64)
        keys = check_label_array("keys", keys)
        if keys.shape != cams.shape[:1]:
            raise ValueError(f"keys must be ({cams.shape[0]},), one class per CAM plane of cams "
                             f"{cams.shape}, got shape {keys.shape}")
        labels = keys.astype(np.int64) + 1
        if labels.size and (labels.min() < 1 or labels.max() >= self.num_classes
                            or np.unique(labels).size != labels.size):
            raise ValueError(f"keys must be distinct foreground classes in "
                             f"[0, {self.num_classes - 1}), got {keys.tolist()}")
        return cams, labels, gt

    def update(self, cams, keys, gt) -> "ThresholdSweep":
        """Add one image: ``cams (n, H, W)`` for the 0-based foreground classes ``keys (n,)``
        (``n`` may be 0: all background), ``gt (H, W)`` label map (0 = background)."""
        cams, labels, gt = self._check_inputs(cams, keys, gt)
        valid = gt != self.ignore_index
        g = gt[valid].astype(np.int64)
        check_label_range("gt", g, self.num_classes,
                          f"(other than the ignore index {self.ignore_index})")
        n = labels.size
        if n == 0:
            self._confusions[:, :, 0] += np.bincount(g, minlength=self.num_classes)
            return self
        peak = cams.max(axis=0)
        if np.isnan(peak).any():
            raise ValueError(f"cams {cams.shape} contain NaN")
        top = cams.argmax(axis=0)[valid]
        steps = self.thresholds.size + 1
        below = np.searchsorted(self.thresholds.astype(cams.dtype), peak[valid], side="left")
        counts = np.bincount((g * n + top) * steps + below, minlength=self.num_classes * n * steps)
        counts = counts.reshape(self.num_classes, n, steps)
        # foreground[g, j, t]: pixels of gt g labelled keys[j]+1 at threshold t, i.e. below > t.
        foreground = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1][..., 1:]
        self._confusions[:, :, labels] += foreground.transpose(2, 0, 1)
        self._confusions[:, :, 0] += counts.sum(axis=(1, 2)) - foreground.sum(axis=1).T
        return self

    def confusions(self) -> np.ndarray:
        """``(T, num_classes, num_classes) int64``: one confusion matrix per threshold."""
        return self._confusions.copy()

    def matrix_at(self, index: int) -> ConfusionMatrix:
        """The accumulated confusion matrix of threshold ``thresholds[index]``."""
        matrix = ConfusionMatrix(self.num_classes, self.ignore_index)
        matrix.matrix = self._confusions[index].copy()
        return matrix

    def miou(self, rule: str = "nanmean") -> np.ndarray:
        """``(T,)`` mIoU per threshold under one of ``MIOU_RULES``."""
        return miou_from_confusion(self._confusions, rule)

    def best(self, rule: str = "nanmean") -> tuple[float, float]:
        """``(threshold, miou)`` of the first threshold with the highest mIoU."""
        mious = self.miou(rule)
        if np.isnan(mious).all():
            raise ValueError("no pixel has been counted yet: call update() first")
        index = int(np.nanargmax(mious))
        return float(self.thresholds[index]), float(mious[index])

    def _settings(self):
        return self.thresholds.tolist(), self.num_classes, self.ignore_index

    def merge(self, other: "ThresholdSweep") -> "ThresholdSweep":
        """A new sweep holding the counts of both (e.g. of two ranks)."""
        if not isinstance(other, ThresholdSweep) or other._settings() != self._settings():
            theirs = other._settings() if isinstance(other, ThresholdSweep) else type(other)
            raise ValueError("can only merge sweeps with equal (thresholds, num_classes, "
                             f"ignore_index): {self._settings()} vs {theirs}")
        merged = ThresholdSweep(self.thresholds, self.num_classes, self.ignore_index)
        merged._confusions = self._confusions + other._confusions
        return merged

    __add__ = merge

    def to_dict(self) -> dict:
        """JSON-ready report: the counts (enough for ``from_dict``), mIoU per threshold and the
        best threshold under every rule (NaN written as ``None``)."""
        curves, best = {}, {}
        for rule in MIOU_RULES:
            mious = self.miou(rule)
            curves[rule] = [None if np.isnan(v) else float(v) for v in mious]
            best[rule] = None if np.isnan(mious).all() else dict(
                zip(("threshold", "miou"), self.best(rule)))
        return {
            "thresholds": self.thresholds.tolist(),
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "confusions": self._confusions.tolist(),
            "miou": curves,
            "best": best,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ThresholdSweep":
        """Rebuild from ``to_dict`` output (derived scores are recomputed, not read)."""
        missing = {"thresholds", "num_classes", "ignore_index", "confusions"} - set(data)
        if missing:
            raise ValueError(f"threshold-sweep dict lacks {sorted(missing)}")
        sweep = cls(data["thresholds"], data["num_classes"], data["ignore_index"])
        confusions = np.asarray(data["confusions"], dtype=np.int64)
        if confusions.shape != sweep._confusions.shape or (confusions < 0).any():
            raise ValueError(f"confusions must be non-negative counts of shape "
                             f"{sweep._confusions.shape}, got shape {confusions.shape}")
        sweep._confusions = confusions
        return sweep
