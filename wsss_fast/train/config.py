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

from wsss_fast.options import (DatasetOptions, Number, device_name, fingerprint_fields,
                               nonneg_float, option, option_problems, parse_key_values,
                               path_or_none, positive_float, positive_int, seed_int, worker_count)

RECIPES = ("synthetic",)
DEFAULT_JITTER = (0.3, 0.3, 0.3, 0.1)             # TransCAM's ColorJitter

_METHOD, _OPT, _AUG, _RUN = "method", "optimization", "augmentation", "run"
PIXELS = Number(integer=True, minimum=1, maximum=16384)       # a crop or a resized side
THREADS = Number(integer=True, minimum=1, maximum=1024)


def check_jitter(value):
    """``color_jitter``: True/False (TransCAM's strengths / off) or (brightness, contrast,
    saturation, hue) with values >= 0 and hue <= 0.5 (``AugmentConfig``'s rule)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) \
            or len(value) != 4:
        raise ValueError(f"expected True, False or (brightness, contrast, saturation, hue), got "
                         f"{value!r}")
    strengths = tuple(nonneg_float(v) for v in value)
    if strengths[3] > 0.5:
        raise ValueError(f"expected a hue strength <= 0.5, got {value!r}")
    return strengths


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
    init: Optional[str] = option(None, "start from this pretrained backbone (wsss-fast "
                                 "pretrain): every tensor that fits by name and shape is "
                                 "loaded, the rest reported", group=_METHOD)
    split: Optional[str] = option("train", "split name or a path to a list file",
                                  group="dataset")
    epochs: int = option(20, "epochs the schedule spans", group=_OPT, check=positive_int)
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps in total (the "
                                      "schedule still spans --epochs)", group=_OPT,
                                      fingerprint=False, check=positive_int)
    batch_size: int = option(16, group=_OPT, check=positive_int)
    lr: float = option(5e-4, "peak learning rate (AdamW)", group=_OPT, check=positive_float)
    min_lr: float = option(1e-6, "final learning rate of the cosine decay", group=_OPT,
                           check=nonneg_float)
    weight_decay: float = option(0.05, group=_OPT, check=nonneg_float)
    warmup_epochs: float = option(1.0, "linear warm-up length in epochs", group=_OPT,
                                  check=nonneg_float)
    clip_grad: Optional[float] = option(None, "max gradient norm (0 or unset: off)", group=_OPT,
                                        check=nonneg_float)
    crop: int = option(448, "square training crop, pixels", group=_AUG, check=PIXELS)
    resize_long: Optional[tuple[int, ...]] = option(
        None, "random long side before cropping (default 0.625-1.25 x crop)", nargs=2,
        metavar=("MIN", "MAX"), group=_AUG, check=PIXELS)
    color_jitter: Union[bool, tuple[float, ...], None] = option(
        True, "no colour jitter (default: TransCAM's strengths; in Python also (brightness, "
        "contrast, saturation, hue))", group=_AUG, check=check_jitter)
    out: Optional[str] = option(None, "output folder", group=_RUN, fingerprint=False)
    seed: int = option(0, group=_RUN, check=seed_int)
    resume: bool = option(False, "continue the run in --out from its last saved state",
                          group=_RUN, fingerprint=False)
    overwrite: bool = option(False, "start afresh even if --out holds a run", group=_RUN,
                             fingerprint=False)
    save_every: Optional[int] = option(None, "also save every N steps (default: every epoch)",
                                       group=_RUN, fingerprint=False, check=positive_int)
    device: str = option("auto", "cpu, cuda, cuda:N or auto", group=_RUN, fingerprint=False,
                         check=device_name)
    workers: int = option(2, "data loading processes (0: in this process; no effect on "
                          "results)", group=_RUN, fingerprint=False, check=worker_count)
    threads: Optional[int] = option(None, "torch threads (default: torch's; 1 is often faster "
                                    "on a CPU busy with other work)", group=_RUN,
                                    fingerprint=False, check=THREADS)
    quiet: bool = option(False, "no progress bar", group=_RUN, fingerprint=False)

    def __post_init__(self):
        super().__post_init__()
        self.out = path_or_none(self.out)
        self.init = path_or_none(self.init)
        self.model_args = parse_key_values(self.model_args, "--model-arg")

    @classmethod
    def from_recipe(cls, recipe: Optional[str], **given) -> "TrainConfig":
        """A config of ``recipe``'s settings for ``given["method"]`` with ``given`` on top
        (``recipe=None``: the generic defaults)."""
        return cls(**{**recipe_settings(recipe, given.get("method")), **given})

    def problems(self) -> list[str]:
        """What is wrong with the options (empty: nothing)."""
        problems = [f"{name} is required" for name in ("method", "data", "out")
                    if getattr(self, name) in (None, "")] + option_problems(self)
        if (isinstance(self.resize_long, tuple) and len(self.resize_long) == 2
                and not self.resize_long[0] <= self.resize_long[1]):
            problems.append(f"--resize-long {self.resize_long[0]} {self.resize_long[1]}: "
                            f"expected MIN <= MAX")
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
