"""``synth``: the synthetic benchmark (DESIGN §9) as a VOC-layout dataset, deterministic by
seed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from wsss_fast.data.synthetic import MAX_CLASSES
from wsss_fast.options import Number, normalize_options, seed_int, worker_count
from wsss_fast.pipeline.options import option, path_or_none, require

IMAGE_COUNT = Number(integer=True, minimum=0, maximum=999_999)     # the generator's limit


@dataclass
class SynthOptions:
    out: Optional[str] = option(None, "dataset folder to write (VOC layout)")
    num_train: Optional[int] = option(None, "training images (default: the generator's)",
                                      check=IMAGE_COUNT)
    num_val: Optional[int] = option(None, "validation images (default: the generator's)",
                                    check=IMAGE_COUNT)
    num_classes: int = option(8, f"foreground classes (≤{MAX_CLASSES})",
                              check=Number(integer=True, minimum=1, maximum=MAX_CLASSES))
    size: Optional[tuple[int, ...]] = option(None, "image size (default: the generator's size "
                                             "range)", nargs=2, metavar=("H", "W"),
                                             check=Number(integer=True, minimum=32,
                                                          maximum=4096))
    seed: int = option(0, check=seed_int)
    workers: int = option(2, check=worker_count)

    def __post_init__(self):
        normalize_options(self)
        self.out = path_or_none(self.out)


def synth(options: SynthOptions) -> Path:
    """Generate the dataset; returns its root."""
    from wsss_fast.data.synthetic import generate_synthetic
    require(options, "out")
    given = {"num_train": options.num_train, "num_val": options.num_val,
             "image_size": options.size}
    return generate_synthetic(options.out, num_classes=options.num_classes, seed=options.seed,
                              workers=options.workers,
                              **{k: v for k, v in given.items() if v is not None})
