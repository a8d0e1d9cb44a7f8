"""CAM extraction: ``CamEngine`` runs a model's passes under a named ``Preset`` (multi-scale,
flipped, merged and normalized as each published generator does); ``engine.lpcam`` builds LPCAM
prototypes and extracts their heatmaps through the same loop."""

from wsss_fast.engine.cam_engine import CamEngine, CamResult, load_image, to_normalized_tensor
from wsss_fast.engine.memory import ImageTooLarge
from wsss_fast.engine.presets import PRESETS, Preset, get_preset, register_preset

__all__ = ["PRESETS", "CamEngine", "CamResult", "ImageTooLarge", "Preset", "get_preset",
           "load_image", "register_preset", "to_normalized_tensor"]
