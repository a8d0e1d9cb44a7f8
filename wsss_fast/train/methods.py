"""Training methods by name: which model, which loss, which CAM preset, which checkpoint format.

``METHODS`` is a ``wsss_fast.registry.Registry``: each method registers where it is defined (the
ViT methods here, the CNN methods in ``cnn_methods``); custom methods add themselves with
``register_method``. A method also carries its settings for the built-in synthetic benchmark
(``synthetic_train``, ``synthetic_extract``): the demo and ``--recipe synthetic`` pass them
explicitly; they are never the defaults of a run on other data (``TrainConfig``'s are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from wsss_fast.registry import Registry
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
    # The synthetic benchmark's recipe (DESIGN §9: 600 training images of 96–160 px, the
    # method's small model): TrainConfig fields over SYNTHETIC_TRAIN, and CamEngine preset
    # overrides that suit these small from-scratch models.
    synthetic_train: Mapping = field(default_factory=dict)
    synthetic_extract: Mapping = field(default_factory=dict)
    # TrainConfig optimization defaults of this method over config.GENERIC_OPTIMIZATION (used
    # for the options left None), e.g. IRN's SGD lr 0.1.
    defaults: Mapping = field(default_factory=dict)
    # The training loop: None for trainer.py's (image-level labels, AdamW); a method with other
    # data or optimizer (IRN: ir-labels, SGD-poly; AffinityNet: CAMs, PSA's pairs) gives its
    # own, with trainer._run's signature.
    runner: Optional[Callable] = None
    # ``check(config) -> [problem, ...]``: the method's own option checks (TrainConfig.problems)
    check: Optional[Callable] = None
    # The loss of the first ``TrainConfig.warm_epochs`` epochs, with ``loss``'s signature (EDAM:
    # the plain-CAM loss); None: the method has no warm phase.
    warm_loss: Optional[Callable] = None


METHODS: Registry[Method] = Registry("method", builtin_modules=(
    "wsss_fast.train.methods", "wsss_fast.train.cnn_methods", "wsss_fast.train.irn_trainer",
    "wsss_fast.train.affinitynet_trainer"))


def register_method(method: Method, *, override: bool = False) -> Method:
    """Add a method under its name (canonical spelling, registered once unless ``override``)."""
    if not isinstance(method, Method):
        raise ValueError(f"register_method expects a Method, got {type(method).__name__}")
    if method.checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"method {method.name!r}: checkpoint_format must be one of "
                         f"{CHECKPOINT_FORMATS}, got {method.checkpoint_format!r}")
    if not callable(method.loss):
        raise ValueError(f"method {method.name!r}: loss must be callable")
    if method.warm_loss is not None and not callable(method.warm_loss):
        raise ValueError(f"method {method.name!r}: warm_loss must be callable or None")
    return METHODS.register(method.name, method, override=override)


def get_method(name: str) -> Method:
    return METHODS.get(name)


def list_methods() -> list[str]:
    return METHODS.names()


# The synthetic recipe's base, for every method: chosen so that training takes at most 5 minutes
# on 2 CPU cores. Small from-scratch ViTs' late blocks' patch attention collapses onto a few
# tokens, so MCTformer's Σ-blocks A_pp refinement flattens their maps (the ViT rows use class
# attention instead). TransCAM's A* keeps its published form: the tiny Conformer starts its
# attention mimetic (models.conformer.SMALL_CONFORMER), so it trains into a content affinity.
SYNTHETIC_TRAIN = dict(epochs=10, batch_size=16, lr=5e-4, min_lr=1e-6, weight_decay=0.05,
                       warmup_epochs=1.0, crop=128)
_VIT_TRAIN = dict(epochs=15)
_CONFORMER_TRAIN = dict(epochs=10)
_UPSCALED = (1.0, 1.5, 2.0)     # the small models see objects of 20-60 px; larger passes help
_CLASS_ATTENTION = dict(cam_kwargs={"cls_layers": 4, "refine": False, "attention_type": "mct"},
                        scales=_UPSCALED)

for _method in (
    Method("mctformer_v1", "mctformer_v1_tiny", losses.mctformer_v1_loss, "mctformer_v1",
           "wrapped", "MCTformer-V1: MLSM on the class-token logits",
           _VIT_TRAIN, _CLASS_ATTENTION),
    Method("mctformer_v2", "mctformer_v2_tiny", losses.mctformer_v2_loss, "mctformer_v2",
           "wrapped", "MCTformer-V2: MLSM on class-token and GAP(PatchCAM) logits",
           _VIT_TRAIN, _CLASS_ATTENTION),
    Method("mctformer_plus", "mctformer_plus_tiny", losses.mctformer_plus_loss,
           "mctformer_plus", "wrapped",
           "MCTformer+: class-token, class-token contrast and ranking-pooled PatchCAM terms",
           _VIT_TRAIN, _CLASS_ATTENTION),
    Method("mctformer_v2_doei", "mctformer_v2_doei_tiny", losses.mctformer_v2_loss,
           "mctformer_v2_doei", "wrapped",
           "MCTformer-V2 trained with the DOEI plug-in active (DESIGN §5.3)",
           _VIT_TRAIN, _CLASS_ATTENTION),
    Method("transcam", "transcam_tiny", losses.transcam_loss, "transcam", "plain",
           "TransCAM: MLSM on conv + transformer logits (background slot ignored)",
           _CONFORMER_TRAIN, dict(square_sizes=(128, 192, 256))),
    Method("bnr", "transcam_tiny", losses.bnr_loss, "transcam", "plain",
           "BNR: TransCAM loss + MLSM(GAP(Ā*·(A*·M))) with Ā* detached",
           _CONFORMER_TRAIN, dict(square_sizes=(128, 192, 256))),
    Method("token_cam", "token_cam_tiny", losses.token_cam_loss, "token_cam", "plain",
           "ToCo-style token CAM: MLSM on the max-pooled 1×1 classifier logits",
           _VIT_TRAIN, dict(scales=_UPSCALED)),
):
    register_method(_method)
