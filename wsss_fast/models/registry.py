"""Models by name, for the CLI and configs: ``create_model("mctformer_v2", num_classes=20,
checkpoint="MCTformer_v2.pth")``.

Each entry knows its default CAM preset and how to read its architecture from a checkpoint
(embedding width, depth, classes, training resolution), so a checkpoint usually loads with no
architecture arguments. Head counts cannot be read from weights: they default to the DeiT
convention ``embed_dim // 64`` and are overridden with ``num_heads=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from wsss_fast.models.checkpoint import load_checkpoint, read_state_dict


@dataclass(frozen=True)
class ModelEntry:
    builder: Callable[..., nn.Module]
    preset: str                         # default CAM preset
    background_slot: bool = False       # one output more than classes (TransCAM's unused bg)
    config_from_state: Optional[Callable[[dict], dict]] = None
    defaults: dict = field(default_factory=dict)
    description: str = ""


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, entry: ModelEntry) -> None:
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = entry


def _depth(state: dict, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _vit_config(state: dict, class_tokens: Optional[int]) -> dict:
    """embed_dim, depth, num_classes and img_size of a DeiT-style checkpoint."""
    config = {}
    if "cls_token" in state:
        embed_dim = state["cls_token"].shape[-1]
        config.update(embed_dim=embed_dim, num_heads=max(1, embed_dim // 64),
                      depth=_depth(state, "blocks."))
        if "blocks.0.mlp.fc1.weight" in state:
            config["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        config["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
        patch = state.get("patch_embed.proj.weight")
        if patch is not None:
            config["patch_size"] = patch.shape[-1]
        prefix = class_tokens if class_tokens is not None else state["cls_token"].shape[1]
        if class_tokens is None:
            config["num_classes"] = prefix
        for key, skip in (("pos_embed_pat", 0), ("pos_embed", prefix)):
            if key in state and (key == "pos_embed_pat" or "pos_embed_pat" not in state):
                grid = math.isqrt(state[key].shape[1] - skip)
                config["img_size"] = grid * config.get("patch_size", 16)
                break
    return config


def _mctformer_config(state: dict) -> dict:
    return _vit_config(state, class_tokens=None)


def _token_cam_config(state: dict) -> dict:
    config = _vit_config(state, class_tokens=1)
    if "classifier.weight" in state:
        config["num_classes"] = state["classifier.weight"].shape[0]
    return config


def _transcam_config(state: dict) -> dict:
    config = {}
    if "trans_cls_head.weight" in state:
        config["num_classes"], config["embed_dim"] = state["trans_cls_head.weight"].shape
        config["num_heads"] = max(1, config["embed_dim"] // 64)
        # Blocks are trans_1 and conv_trans_2 .. conv_trans_<depth>.
        config["depth"] = max(_depth(state, "conv_trans_") - 1, 1)
    if "conv_1.conv1.weight" in state:
        # conv_1 is a bottleneck to c1 = base_channel·channel_ratio channels, 4× expansion.
        config["channel_ratio"] = 4 * state["conv_1.conv1.weight"].shape[0] / 64
    return config


def _register_builtin() -> None:
    from wsss_fast.models import conformer, mctformer, vit

    register_model("mctformer_v1", ModelEntry(mctformer.mctformer_v1, "mctformer-v1",
                                              config_from_state=_mctformer_config,
                                              description="MCTformer-V1 (DeiT-S, C class tokens)"))
    register_model("mctformer_v2", ModelEntry(mctformer.mctformer_v2, "mctformer-v2",
                                              config_from_state=_mctformer_config,
                                              description="MCTformer-V2 (+ PatchCAM head)"))
    register_model("mctformer_plus", ModelEntry(mctformer.mctformer_plus, "mctformer-plus",
                                                config_from_state=_mctformer_config,
                                                description="MCTformer+ (GRP, 448 training)"))
    register_model("transcam", ModelEntry(conformer.Conformer, "transcam", background_slot=True,
                                          config_from_state=_transcam_config,
                                          defaults=dict(patch_size=16, base_channel=64,
                                                        channel_ratio=4, embed_dim=384,
                                                        depth=12, num_heads=6),
                                          description="TransCAM / BNR (Conformer-S)"))
    register_model("token_cam", ModelEntry(vit.ViTCam, "token-cam",
                                           config_from_state=_token_cam_config,
                                           description="ViT token CAM (1×1 classifier, ToCo)"))
    _register_cnn_models()
    _register_small_vit_models()


# Small ViT-family configurations for training on the synthetic benchmark on a CPU (DESIGN §9):
# heads = embed_dim // 64 so that checkpoints reload with no architecture arguments.
SMALL_VIT = dict(patch_size=16, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0, img_size=128)
# base_channel stays 64: the transcam entries read channel_ratio from checkpoints assuming it.
SMALL_CONFORMER = dict(patch_size=16, base_channel=64, channel_ratio=0.5, embed_dim=128, depth=6,
                       num_heads=2, mlp_ratio=4.0)


def _register_small_vit_models() -> None:
    from wsss_fast.models import doei
    from wsss_fast.models import conformer, mctformer, vit

    for name, builder, preset, config in (
            ("mctformer_v1_tiny", mctformer.mctformer_v1, "mctformer-v1", _mctformer_config),
            ("mctformer_v2_tiny", mctformer.mctformer_v2, "mctformer-v2", _mctformer_config),
            ("mctformer_plus_tiny", mctformer.mctformer_plus, "mctformer-plus",
             _mctformer_config),
            ("mctformer_v2_doei_tiny", doei.doei_mctformer_v2, "mctformer-v2-doei",
             _mctformer_config),
            ("token_cam_tiny", vit.ViTCam, "token-cam", _token_cam_config)):
        # DOEI in the last third of the blocks, as its default 4 of DeiT-S's 12.
        defaults = dict(SMALL_VIT, blocks=2) if "doei" in name else dict(SMALL_VIT)
        register_model(name, ModelEntry(builder, preset, config_from_state=config,
                                        defaults=defaults,
                                        description=f"small {preset} for CPU training"))
    register_model("mctformer_v2_doei", ModelEntry(doei.doei_mctformer_v2, "mctformer-v2-doei",
                                                   config_from_state=_mctformer_config,
                                                   description="MCTformer-V2 + DOEI (DeiT-S)"))
    register_model("transcam_tiny", ModelEntry(conformer.Conformer, "transcam",
                                               background_slot=True,
                                               config_from_state=_transcam_config,
                                               defaults=dict(SMALL_CONFORMER),
                                               description="small TransCAM / BNR Conformer"))


def _register_cnn_models() -> None:
    from wsss_fast.models import edam, resnet_cam

    register_model("resnet50_cam", ModelEntry(resnet_cam.resnet50_cam, "irn-cam",
                                              config_from_state=resnet_cam.config_from_state,
                                              description="IRN / LPCAM ResNet-50 CAM (OS 16)"))
    register_model("resnet_cam_tiny", ModelEntry(resnet_cam.resnet_cam_tiny, "irn-cam",
                                                 config_from_state=resnet_cam.config_from_state,
                                                 description="tiny ResNet CAM for CPU training"))
    register_model("edam", ModelEntry(edam.edam, "edam", config_from_state=edam.config_from_state,
                                      description="EDAM (ResNet-38 + DA layer + CMA)"))
    register_model("edam_tiny", ModelEntry(edam.edam_tiny, "edam",
                                           config_from_state=edam.config_from_state,
                                           description="tiny EDAM for CPU training"))


def create_model(name: str, num_classes: Optional[int] = None, checkpoint=None,
                 **kwargs) -> nn.Module:
    """Build model ``name``; with ``checkpoint`` (a path or state dict), read the architecture
    from it, then load it strictly. ``num_classes`` counts foreground classes (TransCAM's
    background slot is added here); ``kwargs`` override architecture arguments."""
    if not MODELS:
        _register_builtin()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    entry = MODELS[name]
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
        load_checkpoint(model, state)
    return model


def model_preset(name: str) -> str:
    if not MODELS:
        _register_builtin()
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name].preset


def list_models() -> list[str]:
    if not MODELS:
        _register_builtin()
    return sorted(MODELS)


def save_model(model: nn.Module, path) -> None:
    """``{'model': state_dict}``, the wrapper MCTformer's and DeiT's checkpoints use."""
    from wsss_fast.io.atomic import atomic_write
    with atomic_write(path) as handle:
        torch.save({"model": model.state_dict()}, handle)
