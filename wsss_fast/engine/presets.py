"""Named presets: how each published generator resizes, runs, merges and normalizes its passes.

Each preset reproduces its official generator (reference/vit_methods.md §1.3, §2.3, §5.2); every
field can be overridden (``get_preset("mctformer_v2", scales=(1.0, 0.75, 1.25))``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Optional

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_fast.ops.multiscale_merge import MERGES, NORMS
from wsss_fast.registry import Registry

RESIZES = ("pil_bicubic", "tensor_bilinear")


@dataclass(frozen=True)
class Preset:
    name: str
    scales: tuple[float, ...] = (1.0,)
    # Resize each pass to a square of these sides instead of scaling (TransCAM: 256/512/768).
    square_sizes: Optional[tuple[int, ...]] = None
    flip: bool = True
    # "pil_bicubic": PIL resize of the image to (round(W·s), round(H·s)) (MCTformer, TransCAM);
    # "tensor_bilinear": F.interpolate of the normalized image to (int(H·s), int(W·s)) (ToCo).
    resize: str = "pil_bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    merge: str = "sum"                 # multiscale_merge: "sum" | "max_flip"
    norm: str = "minmax"               # "minmax" | "max" | "transcam" | "none"
    eps: Optional[float] = None        # None: the norm's default
    relu: bool = False                 # ReLU each resized pass
    drop_channels: int = 0             # leading model outputs that are not classes (TransCAM bg)
    cam_kwargs: dict = field(default_factory=dict)  # passed to model.cam_maps
    # IRN make_cam: merge the full-resolution maps at g⌈H/g⌉ × g⌈W/g⌉, then crop to H × W.
    high_res_grid: Optional[int] = None

    def __post_init__(self):
        # Checked here, so a bad override (`--preset-arg scales=abc`) is one error naming the
        # field before any image is read, not a failure of every image.
        def fail(what, value):
            raise ValueError(f"preset {self.name!r}: {what}, got {value!r}")

        def positive_numbers(name, value, integral=False):
            kind = int if integral else Real
            if (not isinstance(value, (tuple, list)) or not value
                    or not all(isinstance(x, kind) and not isinstance(x, bool)
                               and math.isfinite(x) and x > 0 for x in value)):
                fail(f"{name} must be a non-empty list of positive "
                     f"{'integers' if integral else 'numbers'}", value)

        positive_numbers("scales", self.scales)
        if self.square_sizes is not None:
            positive_numbers("square_sizes", self.square_sizes, integral=True)
        for name in ("flip", "relu"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name} must be true or false", getattr(self, name))
        if self.resize not in RESIZES:
            fail(f"resize must be one of {', '.join(RESIZES)}", self.resize)
        if self.merge not in MERGES:
            fail(f"merge must be one of {', '.join(MERGES)}", self.merge)
        if self.norm not in NORMS:
            fail(f"norm must be one of {', '.join(NORMS)}", self.norm)
        if self.eps is not None and (not isinstance(self.eps, Real) or isinstance(self.eps, bool)
                                     or not math.isfinite(self.eps) or self.eps < 0):
            fail("eps must be a finite number >= 0 (or null: the norm's default)", self.eps)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or len(value) != 3
                    or not all(isinstance(x, Real) and math.isfinite(x) for x in value)):
                fail(f"{name} must be 3 numbers (R, G, B)", value)
        if not all(x > 0 for x in self.std):
            fail("std must be positive", self.std)
        if not isinstance(self.drop_channels, int) or self.drop_channels < 0:
            fail("drop_channels must be an integer >= 0", self.drop_channels)
        if self.high_res_grid is not None and (not isinstance(self.high_res_grid, int)
                                               or self.high_res_grid < 1):
            fail("high_res_grid must be a positive integer (or null)", self.high_res_grid)
        if not isinstance(self.cam_kwargs, dict):
            fail("cam_kwargs must be a mapping", self.cam_kwargs)

    @property
    def sizes(self) -> tuple:
        """Per pass (before its flip): a square side, or a scale of the image."""
        return self.square_sizes if self.square_sizes is not None else self.scales


# Canonical names are the method families' (lower case, "_"): a model entry of family
# "mctformer_v2" extracts with preset "mctformer_v2"; "mctformer-v2" still resolves.
PRESETS: Registry[Preset] = Registry("preset")


def register_preset(preset: Preset, *, override: bool = False) -> Preset:
    """Add ``preset`` under its name (``get_preset(preset.name)`` then finds it)."""
    if not isinstance(preset, Preset):
        raise ValueError(f"register a Preset, got {type(preset).__name__}")
    return PRESETS.register(preset.name, preset, override=override)


for _preset in (
    # engine.generate_attention_maps_ms @96065977: the published scripts use --scales 1.0,
    # --layer-index 3, --patch-attn-refine; V2 with attention_type 'fused'.
    Preset("mctformer_v1", cam_kwargs={"cls_layers": 3, "refine": True}),
    Preset("mctformer_v2", cam_kwargs={"cls_layers": 3, "refine": True,
                                       "attention_type": "fused"}),
    # MCTformer+ (HEAD): scales 1.0, 0.75, 1.25 + flips, class attention averaged over all 12
    # blocks, sqrt-fused with PatchCAM, refined by the affinity of all blocks.
    Preset("mctformer_plus", scales=(1.0, 0.75, 1.25),
           cam_kwargs={"cls_layers": 12, "refine": True, "attention_type": "fused"}),
    # DOEI (DESIGN §5.3) on MCTformer-V2: the V2 generator's settings; the DOEI hyper-parameters
    # belong to the model (wsss_fast.models.doei.DOEI; registry model "mctformer_v2_doei").
    Preset("mctformer_v2_doei", cam_kwargs={"cls_layers": 3, "refine": True,
                                            "attention_type": "fused"}),
    # infer_TransCAM.py: square 256/512/768 + flips, bg output dropped, TransCAM's normalization.
    Preset("transcam", square_sizes=(256, 512, 768), norm="transcam", drop_channels=1),
    # ToCo's multi_scale_cam2: bilinear rescales, image and flip merged by max, ReLU, sum over
    # scales, (x - min) / (max - min + 1e-5).
    Preset("token_cam", scales=(1.0, 0.5, 1.5), resize="tensor_bilinear", merge="max_flip",
           relu=True, norm="minmax", eps=1e-5, cam_kwargs={"kind": "token"}),
    # IRN make_cam (also LPCAM's CAM step): PIL bicubic rescales 1.0/0.5/1.5/2.0 + flips, CAMs
    # ReLU'd at feature resolution by the model, summed, x / (max + 1e-5) per class.
    Preset("irn_cam", scales=(1.0, 0.5, 1.5, 2.0), norm="max", eps=1e-5, high_res_grid=16),
    # EDAM infer_cls.py: the same 8 passes of DA masks, summed, x / max per class (no epsilon).
    Preset("edam", scales=(1.0, 0.5, 1.5, 2.0), norm="max", eps=0.0),
):
    register_preset(_preset)

def get_preset(preset, **overrides) -> Preset:
    """A preset by name (or a Preset), with fields overridden."""
    if isinstance(preset, str):
        preset = PRESETS.get(preset)
    if not isinstance(preset, Preset):
        raise ValueError(f"preset must be a name or a Preset, got {type(preset).__name__}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Preset)}
    if unknown:
        raise ValueError(f"unknown preset fields: {', '.join(sorted(unknown))}")
    return dataclasses.replace(preset, **overrides)
