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
# The optimization options a method may give other defaults (``Method.defaults``); these are
# the AdamW methods'.
GENERIC_OPTIMIZATION = dict(epochs=20, batch_size=16, lr=5e-4, weight_decay=0.05)
PIXELS = Number(integer=True, minimum=1, maximum=16384)       # a crop or a resized side
THREADS = Number(integer=True, minimum=1, maximum=1024)
WARM_EPOCHS = Number(integer=True, minimum=0, maximum=100_000)


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
    epochs: Optional[int] = option(None, "epochs the schedule spans (default: the method's; 20, "
                                   "irn 3)", group=_OPT, check=positive_int)
    warm_epochs: int = option(0, "methods with a warm phase (edam): the first N epochs train "
                              "its warm-phase loss (edam: the plain-CAM loss on the DA layer's "
                              "raw class maps), the rest the method's own; one schedule spans "
                              "--epochs", group=_OPT, check=WARM_EPOCHS)
    freeze_trunk: bool = option(False, "with --warm-epochs: after the warm phase only the "
                                "layers past the model's trunk train (edam: the DA layer, the "
                                "CMA and its heads; the trunk's weights stay the warm phase's)",
                                group=_OPT)
    lr_after_warm: float = option(1.0, "with --warm-epochs: multiplies the schedule's "
                                  "learning rate after the warm phase", group=_OPT,
                                  check=positive_float)
    max_steps: Optional[int] = option(None, "stop after this many optimizer steps in total (the "
                                      "schedule still spans --epochs)", group=_OPT,
                                      fingerprint=False, check=positive_int)
    batch_size: Optional[int] = option(None, "default: the method's (16; irn 32)", group=_OPT,
                                       check=positive_int)
    lr: Optional[float] = option(None, "peak learning rate (default: the method's; AdamW 5e-4, "
                                 "irn SGD 0.1 for the boundary head, x10 displacement)",
                                 group=_OPT, check=positive_float)
    min_lr: float = option(1e-6, "final learning rate of the cosine decay (AdamW methods)",
                           group=_OPT, check=nonneg_float)
    weight_decay: Optional[float] = option(None, "default: the method's (0.05; irn 1e-4)",
                                           group=_OPT, check=nonneg_float)
    momentum: Optional[float] = option(
        None, "SGD momentum of the SGD methods (irn, affinitynet). Default: the weight decay, reproducing "
        "IRN's PolyOptimizer, which passes weight_decay in SGD's momentum slot (1e-4: "
        "effectively no momentum); 0.9 for textbook SGD", group=_OPT, check=nonneg_float)
    warmup_epochs: float = option(1.0, "linear warm-up length in epochs (AdamW methods)",
                                  group=_OPT, check=nonneg_float)
    clip_grad: Optional[float] = option(None, "max gradient norm (0 or unset: off)", group=_OPT,
                                        check=nonneg_float)
    crop: int = option(448, "square training crop, pixels", group=_AUG, check=PIXELS)
    resize_long: Optional[tuple[int, ...]] = option(
        None, "random long side before cropping (default 0.625-1.25 x crop)", nargs=2,
        metavar=("MIN", "MAX"), group=_AUG, check=PIXELS)
    color_jitter: Union[bool, tuple[float, ...], None] = option(
        True, "no colour jitter (default: TransCAM's strengths; in Python also (brightness, "
        "contrast, saturation, hue))", group=_AUG, check=check_jitter)
    # The affinity networks' training inputs: IRN's confident regions, PSA's CAMs.
    ir_labels: Optional[str] = option(
        None, "irn: folder of confident-region labels <id>.png (pseudo-label --rule confident "
        "writes them, under its --out/labels; 0 background, k class k, 255 unsure)",
        group="dataset")
    cams: Optional[str] = option(None, "affinitynet: CAM files (<id>.npy, max-normalized) of the "
                                 "split, for PSA's la / ha CRF labels (α 4 / 32)", group=_METHOD)
    backbone: Optional[str] = option(
        None, "irn: classifier checkpoint (resnet_cam, e.g. irn_cam / LPCAM's) whose ResNet is "
        "loaded and frozen, as IRN freezes its ImageNet ResNet (without it the backbone is "
        "trained with the heads); affinitynet: the ResNet-38 trunk's start (EDAM / PSA "
        "resnet38_cls)", group=_METHOD)
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
        for name in ("init", "ir_labels", "cams", "backbone"):
            setattr(self, name, path_or_none(getattr(self, name)))
        self.model_args = parse_key_values(self.model_args, "--model-arg")

    @classmethod
    def from_recipe(cls, recipe: Optional[str], **given) -> "TrainConfig":
        """A config of ``recipe``'s settings for ``given["method"]`` with ``given`` on top
        (the method's ``defaults`` fill the optimization options left None: ``resolved``)."""
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
        from wsss_fast.train.methods import METHODS
        if isinstance(self.method, str) and self.method in METHODS:
            chosen = METHODS.get(self.method)
            if not problems:
                problems.extend(self._warm_phase_problems(chosen))
            if chosen.check is not None and not problems:
                problems.extend(chosen.check(self))
        return problems

    def _warm_phase_problems(self, chosen) -> list[str]:
        if not self.warm_epochs:
            return [f"{flag} needs --warm-epochs N > 0 (it applies after the warm phase)"
                    for flag, given in (("--freeze-trunk", self.freeze_trunk),
                                        ("--lr-after-warm", self.lr_after_warm != 1.0))
                    if given]
        if chosen.warm_loss is None:
            from wsss_fast.train.methods import METHODS
            with_warm = [name for name in METHODS.names()
                         if METHODS.get(name).warm_loss is not None]
            return [f"--warm-epochs does not apply to --method {chosen.name} (no warm-phase "
                    f"loss; methods with one: {', '.join(with_warm) or 'none'})"]
        epochs = self.epochs if self.epochs is not None else \
            {**GENERIC_OPTIMIZATION, **chosen.defaults}["epochs"]
        if self.warm_epochs >= epochs:
            return [f"--warm-epochs {self.warm_epochs} must be below --epochs {epochs} (the "
                    f"method's own loss trains the last epochs)"]
        return []

    def resolved(self, method) -> "TrainConfig":
        """This config with the values that depend on others filled in: ``method``'s
        (a ``Method``) canonical name, model and optimization defaults (for the options left
        None), the absolute ir-label, backbone and data paths, the resize range of the crop, the
        jitter strengths (None: off) and ``clip_grad`` None for off."""
        crop = int(self.crop)
        jitter = self.color_jitter
        defaults = {**GENERIC_OPTIMIZATION, **method.defaults}
        filled = {name: defaults[name] for name in GENERIC_OPTIMIZATION
                  if getattr(self, name) is None}
        paths = {name: str(Path(getattr(self, name)).resolve())
                 for name in ("ir_labels", "cams", "backbone") if getattr(self, name) is not None}
        return dataclasses.replace(
            self, **filled, **paths, method=method.name, model=self.model or method.model,
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
    """The TrainConfig fields that ``recipe`` sets for ``method`` (``recipe=None``: none; the
    method's ``defaults`` — e.g. IRN's and AffinityNet's SGD — apply in ``resolved``)."""
    from wsss_fast.train.methods import SYNTHETIC_TRAIN, get_method
    if recipe is None:
        return {}
    if recipe not in RECIPES:
        raise ValueError(f"unknown training recipe {recipe!r}; known: {', '.join(RECIPES)}")
    if method is None:
        raise ValueError(f"the {recipe} recipe needs a method")
    chosen = get_method(method)
    return {**SYNTHETIC_TRAIN, **chosen.defaults, **chosen.synthetic_train}
