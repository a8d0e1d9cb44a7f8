"""IRNet (Ahn, Cho & Kwak, CVPR 2019): class-boundary and displacement branches on IRN's
ResNet-50 taps, checkpoint-compatible with IRN's ``net/resnet50_irn.py``
(reference/affinity_networks.md §1.1, §1.6, §1.7).

* Backbone: the ResNet of ``resnet_cam`` (strides 2, 2, 2, 1). Taps x1 = after the max-pool
  (stride 4), x2 = layer1 (4), x3 = layer2 (8), x4 = layer3 (16), x5 = layer4 (16).
* Boundary branch: per tap a bias-free 1×1 conv → GroupNorm(4) → bilinear up (×1, ×1, ×2, ×4, ×4)
  → ReLU, cropped to x2's size, concatenated, 1×1 conv with bias → one logit map at stride 4.
* Displacement branch: per tap 1×1 conv + GroupNorm + ReLU (x4, x5 up ×2) to stride 8, a fused
  1×1 conv up ×2 to stride 4, then with x1, x2: 1×1 conv, GroupNorm, ReLU, 1×1 → 2 channels
  (dy, dx in stride-4 cells), then ``MeanShift`` (identity in training, ``− running_mean`` in eval).

``freeze_backbone=True`` (the default) is IRN's regime: the taps are detached, the backbone stays
in eval mode (IRN's ``FixedBatchNorm``: running statistics always) and its parameters get no
gradient; only the heads are trained. IRN takes the backbone from ImageNet; none is available here,
so ``load_backbone`` takes it from a ``resnet_cam`` classifier checkpoint. ``freeze_backbone=False``
trains the backbone with the heads (batch statistics), for runs without such a checkpoint.

The module tree is IRN's ``Net``, aliases included (``stage1..5``, ``backbone``, ``edge_layers``,
``dp_layers``, ``mean_shift`` inside ``fc_dp7``): its state dict is that of IRN's
``AffinityDisplacementLoss`` without the path-index buffers (``path_indices*``, ``disp_target``).
``load_state_dict`` drops those buffers, so IRN's saved ``res50_irn.pth`` loads strictly; with
``load_checkpoint`` pass ``remap=drop_irn_loss_buffers``.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.models.checkpoint import CheckpointMismatch, read_state_dict
from wsss_fast.models.registry import ModelEntry, count_blocks, register_model
from wsss_fast.models.resnet_cam import ResNetBackbone

OUTPUT_STRIDE = 4                    # of both outputs
BACKBONE_STRIDE = 16                 # of the deepest taps
_LOSS_BUFFERS = re.compile(r"^(path_indices\d+|disp_target)$")


class MeanShift(nn.Module):
    """Identity in training; subtracts the stored mean displacement in eval (IRN §1.6)."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


