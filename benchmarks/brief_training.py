"""Brief training of a model by ``wsss-fast train`` on a synthetic set, for the reports that need
trained weights (random weights give nearly flat maps whose min-max normalization amplifies
rounding): ``benchmarks.compare_official`` and ``benchmarks.bf16_report --full-size``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Optional


def train_briefly(data: Path, out: Path, method: str, model: str, steps: int, *,
                  batch_size: int = 8, threads: Optional[int] = None) -> Path:
    """Train ``model`` with ``method``'s loss (the synthetic recipe) for ``steps`` steps of
    ``batch_size`` on ``data``'s train split, the schedule spanning just the epochs those steps
    need (warm-up 0.1 epoch); ``out/checkpoint.pth`` (upstream layout) is returned, and reused
    when it exists."""
    checkpoint = Path(out) / "checkpoint.pth"
    if checkpoint.exists():
        return checkpoint
    names = (Path(data) / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    if not names:
        raise ValueError(f"train_briefly: {data} has no training images")
    epochs = max(1, math.ceil(steps * batch_size / len(names)))
    cmd = [sys.executable, "-m", "wsss_fast", "train", "--method", method, "--recipe",
           "synthetic", "--model", model, "--data", str(data), "--batch-size", str(batch_size),
           "--epochs", str(epochs), "--warmup-epochs", "0.1", "--max-steps", str(steps),
           "--out", str(out), "--overwrite", "--quiet"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    print(f"training {model} briefly ({steps} steps): {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
    return checkpoint
