"""The thin training layer: methods (model + loss + CAM preset), their losses, the data pipeline
and a resumable, deterministic trainer (``train``)."""

from wsss_fast.train.methods import (DEMO_SETTINGS, METHODS, Method, get_method, list_methods,
                                     register_method)
from wsss_fast.train.trainer import TrainingDiverged, train

__all__ = ["DEMO_SETTINGS", "METHODS", "Method", "TrainingDiverged", "get_method",
           "list_methods", "register_method", "train"]
