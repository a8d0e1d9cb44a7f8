"""Named presets: how each published generator resizes, runs, merges and normalizes its passes.

Each preset reproduces its official generator (reference/vit_methods.md §1.3, §2.3, §5.2); every
field can be overridden (``get_preset("mctformer-v2", scales=(1.0, 0.75, 1.25))``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD


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

    @property
    def sizes(self) -> tuple:
        """Per pass (before its flip): a square side, or a scale of the image."""
        return self.square_sizes if self.square_sizes is not None else self.scales


PRESETS = {
    # engine.generate_attention_maps_ms @96065977: the published scripts use --scales 1.0,
    # --layer-index 3, --patch-attn-refine; V2 with attention_type 'fused'.
    "mctformer-v1": Preset("mctformer-v1", cam_kwargs={"cls_layers": 3, "refine": True}),
    "mctformer-v2": Preset("mctformer-v2", cam_kwargs={"cls_layers": 3, "refine": True,
                                                       "attention_type": "fused"}),
    # MCTformer+ (HEAD): scales 1.0, 0.75, 1.25 + flips, class attention averaged over all 12
    # blocks, sqrt-fused with PatchCAM, refined by the affinity of all blocks.
    "mctformer-plus": Preset("mctformer-plus", scales=(1.0, 0.75, 1.25),
                             cam_kwargs={"cls_layers": 12, "refine": True,
                                         "attention_type": "fused"}),
    # DOEI (DESIGN §5.3) on MCTformer-V2: the V2 generator's settings; the DOEI hyper-parameters
    # belong to the model (wsss_fast.models.doei.DOEI; registry model "mctformer_v2_doei").
    "mctformer-v2-doei": Preset("mctformer-v2-doei",
                                cam_kwargs={"cls_layers": 3, "refine": True,
                                            "attention_type": "fused"}),
    # infer_TransCAM.py: square 256/512/768 + flips, bg output dropped, TransCAM's normalization.
    "transcam": Preset("transcam", square_sizes=(256, 512, 768), norm="transcam", drop_channels=1),
    # ToCo's multi_scale_cam2: bilinear rescales, image and flip merged by max, ReLU, sum over
    # scales, (x - min) / (max - min + 1e-5).
    "token-cam": Preset("token-cam", scales=(1.0, 0.5, 1.5), resize="tensor_bilinear",
                        merge="max_flip", relu=True, norm="minmax", eps=1e-5,
                        cam_kwargs={"kind": "token"}),
    # IRN make_cam (also LPCAM's CAM step): PIL bicubic rescales 1.0/0.5/1.5/2.0 + flips, CAMs
    # ReLU'd at feature resolution by the model, summed, x / (max + 1e-5) per class.
    "irn-cam": Preset("irn-cam", scales=(1.0, 0.5, 1.5, 2.0), norm="max", eps=1e-5,
                      high_res_grid=16),
    # EDAM infer_cls.py: the same 8 passes of DA masks, summed, x / max per class (no epsilon).
    "edam": Preset("edam", scales=(1.0, 0.5, 1.5, 2.0), norm="max", eps=0.0),
}

RESIZES = ("pil_bicubic", "tensor_bilinear")


def get_preset(preset, **overrides) -> Preset:
    """A preset by name (or a Preset), with fields overridden."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
        preset = PRESETS[preset]
    if not isinstance(preset, Preset):
        raise ValueError(f"preset must be a name or a Preset, got {type(preset).__name__}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Preset)}
    if unknown:
        raise ValueError(f"unknown preset fields: {', '.join(sorted(unknown))}")
    preset = dataclasses.replace(preset, **overrides)
    if preset.resize not in RESIZES:
        raise ValueError(f"resize must be one of {RESIZES}, got {preset.resize!r}")
    return preset
