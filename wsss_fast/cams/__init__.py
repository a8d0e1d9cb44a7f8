"""CAM methods as named presets of the multi-scale engine."""

from wsss_fast.cams.presets import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "get_preset"]
