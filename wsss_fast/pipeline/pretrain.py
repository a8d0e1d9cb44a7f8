"""``pretrain``: a family's tiny backbone pretrained on the procedural source domain
(``wsss_fast.train.pretrain``), as a stage that returns the checkpoint and its record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wsss_fast.pipeline.errors import OptionsError
from wsss_fast.train.pretrain import PretrainConfig
from wsss_fast.train.pretrain import pretrain as run_pretraining


@dataclass
class PretrainResult:
    checkpoint: Path
    record: dict       # family, model, steps, seed, val_map, minutes, settings, command, history


def pretrain(config: PretrainConfig, command: Optional[str] = None) -> PretrainResult:
    """Pretrain (or resume) ``config``; bad options raise ``OptionsError``. One run at a time
    per output file (``RunLocked`` names the holder)."""
    from wsss_fast.io.locks import RunLock
    from wsss_fast.io.run_state import STATE_DIR
    problems = config.problems() if isinstance(config, PretrainConfig) else [
        f"expected a PretrainConfig, got {type(config).__name__}"]
    if problems:
        raise OptionsError("pretrain: " + "; ".join(problems))
    out = Path(config.out)
    with RunLock(out.parent / STATE_DIR / f"pretrain.{out.name}.lock",
                 what=f"`pretrain` of {out}"):
        try:
            record = run_pretraining(config, command=command)
        except ValueError as error:
            if type(error) is ValueError:     # a refused output file or resume
                raise OptionsError(str(error)) from error
            raise
    return PretrainResult(checkpoint=out, record=record)