def _unit(cin: int, cout: int, groups: int, scale: int = 1) -> nn.Sequential:
    """1×1 conv (no bias) → GroupNorm → [bilinear ×scale] → ReLU, IRN's module indices."""
    layers = [nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout)]
    if scale != 1:
        layers.append(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class BackboneLoad(NamedTuple):
    """What ``IrNet.load_backbone`` did: tensors copied, and source keys it did not use (the
    classifier; the ``stage*`` / ``backbone.*`` aliases of the same tensors are not listed)."""

    loaded: int
    skipped: tuple[str, ...]


class IrNet(nn.Module):
    """IRN's ``Net``: ``forward(images) -> (edge_logits (B, 1, h, w), displacement (B, 2, h, w))``
    with ``h, w = ⌈H/4⌉, ⌈W/4⌉``."""

    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, edge_channels: int = 32,
                 disp_channels=(64, 128, 256), freeze_backbone: bool = True):
        """
        Args:
            layers, width: the ResNet backbone (ResNet-50: (3, 4, 6, 3), 64).
            edge_channels: per-tap width of the boundary branch (IRN: 32; GroupNorm 4 groups).
            disp_channels: displacement widths for x1, x2 and the stride-8 taps (IRN: 64, 128,
                256; GroupNorm 8, 16, 16 groups).
            freeze_backbone: IRN's frozen backbone (see the module docstring).
        """
        super().__init__()
        d1, d2, d3 = (int(c) for c in disp_channels)
        self.freeze_backbone = freeze_backbone
        self.resnet50 = trunk = ResNetBackbone(layers, width, strides=(2, 2, 2, 1))
        taps = (width, 4 * width, 8 * width, 16 * width, 32 * width)
        # IRN's stage aliases (their keys are in IRN's checkpoints).
        self.stage1 = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.stage2 = nn.Sequential(trunk.layer1)
        self.stage3 = nn.Sequential(trunk.layer2)
        self.stage4 = nn.Sequential(trunk.layer3)
        self.stage5 = nn.Sequential(trunk.layer4)
        self.mean_shift = MeanShift(2)

        e = edge_channels
        self.fc_edge1 = _unit(taps[0], e, 4)
        self.fc_edge2 = _unit(taps[1], e, 4)
        self.fc_edge3 = _unit(taps[2], e, 4, scale=2)
        self.fc_edge4 = _unit(taps[3], e, 4, scale=4)
        self.fc_edge5 = _unit(taps[4], e, 4, scale=4)
        self.fc_edge6 = nn.Conv2d(5 * e, 1, 1, bias=True)

        self.fc_dp1 = _unit(taps[0], d1, 8)
        self.fc_dp2 = _unit(taps[1], d2, 16)
        self.fc_dp3 = _unit(taps[2], d3, 16)
        self.fc_dp4 = _unit(taps[3], d3, 16, scale=2)
        self.fc_dp5 = _unit(taps[4], d3, 16, scale=2)
        self.fc_dp6 = _unit(3 * d3, d3, 16, scale=2)
        self.fc_dp7 = nn.Sequential(nn.Conv2d(d1 + d2 + d3, d3, 1, bias=False),
                                    nn.GroupNorm(16, d3), nn.ReLU(inplace=True),
                                    nn.Conv2d(d3, 2, 1, bias=False), self.mean_shift)

        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4,
                                       self.stage5])
        self.edge_layers = nn.ModuleList([self.fc_edge1, self.fc_edge2, self.fc_edge3,
                                          self.fc_edge4, self.fc_edge5, self.fc_edge6])
        self.dp_layers = nn.ModuleList([self.fc_dp1, self.fc_dp2, self.fc_dp3, self.fc_dp4,
                                        self.fc_dp5, self.fc_dp6, self.fc_dp7])
        if freeze_backbone:
            self.resnet50.requires_grad_(False)
        # IRN's training module also saves its path tables; they are not weights.
        self._register_load_state_dict_pre_hook(_drop_loss_buffers)

    def train(self, mode: bool = True) -> "IrNet":
        super().train(mode)
        if self.freeze_backbone:   # IRN: backbone.eval() and FixedBatchNorm
            self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[dict]:
        """Optimizer groups in IRN's order: boundary branch (lr ×1), displacement branch (lr ×10),
        and, without a frozen backbone, the backbone (lr ×1). ``lr_scale`` multiplies the base
        learning rate (IRN: 0.1 → 0.1 and 1.0)."""
        groups = [{"params": list(self.edge_layers.parameters()), "lr_scale": 1.0},
                  {"params": list(self.dp_layers.parameters()), "lr_scale": 10.0}]
        if not self.freeze_backbone:
            groups.append({"params": list(self.resnet50.parameters()), "lr_scale": 1.0})
        return groups

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x1..x5 (strides 4, 4, 8, 16, 16), detached under ``freeze_backbone``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"IrNet expects images (B, 3, H, W), got {shape}")
        out = []
        for stage in self.backbone:
            x = stage(x)
            if self.freeze_backbone:
                x = x.detach()
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2, x3, x4, x5 = self.taps(x)
        s4, s8 = x2.shape[2:], x3.shape[2:]
        edges = [self.fc_edge1(x1), self.fc_edge2(x2)]
        edges += [f(t)[..., :s4[0], :s4[1]] for f, t in ((self.fc_edge3, x3), (self.fc_edge4, x4),
                                                         (self.fc_edge5, x5))]
        edge = self.fc_edge6(torch.cat(edges, dim=1))
        dp3 = self.fc_dp3(x3)
        dp4 = self.fc_dp4(x4)[..., :s8[0], :s8[1]]
        dp5 = self.fc_dp5(x5)[..., :s8[0], :s8[1]]
        up = self.fc_dp6(torch.cat([dp3, dp4, dp5], dim=1))[..., :s4[0], :s4[1]]
        displacement = self.fc_dp7(torch.cat([self.fc_dp1(x1), self.fc_dp2(x2), up], dim=1))
        return edge, displacement

    @torch.no_grad()
    def edge_and_displacement(self, image: torch.Tensor,
                              size: Optional[int] = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """IRN's ``EdgeDisplacement`` for one image, in eval mode.

        The image and its horizontal flip are zero-padded right/bottom to ``size × size`` (IRN:
        512; ``None``: to the next multiple of 16), run, cropped to ``(⌈H/4⌉, ⌈W/4⌉)``; the
        boundary is ``sigmoid((z + flip(z_flipped)) / 2)``, the displacement that of the unflipped
        image (as upstream, the flipped logits are cropped before being flipped back, so they
        align exactly only when W is a multiple of 4).

        Args:
            image: normalised ``(3, H, W)`` or ``(1, 3, H, W)``.
        Returns:
            ``edge (1, h, w)`` in (0, 1) and ``displacement (2, h, w)`` (mean-shifted).
        """
        if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"edge_and_displacement expects one image (3, H, W), got {shape}")
        height, width = image.shape[1:]
        if size is None:
            pad_h = BACKBONE_STRIDE * math.ceil(height / BACKBONE_STRIDE)
            pad_w = BACKBONE_STRIDE * math.ceil(width / BACKBONE_STRIDE)
        elif height > size or width > size:
            raise ValueError(f"image {height}×{width} exceeds the padded size {size}; pass a "
                             "larger size or size=None")
        else:
            pad_h = pad_w = int(size)
        pair = torch.stack([image, image.flip(-1)])
        pair = F.pad(pair, (0, pad_w - width, 0, pad_h - height))
        was_training = self.training
        self.eval()
        try:
            edge, displacement = self(pair)
        finally:
            self.train(was_training)
        h, w = -(-height // OUTPUT_STRIDE), -(-width // OUTPUT_STRIDE)
        edge, displacement = edge[..., :h, :w], displacement[..., :h, :w]
        return torch.sigmoid(edge[0] / 2 + edge[1].flip(-1) / 2), displacement[0]

    def load_backbone(self, source) -> BackboneLoad:
        """Copy the backbone of a ``resnet_cam`` (IRN ``resnet50_cam``) classifier checkpoint.

        Every ``resnet50.*`` tensor of this model must be in ``source`` with its shape (else
        ``CheckpointMismatch``); ``resnet50.*`` keys this model lacks are errors too.
        """
        state = read_state_dict(source)
        own = self.resnet50.state_dict()
        prefix = "resnet50."
        given = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing = sorted(set(own) - set(given))
        unexpected = sorted(set(given) - set(own))
        conflicts = [f"{k}: {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
                     for k in own if k in given and given[k].shape != own[k].shape]
        if missing or unexpected or conflicts:
            details = [f"{title} ({len(keys)}): {', '.join(keys[:8])}"
                       for title, keys in (("missing", missing), ("unexpected", unexpected),
                                           ("shape conflicts", conflicts)) if keys]
            raise CheckpointMismatch(f"backbone checkpoint does not fit {type(self).__name__}'s "
                                     f"ResNet: {'; '.join(details)}")
        self.resnet50.load_state_dict(given, strict=True)
        aliases = re.compile(r"^(stage\d+|backbone)\.")
        skipped = tuple(sorted(k for k in state
                               if not k.startswith(prefix) and not aliases.match(k)))
        return BackboneLoad(loaded=len(given), skipped=skipped)


def _drop_loss_buffers(state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)
                and _LOSS_BUFFERS.match(k[len(prefix):])]:
        del state_dict[key]


