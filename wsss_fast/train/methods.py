"""Training methods by name: which model, which loss, which CAM preset, which checkpoint format.

Other modules add theirs with ``register_method`` (the CNN methods do). ``DEMO_SETTINGS`` holds the
recommended training settings per method for the built-in synthetic benchmark (DESIGN §9); they
are ``train()``'s defaults for options it is not given.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from wsss_fast.train import losses

CHECKPOINT_FORMATS = ("wrapped", "plain")


@dataclass(frozen=True)
class Method:
    name: str                     # e.g. "mctformer_v2"
    model: str                    # a name in wsss_fast.models.registry (e.g. "mctformer_v2_tiny")
    loss: Callable                # loss(model, images, labels) -> (loss tensor, {name: float})
    preset: str                   # CAM preset used to extract with this method
    checkpoint_format: str        # "wrapped" ({'model': sd}: MCTformer, DeiT) or "plain" (sd)
    description: str = ""


METHODS: dict[str, Method] = {}

# Per method, for the synthetic benchmark (DESIGN §9: 600 training images of 96–160 px) and the
# method's small model: "train", train() keyword arguments (its defaults for options not given),
# chosen so that training takes at most 5 minutes on 2 CPU cores; "extract", CamEngine preset
# overrides that suit these small from-scratch models. Their late blocks' patch attention
# collapses onto a few tokens, so the published affinity refinement (MCTformer's Σ-blocks A_pp,
# TransCAM's A*) flattens their maps; extraction with the published presets still runs, with
# lower mIoU (measured numbers: train/README in the report of this layer).
DEMO_SETTINGS: dict[str, dict] = {}

_VIT_TRAIN = dict(epochs=15, batch_size=16, lr=5e-4, weight_decay=0.05, warmup_epochs=1.0,
                  crop=128)
_CONFORMER_TRAIN = dict(_VIT_TRAIN, epochs=10)
_UPSCALED = (1.0, 1.5, 2.0)     # the small models see objects of 20-60 px; larger passes help
_CLASS_ATTENTION = dict(cam_kwargs={"cls_layers": 4, "refine": False, "attention_type": "mct"},
                        scales=_UPSCALED)


def register_method(method: Method) -> None:
    """Add a method; a name can be registered once."""
    if not isinstance(method, Method):
        raise ValueError(f"register_method expects a Method, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"method {method.name!r}: checkpoint_format must be one of "
                         f"{CHECKPOINT_FORMATS}, got {method.checkpoint_format!r}")
    if not callable(method.loss):
        raise ValueError(f"method {method.name!r}: loss must be callable")
    METHODS[method.name] = method


# Modules holding further methods (the CNN methods), loaded on the first lookup: their
# ``register_methods()`` is called.
_PLUGINS = ("wsss_fast.train.cnn_methods",)
_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _PLUGINS:
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:   # a missing dependency inside the plugin is a real error
                raise
            continue
        plugin.register_methods()


def get_method(name: str) -> Method:
    _load_plugins()
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods() -> list[str]:
    _load_plugins()
    return sorted(METHODS)


def _register_builtin() -> None:
    for method in (
        Method("mctformer_v1", "mctformer_v1_tiny", losses.mctformer_v1_loss, "mctformer-v1",
               "wrapped", "MCTformer-V1: MLSM on the class-token logits"),
        Method("mctformer_v2", "mctformer_v2_tiny", losses.mctformer_v2_loss, "mctformer-v2",
               "wrapped", "MCTformer-V2: MLSM on class-token and GAP(PatchCAM) logits"),
        Method("mctformer_plus", "mctformer_plus_tiny", losses.mctformer_plus_loss,
               "mctformer-plus", "wrapped",
               "MCTformer+: class-token, class-token contrast and ranking-pooled PatchCAM terms"),
        Method("mctformer_v2_doei", "mctformer_v2_doei_tiny", losses.mctformer_v2_loss,
               "mctformer-v2-doei", "wrapped",
               "MCTformer-V2 trained with the DOEI plug-in active (DESIGN §5.3)"),
        Method("transcam", "transcam_tiny", losses.transcam_loss, "transcam", "plain",
               "TransCAM: MLSM on conv + transformer logits (background slot ignored)"),
        Method("bnr", "transcam_tiny", losses.bnr_loss, "transcam", "plain",
               "BNR: TransCAM loss + MLSM(GAP(Ā*·(A*·M))) with Ā* detached"),
        Method("token_cam", "token_cam_tiny", losses.token_cam_loss, "token-cam", "plain",
               "ToCo-style token CAM: MLSM on the max-pooled 1×1 classifier logits"),
    ):
        register_method(method)
    for name in ("mctformer_v1", "mctformer_v2", "mctformer_plus", "mctformer_v2_doei"):
        DEMO_SETTINGS[name] = {"train": dict(_VIT_TRAIN), "extract": dict(_CLASS_ATTENTION)}
    DEMO_SETTINGS["token_cam"] = {"train": dict(_VIT_TRAIN), "extract": dict(scales=_UPSCALED)}
    for name in ("transcam", "bnr"):
        DEMO_SETTINGS[name] = {"train": dict(_CONFORMER_TRAIN),
                               "extract": dict(square_sizes=(128, 192, 256))}


_register_builtin()
