"""What the stages' options dataclasses share: required-option checks,
``KEY=VALUE`` lists, and opening the dataset. Fields are declared with ``wsss_fast.options.option``
(help, choices, CLI spelling), from which the CLI generates its flags."""

from __future__ import annotations

import os

from wsss_fast.options import (DatasetOptions, flag_of, option, option_problems,  # noqa: F401
                               path_or_none)
from wsss_fast.options import parse_key_values as key_values
from wsss_fast.pipeline.errors import OptionsError

DTYPES = ("fp32", "bf16", "fp16")


def require(options, *names: str) -> None:
    """Raise ``OptionsError`` naming the options of ``names`` that are unset, or else the
    options whose value fails its check (range, kind, choices: what the CLI refuses)."""
    missing = [flag_of(type(options), n) for n in names if getattr(options, n) in (None, "")]
    if missing:
        raise OptionsError(f"missing required option(s): {', '.join(missing)}")
    problems = option_problems(options)
    if problems:
        raise OptionsError("; ".join(problems))


def parse_key_values(pairs, option_flag: str = "--model-arg") -> dict:
    """``["k=v", ...]`` (or a mapping) -> ``{k: YAML value of v}``; ``OptionsError`` if bad."""
    try:
        return key_values(pairs, option_flag)
    except ValueError as error:
        raise OptionsError(str(error)) from error


def open_dataset_of(options: DatasetOptions):
    """The dataset the options name; a missing root or a bad split is an ``InputError``, a
    dataset without images ``NothingToDo``."""
    from wsss_fast.data.dataset import require_images
    from wsss_fast.data.factory import open_dataset
    from wsss_fast.pipeline.errors import InputError, NothingToDo
    if not os.path.isdir(options.data):
        raise InputError(f"--data {options.data}: not a folder")
    try:
        dataset = open_dataset(options.dataset, options.data, split=options.split,
                               labels=options.labels, classes=options.classes)
    except (ValueError, OSError) as error:
        raise InputError(str(error)) from error
    try:
        require_images(dataset)
    except ValueError as error:
        raise NothingToDo(str(error)) from error
    return dataset