def drop_irn_loss_buffers(state: dict) -> dict:
    """``state`` without IRN's path-index buffers (``path_indices*``, ``disp_target``), e.g. as
    the ``remap`` of ``load_checkpoint`` for IRN's saved ``res50_irn.pth``."""
    return {k: v for k, v in state.items() if not _LOSS_BUFFERS.match(k)}


def config_from_state(state: dict) -> dict:
    """Backbone width/blocks and head widths of an IrNet / IRN state dict."""
    config = {}
    if "resnet50.conv1.weight" in state:
        config["width"] = state["resnet50.conv1.weight"].shape[0]
        config["layers"] = tuple(count_blocks(state, f"resnet50.layer{index}.")
                                 for index in range(1, 5))
    if "fc_edge1.0.weight" in state:
        config["edge_channels"] = state["fc_edge1.0.weight"].shape[0]
    if all(f"fc_dp{i}.0.weight" in state for i in (1, 2, 3)):
        config["disp_channels"] = tuple(state[f"fc_dp{i}.0.weight"].shape[0] for i in (1, 2, 3))
    return config


def resnet50_irn(num_classes=None, **kwargs) -> IrNet:
    """IRN as published: ResNet-50 backbone, 1,394,529 trainable head parameters
    (class-agnostic: ``num_classes`` is accepted and ignored, as the registry passes it)."""
    return IrNet(**kwargs)


def irn_tiny(num_classes=None, **kwargs) -> IrNet:
    """The backbone of ``resnet_cam_tiny`` (one bottleneck per layer, width 16) with heads a
    quarter as wide (edge 8, displacement 16/32/64), for CPU runs."""
    config = dict(layers=(1, 1, 1, 1), width=16, edge_channels=8, disp_channels=(16, 32, 64))
    return IrNet(**{**config, **kwargs})


# Not a CAM model: the preset is that of the CAMs IRN refines (and of its backbone's classifier).
register_model("resnet50_irn", ModelEntry(resnet50_irn, "irn", preset="irn_cam",
                                          config_from_state=config_from_state,
                                          remap=drop_irn_loss_buffers,
                                          description="IRN boundary + displacement (ResNet-50)"))
register_model("irn_tiny", ModelEntry(irn_tiny, "irn", preset="irn_cam",
                                      config_from_state=config_from_state,
                                      remap=drop_irn_loss_buffers,
                                      description="tiny IRN for CPU runs"))
