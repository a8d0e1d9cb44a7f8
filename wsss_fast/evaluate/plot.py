"""Threshold-sweep curves as a PNG (matplotlib, Agg canvas, no display, no pyplot state)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Tuple, Union

import numpy as np

from wsss_fast.io.atomic import atomic_write

FIGURE_SIZE_INCHES = (6.4, 4.8)
FIGURE_DPI = 100  # with FIGURE_SIZE_INCHES: a 640×480 PNG

Curve = Tuple[Sequence[float], Sequence[float]]


def _check_curve(name: str, curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    try:
        thresholds, mious = (np.asarray(part, dtype=np.float64) for part in curve)
    except (TypeError, ValueError):
        raise ValueError(f"curve {name!r} must be a pair (thresholds, mious) of numbers") from None
    if thresholds.ndim != 1 or thresholds.shape != mious.shape or thresholds.size == 0:
        raise ValueError(f"curve {name!r}: thresholds and mious must be non-empty 1-D of one "
                         f"length, got shapes {thresholds.shape} and {mious.shape}")
    finite = mious[np.isfinite(mious)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise ValueError(f"curve {name!r}: mious must be fractions in [0, 1] (as "
                         f"ThresholdSweep.miou returns), got range "
                         f"[{finite.min():.4g}, {finite.max():.4g}]")
    return thresholds, mious


def plot_sweep(curves: Mapping[str, Curve], path: Union[str, os.PathLike],
               title: str | None = None) -> Path:
    """Plot mIoU (%) against the background threshold for each named curve, mark each curve's
    best threshold (first maximum; NaN points skipped), and write a PNG atomically to ``path``."""
    if not curves:
        raise ValueError("plot_sweep needs at least one curve")
    checked = {name: _check_curve(name, curve) for name, curve in curves.items()}
    # Figure + Agg canvas directly: no pyplot, so no global backend switch or figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, (thresholds, mious) in checked.items():
        best = int(np.nanargmax(mious)) if np.isfinite(mious).any() else None
        label = name if best is None else (f"{name} (τ={thresholds[best]:.3g}: "
                                           f"{100 * mious[best]:.1f}%)")
        (line,) = axes.plot(thresholds, 100 * mious, label=label)
        if best is not None:   # the best point, marked on the curve (one legend entry)
            axes.plot(thresholds[best], 100 * mious[best], marker="*", markersize=12,
                      color=line.get_color(), linestyle="none")
    axes.set_xlabel("background threshold τ")
    axes.set_ylabel("mIoU (%)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="x-small")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=FIGURE_DPI)
    return path
