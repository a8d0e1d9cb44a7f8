"""IRN's pair offsets and path cells (``irn:misc/indexing.py`` ``PathIndex``; reference
affinity_networks.md §1.2), shared by the ``path_affinity`` op, IRN's affinity labels and the
random-walk weights.

* Offsets: the half disk ``O_R`` of ``half_disk_offsets`` (the *base* order, which PSA keeps);
  IRN's order is the base order stably sorted by path length.
* Path of ``δ = (dy, dx)``: every cell ``(y, x)`` of the closed bounding box of ``(0, 0)`` and
  ``δ`` whose squared distance to the line through them is ``< 1``, sorted (stably, from the
  row-major box order) by decreasing ``|y| + |x|``: element 0 is ``δ``, the last is ``(0, 0)``.
* Source window of an ``h×w`` grid: rows ``[0, h − rf)``, columns ``[rf, w − rf)``,
  ``rf = radius − 1`` — the cells from which every offset stays on the grid; sources are
  numbered row-major inside it (``get_path_indices``). R = 10 on 128×128: 119×110 = 13,090.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from wsss_fast.ops.random_walk import MAX_RADIUS, half_disk_offsets

Offset = tuple[int, int]


@functools.lru_cache(maxsize=None)
def irn_path(dy: int, dx: int) -> tuple[Offset, ...]:
    """IRN's path cells of the offset ``(dy, dx)`` in IRN's order (element 0 is ``(dy, dx)``,
    the last ``(0, 0)``); 2 to 11 cells for radius 5, 2 to 22 for radius 10."""
    length_sq = dy * dy + dx * dx
    cells = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            cross = dy * x - dx * y  # length · signed distance of (y, x) to the line
            if cross * cross < length_sq:
                cells.append((y, x))
    cells.sort(key=lambda cell: -abs(cell[0]) - abs(cell[1]))  # stable, like upstream's
    return tuple(cells)


@dataclasses.dataclass(frozen=True)
class SourceWindow:
    """The sources of an ``h×w`` grid: rows ``[top, top + rows)``, columns
    ``[left, left + cols)``, numbered row-major (``rows · cols`` of them)."""

    top: int
    left: int
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


@dataclasses.dataclass(frozen=True)
class IrnPathSet:
    """IRN's pairs of one radius.

    Attributes:
        radius: ``R``; ``floor = R − 1`` (upstream's ``radius_floor``).
        offsets: ``(dy, dx)`` in IRN's order (``search_dst``: base order stably sorted by path
            length).
        paths: per offset (same order), its path cells (``irn_path``; element 0 is the offset).
        base_offsets: the half disk in base order (PSA's order; ``half_disk_offsets``).
        base_index: ``offsets[i] == base_offsets[base_index[i]]``.
    """

    radius: int
    offsets: tuple[Offset, ...]
    paths: tuple[tuple[Offset, ...], ...]
    base_offsets: tuple[Offset, ...]
    base_index: tuple[int, ...]

    @property
    def floor(self) -> int:
        return self.radius - 1

    @property
    def num_offsets(self) -> int:
        return len(self.offsets)

    @property
    def path_lengths(self) -> tuple[int, ...]:
        return tuple(len(path) for path in self.paths)

    @property
    def num_cells(self) -> int:
        """Path cells per source, all offsets together (2,134 for R = 10)."""
        return sum(self.path_lengths)

    @property
    def max_path_length(self) -> int:
        return max(self.path_lengths, default=0)

    def window(self, h: int, w: int) -> SourceWindow:
        """The source window of an ``h×w`` grid; ValueError when it is empty."""
        rows, cols = h - self.floor, w - 2 * self.floor
        if rows < 1 or cols < 1:
            raise ValueError(f"a {h}×{w} grid is too small for radius {self.radius}: the source "
                             f"window (rows [0, h − {self.floor}), columns [{self.floor}, "
                             f"w − {self.floor})) is empty; need h >= {self.floor + 1} and "
                             f"w >= {2 * self.floor + 1}")
        return SourceWindow(0, self.floor, rows, cols)

    def pair_indices(self, h: int, w: int, device: Optional[torch.device] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat grid indices (int64) of the pairs: ``src (n_sources,)`` and ``dst (n_offsets,
        n_sources)`` (upstream's ``src_indices`` / ``dst_indices``)."""
        window = self.window(h, w)
        grid = torch.arange(h * w, device=device).view(h, w)
        src = grid[:window.rows, window.left:window.left + window.cols].reshape(-1)
        dst = [grid[dy:dy + window.rows, window.left + dx:window.left + dx + window.cols]
               .reshape(-1) for dy, dx in self.offsets]
        dst = torch.stack(dst) if dst else src.new_empty((0, window.size))
        return src, dst

    def cell_tables(self, device: Optional[torch.device] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paths flattened, offset-major: ``cells (num_cells, 2)`` int32 ``(y, x)``,
        ``start (num_offsets + 1,)`` int32 (offset ``o``'s cells are
        ``cells[start[o]:start[o + 1]]``)."""
        flat = [cell for path in self.paths for cell in path]
        cells = torch.tensor(flat, dtype=torch.int32, device=device).view(-1, 2)
        start = torch.tensor([0, *self.path_lengths], dtype=torch.int64).cumsum(0)
        return cells, start.to(device=device, dtype=torch.int32)


def check_radius(radius) -> int:
    if isinstance(radius, bool) or not isinstance(radius, int) or not 1 <= radius <= MAX_RADIUS:
        raise ValueError(f"radius must be an int in [1, {MAX_RADIUS}], got {radius!r}")
    return radius


@functools.lru_cache(maxsize=None)
def irn_path_set(radius: int) -> IrnPathSet:
    """IRN's offsets and paths of ``radius`` (152 offsets, 2,134 cells for R = 10; 34 and 242
    for R = 5; none for R = 1)."""
    check_radius(radius)
    base = half_disk_offsets(radius) if radius >= 2 else ()
    base_index = tuple(sorted(range(len(base)), key=lambda i: len(irn_path(*base[i]))))
    offsets = tuple(base[i] for i in base_index)
    return IrnPathSet(radius, offsets, tuple(irn_path(*o) for o in offsets), base, base_index)
