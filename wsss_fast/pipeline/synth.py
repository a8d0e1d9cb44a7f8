"""``synth``: the synthetic benchmark (DESIGN §9) as a VOC-layout dataset, deterministic by
seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wsss_fast.pipeline.options import option, path_or_none, require


@dataclass
class SynthOptions:
    out: Optional[str] = option(None, "dataset folder to write (VOC layout)")
    num_train: Optional[int] = option(None, "training images (default: the generator's)")
    num_val: Optional[int] = option(None, "validation images (default: the generator's)")
    num_classes: int = option(8, "foreground classes (≤20)")
    size: Optional[tuple[int, ...]] = option(None, "image size (default: the generator's size "
                                             "range)", nargs=2, metavar=("H", "W"))
    seed: int = option(0)
    workers: int = option(2)

    def __post_init__(self):
        self.out = path_or_none(self.out)
        if self.size is not None:
            self.size = tuple(int(v) for v in self.size)


def synth(options: SynthOptions) -> Path:
    """Generate the dataset; returns its root."""
    from wsss_fast.data.synthetic import generate_synthetic
    require(options, "out")
    given = {"num_train": options.num_train, "num_val": options.num_val,
             "image_size": options.size}
    return generate_synthetic(options.out, num_classes=options.num_classes, seed=options.seed,
                              workers=options.workers,
                              **{k: v for k, v in given.items() if v is not None})
