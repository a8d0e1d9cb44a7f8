"""The thin training layer: methods (model + loss + CAM preset), their losses, the data pipeline,
the run's configuration (``TrainConfig``) and a resumable, deterministic trainer (``train``)."""

from wsss_fast.train.config import RECIPES, TrainConfig, recipe_settings
from wsss_fast.train.methods import (METHODS, SYNTHETIC_TRAIN, Method, get_method, list_methods,
                                     register_method)
from wsss_fast.train.trainer import TrainingDiverged, train

__all__ = ["METHODS", "Method", "RECIPES", "SYNTHETIC_TRAIN", "TrainConfig", "TrainingDiverged",
           "get_method", "list_methods", "recipe_settings", "register_method", "train"]
