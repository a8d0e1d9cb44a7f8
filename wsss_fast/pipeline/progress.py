"""The progress bar of the stages (stderr, one line per rank)."""

from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm import tqdm


def progress(items: Iterable, total: Optional[int], desc: str, quiet: bool = False,
             rank: int = 0):
    return tqdm(items, total=total, desc=desc, unit="img", dynamic_ncols=True, position=rank,
                mininterval=1.0, disable=quiet, file=sys.stderr)
