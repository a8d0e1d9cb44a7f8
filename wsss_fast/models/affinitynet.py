"""AffinityNet (PSA; Ahn & Kwak, CVPR 2018): ResNet-38 with a stride-8 affinity-feature head,
checkpoint-compatible with PSA's ``network/resnet38_aff.Net`` (reference/affinity_networks.md §2.1).

* Backbone: PSA's ResNet-38 (``resnet38d``; the blocks of ``edam``), output stride 8. Taps:
  conv4 = the BN-ReLU'd input of b5, conv5 = that of b6, conv6 = ``ReLU(bn7(b7(·)))``.
* Head: bias-free 1×1 convs ``f8_3`` (conv4 → 64), ``f8_4`` (conv5 → 128), ``f8_5`` (conv6 → 256),
  each followed by ELU, concatenated, ``f9`` (448 → 448) and ELU: the embedding ``g``.
* Affinity of a pair: ``exp(−mean_c |g_i − g_j|)`` (``pair_affinity``), for the radius-5 pairs in
  PSA's base order.

``finetune=True`` is PSA's regime: conv1a and the b2 stage frozen, every BatchNorm in eval mode
with frozen affine parameters; the rest of the backbone is fine-tuned (lr ×1) with the head
(lr ×10). ``finetune=False`` trains everything with batch statistics (tiny models).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.models.checkpoint import CheckpointError, CheckpointMismatch, read_state_dict
from wsss_fast.models.edam import add_resnet38_trunk
from wsss_fast.models.registry import ModelEntry, register_model

OUTPUT_STRIDE = 8
HEAD_KEYS = ("f8_3.weight", "f8_4.weight", "f8_5.weight", "f9.weight")


class AffinityNet(nn.Module):
    """PSA's ``resnet38_aff.Net``: ``forward(images) -> g (B, sum(head), ⌈H/8⌉, ⌈W/8⌉)``."""

    def __init__(self, width: int = 64, blocks=(3, 3, 6, 3), head=(64, 128, 256),
                 finetune: bool = True):
        """
        Args:
            width: channels of conv1a; conv4 / conv5 / conv6 have 8, 16, 64 × width (ResNet-38:
                64 → 512, 1024, 4096).
            blocks: residual blocks in the stages b2, b3, b4, b5 (ResNet-38: 3, 3, 6, 3).
            head: widths of f8_3, f8_4, f8_5 (PSA: 64, 128, 256; f9 keeps their sum, 448).
        """
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must give 4 positive block counts, got {blocks}")
        if len(head) != 3 or min(head) < 1:
            raise ValueError(f"head must give 3 positive widths, got {head}")
        self.finetune = finetune
        w = width
        self.stage_blocks = add_resnet38_trunk(self, w, blocks)

        h3, h4, h5 = (int(c) for c in head)
        self.f8_3 = nn.Conv2d(8 * w, h3, 1, bias=False)
        self.f8_4 = nn.Conv2d(16 * w, h4, 1, bias=False)
        self.f8_5 = nn.Conv2d(64 * w, h5, 1, bias=False)
        self.f9 = nn.Conv2d(h3 + h4 + h5, h3 + h4 + h5, 1, bias=False)
        for conv in (self.f8_3, self.f8_4, self.f8_5):
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

        if finetune:
            frozen = [self.conv1a] + [getattr(self, n) for n in self.stage_blocks
                                      if n.split("_")[0] == "b2"]
            frozen += [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
            for module in frozen:
                module.requires_grad_(False)

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        if self.finetune:   # PSA keeps every BatchNorm in eval mode (dropout stays active)
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def trainable_parameters(self) -> list[dict]:
        """PSA's groups: backbone weights (lr ×1) and head weights (lr ×10); frozen parameters
        are left out. ``lr_scale`` multiplies the base learning rate (PSA: 0.1 → 0.1 and 1.0)."""
        head = [p for conv in self.head_layers() for p in conv.parameters()]
        ids = {id(p) for p in head}
        backbone = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": backbone, "lr_scale": 1.0}, {"params": head, "lr_scale": 10.0}]

    def head_layers(self) -> tuple[nn.Conv2d, ...]:
        """The new layers (PSA's ``from_scratch_layers``; not a module list, so that the state
        dict is PSA's)."""
        return self.f8_3, self.f8_4, self.f8_5, self.f9

    def load_backbone(self, source) -> int:
        """Copy the ResNet-38 trunk (every key but the head's) from a ResNet-38 classifier
        checkpoint (EDAM, PSA's ``resnet38_cls``) or an AffinityNet; returns how many tensors were
        copied. A trunk key missing or of another shape is a ``CheckpointMismatch``; the source's
        other keys (its classifier head) are ignored."""
        state = read_state_dict(source)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(("f8_", "f9."))}
        if "conv1a.weight" not in state:
            raise CheckpointMismatch(f"backbone checkpoint is not a ResNet-38: it looks like "
                                     f"{describe_state(state)}")
        missing = sorted(k for k in own if k not in state)
        conflicts = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                     if k in state and state[k].shape != v.shape]
        if missing or conflicts:
            details = [f"{title} ({len(keys)}): {', '.join(keys[:6])}"
                       for title, keys in (("missing", missing), ("shape conflicts", conflicts))
                       if keys]
            raise CheckpointMismatch(f"backbone checkpoint does not fit this AffinityNet's "
                                     f"ResNet-38 (--model-arg width/blocks?): {'; '.join(details)}")
        self.load_state_dict({k: state[k] for k in own}, strict=False)
        return len(own)

    def taps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """conv4, conv5, conv6 of ``resnet38d.forward_as_dict`` (all stride 8)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"AffinityNet expects images (B, 3, H, W), got {shape}")
        x = self.conv1a(x)
        for name in self.stage_blocks:
            if name == "b5":   # the block's own BN-ReLU'd input, recomputed (the block hides it)
                conv4 = F.relu(self.b5.bn_branch2a(x))
            x = getattr(self, name)(x)
        conv5 = F.relu(self.b6.bn_branch2a(x))
        x = self.b7(self.b6(x))
        return conv4, conv5, F.relu(self.bn7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv4, conv5, conv6 = self.taps(x)
        g = torch.cat([F.elu(self.f8_3(conv4)), F.elu(self.f8_4(conv5)),
                       F.elu(self.f8_5(conv6))], dim=1)
        return F.elu(self.f9(g))


def pair_affinity(features: torch.Tensor, sources: torch.Tensor,
                  destinations: torch.Tensor) -> torch.Tensor:
    """PSA's affinities ``exp(−mean_c |g_i − g_j|)`` of embeddings ``features (B, C, h, w)`` for
    the pairs ``(sources[s], destinations[o, s])`` (flat grid indices, ``(S,)`` and ``(O, S)``):
    ``(B, O, S)``."""
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, h, w), got {tuple(features.shape)}")
    flat = features.flatten(2)
    source = flat[:, :, sources].unsqueeze(2)                                 # (B, C, 1, S)
    destination = flat[:, :, destinations.reshape(-1)].view(*flat.shape[:2], *destinations.shape)
    return torch.exp(-(destination - source).abs().mean(dim=1))


def describe_state(state: dict) -> str:
    """What a state dict looks like, from its keys (for one-line errors)."""
    keys = list(state)
    if any(k.startswith(("fc_edge", "fc_dp")) for k in keys):
        return "an IRN checkpoint (IRNet boundary / displacement heads fc_edge*, fc_dp*)"
    if all(k in state for k in HEAD_KEYS):
        return "an AffinityNet checkpoint"
    if any(k.startswith("resnet50.") for k in keys):
        return "a ResNet-50 CAM classifier (resnet50.* keys, IRN / LPCAM)"
    if "conv1a.weight" in state:
        return "a ResNet-38 classifier without AffinityNet's head (EDAM / PSA resnet38_cls)"
    if any(k.startswith("blocks.") for k in keys):
        return "a ViT classifier (blocks.* keys)"
    return f"an unknown model (keys {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"


def check_affinitynet_state(state: dict, where: str) -> None:
    """``CheckpointError`` naming what ``state`` looks like unless it is an AffinityNet's."""
    if not (all(k in state for k in HEAD_KEYS) and "conv1a.weight" in state):
        raise CheckpointError(f"{where} is not an AffinityNet checkpoint: it looks like "
                              f"{describe_state(state)}")


