"""``train``: a classifier trained with its method's loss (``wsss_fast.train``), as a stage that
returns its checkpoint and report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wsss_fast.data.dataset import EmptyDataset
from wsss_fast.pipeline.errors import NothingToDo, OptionsError
from wsss_fast.train import TrainConfig
from wsss_fast.train import train as run_training


@dataclass
class TrainResult:
    checkpoint: Path
    report: dict          # what OUT/train.json holds

    @property
    def out_dir(self) -> Path:
        return self.checkpoint.parent


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) the run of ``config``; bad options raise ``OptionsError``, a dataset
    without labelled images ``NothingToDo`` (exit status 1)."""
    problems = config.problems()
    if problems:
        raise OptionsError("train: " + "; ".join(problems))
    try:
        checkpoint = run_training(config)
    except EmptyDataset as error:
        raise NothingToDo(str(error)) from error
    report = json.loads((checkpoint.parent / "train.json").read_text(encoding="utf-8"))
    return TrainResult(checkpoint=checkpoint, report=report)
