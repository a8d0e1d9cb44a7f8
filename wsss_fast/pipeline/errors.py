"""Exceptions of the pipeline API. Each carries its cause (``raise ... from error``) instead of
an exit status; the CLI prints the message as one line and exits with status 2 (``NothingToDo``:
1, as for a run whose every item was skipped)."""

from __future__ import annotations


class PipelineError(ValueError):
    """A stage could not run: bad options, unusable inputs or an output folder it may not use."""


class OptionsError(PipelineError):
    """An option is missing, out of range or inconsistent with another one."""


class InputError(PipelineError):
    """An input named by the options (dataset, checkpoint, CAM folder, prototypes) is missing or
    unusable."""


class NothingToDo(InputError):
    """The dataset has no usable item (no ids, every id dropped at indexing, no image with
    ground truth to evaluate): exit status 1."""

    exit_status = 1
