"""``TrainConfig``: every option of a training run, once. Its fields carry their type, default,
help and choices; ``wsss-fast train`` generates its flags from them.

The defaults are generic, for real datasets (VOC / COCO-sized images). The synthetic benchmark's
settings (crop 128, 10-15 epochs, per method) are a recipe applied only on request:
``TrainConfig.from_recipe("synthetic", method=..., ...)`` or ``wsss-fast train --recipe
synthetic``, which prints what it set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from wsss_fast.options import (DatasetOptions, choice_problems, fingerprint_fields, option,
                               parse_key_values, path_or_none)

RECIPES = ("synthetic",)
DEFAULT_JITTER = (0.3, 0.3, 0.3, 0.1)             # TransCAM's ColorJitter

_METHOD, _OPT, _AUG, _RUN = "method", "optimization", "augmentation", "run"


def _method_names():
    from wsss_fast.train.methods import list_methods
    return list_methods()


@dataclass
class TrainConfig(DatasetOptions):
    """A training run. ``fingerprint`` fields determine the trained weights (a resumed run must
    share them); the others (``out``, ``max_steps``, ``workers``, ``device``, …) may change
    between a run and its resumption."""

    method: Optional[str] = option(None, "training method", choices=_method_names,
                                   group=_METHOD)
    model: Optional[str] = option(None, "registered model name (default: the method's small "
                                  "configuration, e.g. mctformer_v2_tiny)", group=_METHOD)
    model_args: dict = option(help="architecture argument, e.g. depth=6 (repeatable)",
                              flag="--model-arg", repeat=True, metavar="KEY=VALUE",
                              group=_METHOD, default_factory=dict)
    split: Optional[str] = option("train", "split name or a path to a list file",
                                  group="dataset")
    epochs: int = option(20, "epochs the schedule spans", group=_OPT)
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps in total (the "
                                      "schedule still spans --epochs)", group=_OPT,
                                      fingerprint=False)
    batch_size: int = option(16, group=_OPT)
    lr: float = option(5e-4, "peak learning rate (AdamW)", group=_OPT)
    min_lr: float = option(1e-6, "final learning rate of the cosine decay", group=_OPT)
    weight_decay: float = option(0.05, group=_OPT)
    warmup_epochs: float = option(1.0, "linear warm-up length in epochs", group=_OPT)
    clip_grad: Optional[float] = option(None, "max gradient norm (0 or unset: off)", group=_OPT)
    crop: int = option(448, "square training crop, pixels", group=_AUG)
    resize_long: Optional[tuple[int, ...]] = option(
        None, "random long side before cropping (default 0.625-1.25 x crop)", nargs=2,
        metavar=("MIN", "MAX"), group=_AUG)
    color_jitter: Union[bool, tuple[float, ...], None] = option(
        True, "no colour jitter (default: TransCAM's strengths; in Python also (brightness, "
        "contrast, saturation, hue))", group=_AUG)
    out: Optional[str] = option(None, "output folder", group=_RUN, fingerprint=False)
    seed: int = option(0, group=_RUN)
    resume: bool = option(False, "continue the run in --out from its last saved state",
                          group=_RUN, fingerprint=False)
    overwrite: bool = option(False, "start afresh even if --out holds a run", group=_RUN,
                             fingerprint=False)
    save_every: Optional[int] = option(None, "also save every N steps (default: every epoch)",
                                       group=_RUN, fingerprint=False)
    device: str = option("auto", "cpu, cuda, cuda:N or auto", group=_RUN, fingerprint=False)
    workers: int = option(2, "data loading processes (0: in this process; no effect on "
                          "results)", group=_RUN, fingerprint=False)
    threads: Optional[int] = option(None, "torch threads (default: torch's; 1 is often faster "
                                    "on a CPU busy with other work)", group=_RUN,
                                    fingerprint=False)
    quiet: bool = option(False, "no progress bar", group=_RUN, fingerprint=False)

    def __post_init__(self):
        super().__post_init__()
        self.out = path_or_none(self.out)
        self.model_args = parse_key_values(self.model_args, "--model-arg")
        if self.resize_long is not None:
            self.resize_long = tuple(int(v) for v in self.resize_long)
        if self.color_jitter is not None and not isinstance(self.color_jitter, bool):
            self.color_jitter = tuple(float(v) for v in self.color_jitter)

    @classmethod
    def from_recipe(cls, recipe: Optional[str], **given) -> "TrainConfig":
        """A config of ``recipe``'s settings for ``given["method"]`` with ``given`` on top
        (``recipe=None``: the generic defaults)."""
        return cls(**{**recipe_settings(recipe, given.get("method")), **given})

    def problems(self) -> list[str]:
        """What is wrong with the options (empty: nothing)."""
        import math
        problems = [f"{name} is required" for name in ("method", "data", "out")
                    if getattr(self, name) in (None, "")] + choice_problems(self)
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("lr", "min_lr", "weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {value}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.clip_grad is not None and self.clip_grad < 0:
            problems.append(f"clip_grad must be > 0 (or 0/None: off), got {self.clip_grad}")
        for name in ("max_steps", "save_every", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other")
        return problems

    def resolved(self, method) -> "TrainConfig":
        """This config with the values that depend on others filled in: ``method``'s
        (a ``Method``) canonical name and model, the absolute data root, the resize range of the
        crop, the jitter strengths (None: off) and ``clip_grad`` None for off."""
        crop = int(self.crop)
        jitter = self.color_jitter
        return dataclasses.replace(
            self, method=method.name, model=self.model or method.model,
            data=str(Path(self.data).resolve()), seed=int(self.seed),
            resize_long=self.resize_long or (round(crop * 0.625), round(crop * 1.25)),
            color_jitter=DEFAULT_JITTER if jitter is True else None if jitter is False else jitter,
            clip_grad=self.clip_grad or None)

    def fingerprint(self) -> dict:
        """The fields that determine the weights, as JSON values; of a ``resolved`` config,
        what a resumed run must match and what train.json records."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name in fingerprint_fields(type(self))
                for value in [getattr(self, name)]}


def recipe_settings(recipe: Optional[str], method: Optional[str]) -> dict:
    """The TrainConfig fields that ``recipe`` sets for ``method``."""
    if recipe is None:
        return {}
    if recipe not in RECIPES:
        raise ValueError(f"unknown training recipe {recipe!r}; known: {', '.join(RECIPES)}")
    from wsss_fast.train.methods import SYNTHETIC_TRAIN, get_method
    if method is None:
        raise ValueError(f"the {recipe} recipe needs a method")
    return {**SYNTHETIC_TRAIN, **get_method(method).synthetic_train}
