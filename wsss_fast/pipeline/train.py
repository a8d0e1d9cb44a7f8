"""``train``: a classifier trained with its method's loss (``wsss_fast.train``), as a stage that
returns its checkpoint and report."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from wsss_fast.data.dataset import EmptyDataset
from wsss_fast.pipeline.errors import NothingToDo, OptionsError
from wsss_fast.train import TrainConfig
from wsss_fast.train import train as run_training
from wsss_fast.train.trainer import check_out_folder


@dataclass
class TrainResult:
    checkpoint: Path
    report: dict          # what OUT/train.json holds

    @property
    def out_dir(self) -> Path:
        return self.checkpoint.parent


def train_lock(out):
    """The lock of a training run in ``out`` (``OUT/.wsss-fast/train.rank<r>.lock``), held for
    the whole run: a second run there is refused with ``RunLocked`` naming the holder."""
    from wsss_fast.io.locks import RunLock
    from wsss_fast.io.run_state import STATE_DIR
    rank = int(os.environ.get("RANK", 0))
    return RunLock(Path(out) / STATE_DIR / f"train.rank{rank}.lock",
                   what=f"`train` rank {rank} in {out}")


def train(config: TrainConfig) -> TrainResult:
    """Train (or resume) the run of ``config``; bad options raise ``OptionsError``, a dataset
    without labelled images ``NothingToDo`` (exit status 1)."""
    problems = config.problems()
    if problems:
        raise OptionsError("train: " + "; ".join(problems))
    check_out_folder(config)   # before the lock: a refused run leaves no folder behind
    with train_lock(config.out):   # one run at a time per output folder (RunLocked)
        try:
            checkpoint = run_training(config)
        except EmptyDataset as error:
            raise NothingToDo(str(error)) from error
    report = json.loads((checkpoint.parent / "train.json").read_text(encoding="utf-8"))
    return TrainResult(checkpoint=checkpoint, report=report)
