"""Evaluation: confusion matrices, IoU / mIoU under the three averaging rules of the field, FP/FN
rates, exact background-threshold sweeps and their curve plots."""

from wsss_fast.evaluate.metrics import (MIOU_RULES, ConfusionMatrix, confusion_matrix,
                                        iou_from_confusion, miou_from_confusion)
from wsss_fast.evaluate.plot import plot_sweep
from wsss_fast.evaluate.sweep import SEAM_THRESHOLDS, ThresholdSweep

__all__ = ["MIOU_RULES", "SEAM_THRESHOLDS", "ConfusionMatrix", "ThresholdSweep",
           "confusion_matrix", "iou_from_confusion", "miou_from_confusion", "plot_sweep"]