def config_from_state(state: dict) -> dict:
    """Width, blocks and head widths of an AffinityNet / PSA ``resnet38_aff`` state dict."""
    config = {}
    if "conv1a.weight" in state:
        config["width"] = state["conv1a.weight"].shape[0]
        config["blocks"] = tuple(
            1 + max((int(k.split(".")[0].split("_")[1]) for k in state
                     if k.startswith(f"b{stage}_")), default=0)
            for stage in range(2, 6))
    if all(f"f8_{i}.weight" in state for i in (3, 4, 5)):
        config["head"] = tuple(state[f"f8_{i}.weight"].shape[0] for i in (3, 4, 5))
    return config


def affinitynet(num_classes=None, **kwargs) -> AffinityNet:
    """AffinityNet as published: ResNet-38, head 64/128/256 → 448 (class-agnostic)."""
    return AffinityNet(**kwargs)


def affinitynet_tiny(num_classes=None, **kwargs) -> AffinityNet:
    """ResNet-38 layout with one block per stage and width 8 (the backbone of ``edam_tiny``),
    head 16/32/64 → 112, trained from scratch on CPU."""
    config = dict(width=8, blocks=(1, 1, 1, 1), head=(16, 32, 64), finetune=False)
    return AffinityNet(**{**config, **kwargs})


# Not a CAM model: the preset is that of the ResNet-38 CAMs it refines.
register_model("affinitynet", ModelEntry(affinitynet, "psa", preset="edam",
                                         config_from_state=config_from_state,
                                         description="PSA AffinityNet (ResNet-38, OS 8)"))
register_model("affinitynet_tiny", ModelEntry(affinitynet_tiny, "psa", preset="edam",
                                              config_from_state=config_from_state,
                                              description="tiny AffinityNet for CPU runs"))
