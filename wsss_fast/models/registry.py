"""Models by name, for the CLI and configs: ``create_model("mctformer_v2", num_classes=20,
checkpoint="MCTformer_v2.pth")``.

Each model module registers its entries next to their builders (``register_model`` at module
level); ``MODELS`` imports those modules before any lookup, so a custom model registered first
hides none of them. An entry knows its family (the method it implements, whose CAM preset it
uses by default) and how to read its architecture from a checkpoint (embedding width, depth,
classes, training resolution), so a checkpoint usually loads with no architecture arguments.
Head counts cannot be read from weights: they default to the DeiT convention ``embed_dim // 64``
and are overridden with ``num_heads=``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from wsss_fast.models.checkpoint import load_checkpoint, read_state_dict
from wsss_fast.registry import Registry, canonical_name


@dataclass(frozen=True)
class ModelEntry:
    builder: Callable[..., nn.Module]
    family: str                         # the method it implements: "mctformer_v2", "irn_cam", ...
    preset: Optional[str] = None        # default CAM preset; None: the family's
    background_slot: bool = False       # one output more than classes (TransCAM's unused bg)
    config_from_state: Optional[Callable[[dict], dict]] = None
    # Applied to a checkpoint's state dict before the strict load (e.g. IRN's saved loss
    # module also holds its path tables: ``irnet.drop_irn_loss_buffers``).
    remap: Optional[Callable[[dict], dict]] = None
    defaults: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "family", canonical_name(self.family))
        object.__setattr__(self, "preset", canonical_name(self.preset or self.family))


MODEL_MODULES = ("wsss_fast.models.mctformer", "wsss_fast.models.doei",
                 "wsss_fast.models.vit", "wsss_fast.models.conformer",
                 "wsss_fast.models.resnet_cam", "wsss_fast.models.edam",
                 "wsss_fast.models.irnet", "wsss_fast.models.affinitynet")
MODELS: Registry[ModelEntry] = Registry("model", builtin_modules=MODEL_MODULES)


def register_model(name: str, entry: ModelEntry, *, override: bool = False) -> ModelEntry:
    if not isinstance(entry, ModelEntry):
        raise ValueError(f"model {name!r}: register a ModelEntry, got {type(entry).__name__}")
    return MODELS.register(name, entry, override=override)


def count_blocks(state: dict, prefix: str) -> int:
    """How many numbered blocks ``<prefix><i>.`` a state dict holds (0 if none)."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def create_model(name: str, num_classes: Optional[int] = None, checkpoint=None,
                 **kwargs) -> nn.Module:
    """Build model ``name``; with ``checkpoint`` (a path or state dict), read the architecture
    from it, then load it strictly. ``num_classes`` counts foreground classes (TransCAM's
    background slot is added here); ``kwargs`` override architecture arguments."""
    entry = MODELS.get(name)
    config = dict(entry.defaults)
    state = None
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
        if entry.config_from_state is not None:
            config.update(entry.config_from_state(state))
    if num_classes is not None:
        outputs = num_classes + (1 if entry.background_slot else 0)
        if state is not None and config.get("num_classes", outputs) != outputs:
            raise ValueError(f"checkpoint {checkpoint} has {config['num_classes']} outputs but "
                             f"the dataset has {num_classes} classes")
        config["num_classes"] = outputs
    config.update(kwargs)
    try:
        model = entry.builder(**config)
    except TypeError as error:
        raise ValueError(f"bad arguments for model {name!r}: {error}") from None
    if state is not None:
        load_checkpoint(model, state, remap=entry.remap)
    return model


def model_preset(name: str) -> str:
    """The CAM preset model ``name`` extracts with by default."""
    return MODELS.get(name).preset


def list_models() -> list[str]:
    return MODELS.names()


def save_model(model: nn.Module, path) -> None:
    """``{'model': state_dict}``, the wrapper MCTformer's and DeiT's checkpoints use."""
    from wsss_fast.io.atomic import atomic_write
    with atomic_write(path) as handle:
        torch.save({"model": model.state_dict()}, handle)
