"""IRN / LPCAM's ResNet-50 CAM classifier (``net/resnet50_cam.py``), checkpoint-compatible.

A ResNet-50 with strides (2, 2, 2, 1) — conv1, layer2 and layer3 halve the resolution, layer4 keeps
it, so the features have output stride 16 — and a bias-free 1×1 classifier over the layer4
features (reference/cnn_methods_postprocessing.md §1.1):

* training logits: ``classifier(GAP(features))`` (IRN ``Net.forward``);
* CAM of a pass: ``ReLU(conv(features, classifier.weight))`` (IRN ``CAM.forward``; the sum with the
  flipped pass is done by the engine after resizing, which commutes with it).

The module tree is IRN's ``Net``: a torchvision-style ``resnet50`` (conv1, bn1, layer1..layer4, no
fc) plus the aliases ``stage1..stage4``, ``backbone`` and ``newly_added`` that IRN's state dicts
also carry, so IRN's ``res50_cam.pth`` loads strictly and a torchvision ImageNet ResNet-50 loads
into ``model.resnet50`` (minus ``fc.*``).

``finetune=True`` (the default) is IRN's regime for ImageNet weights: every BatchNorm uses its
running statistics (IRN's ``FixedBatchNorm``), conv1/bn1 are frozen and the training forward
detaches after layer2. ``finetune=False`` trains everything with batch statistics (tiny models
trained from scratch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast.models.registry import ModelEntry, count_blocks, register_model


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 v1.5 bottleneck (stride on the 3×3 conv), with its key names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetBackbone(nn.Module):
    """torchvision's ResNet trunk without avgpool/fc; ``strides`` are those of conv1 and
    layer2..layer4 (the max-pool always halves, layer1 never does), as IRN's ``resnet50.py``."""

    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, strides=(2, 2, 2, 1)):
        super().__init__()
        if len(layers) != 4 or len(strides) != 4:
            raise ValueError(f"layers and strides need 4 entries, got {layers} and {strides}")
        self.strides = tuple(int(s) for s in strides)
        self.conv1 = nn.Conv2d(3, width, 7, stride=self.strides[0], padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for index, (count, stride) in enumerate(zip(layers, (1,) + self.strides[1:])):
            planes = width * 2 ** index
            blocks = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes) for _ in range(count - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.out_channels = inplanes


class ResNetCam(nn.Module):
    """IRN's ``resnet50_cam.Net`` (training logits) and ``CAM`` (per-pass CAMs) in one module."""

    def __init__(self, num_classes: int = 20, layers=(3, 4, 6, 3), width: int = 64,
                 strides=(2, 2, 2, 1), finetune: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.finetune = finetune
        self.resnet50 = trunk = ResNetBackbone(layers, width, strides)
        # Aliases of the trunk's modules: IRN registers them, so its state dicts hold their keys.
        self.stage1 = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1)
        self.stage2 = nn.Sequential(trunk.layer2)
        self.stage3 = nn.Sequential(trunk.layer3)
        self.stage4 = nn.Sequential(trunk.layer4)
        self.classifier = nn.Conv2d(trunk.out_channels, num_classes, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])
        if finetune:
            for p in (*trunk.conv1.parameters(), *trunk.bn1.parameters()):
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetCam":
        super().train(mode)
        if self.finetune:  # IRN's FixedBatchNorm: running statistics in training too
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Feature size for an input of ``height × width`` (each stride-s layer maps n → ⌈n/s⌉)."""
        for stride in (self.resnet50.strides[0], 2, *self.resnet50.strides[1:]):
            height, width = -(-height // stride), -(-width // stride)
        return height, width

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects images (B, 3, H, W), got {shape}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Layer4 features ``(B, C, ⌈H/16⌉, ⌈W/16⌉)`` (post-ReLU; LPCAM's ``Net_Feature``)."""
        self._check(x)
        return self.stage4(self.stage3(self.stage2(self.stage1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training logits ``(B, K)``: the classifier applied to globally average-pooled
        features. Under ``finetune`` no gradient flows into stage1/stage2, as in IRN."""
        self._check(x)
        x = self.stage2(self.stage1(x))
        if self.finetune:
            x = x.detach()
        x = self.stage4(self.stage3(x))
        return self.classifier(x.mean(dim=(2, 3), keepdim=True)).flatten(1)

    @torch.no_grad()
    def cam_maps(self, x: torch.Tensor) -> torch.Tensor:
        """CAMs of one pass ``(B, K, h, w)``: ``ReLU(W · features)`` at the feature resolution."""
        return F.conv2d(self.features(x), self.classifier.weight).relu()


def config_from_state(state: dict) -> dict:
    """num_classes, width and blocks per layer of a ResNetCam / IRN state dict."""
    config = {}
    if "classifier.weight" in state:
        config["num_classes"] = state["classifier.weight"].shape[0]
    if "resnet50.conv1.weight" in state:
        config["width"] = state["resnet50.conv1.weight"].shape[0]
        config["layers"] = tuple(count_blocks(state, f"resnet50.layer{index}.")
                                 for index in range(1, 5))
    return config


def resnet50_cam(num_classes: int = 20, **kwargs) -> ResNetCam:
    """IRN / LPCAM's classifier: ResNet-50, strides (2, 2, 2, 1), IRN's fine-tuning regime."""
    return ResNetCam(num_classes=num_classes, **kwargs)


# The tiny model's layer3 keeps the resolution too: output stride 8, not IRN's 16. On the synthetic
# benchmark's 96-160 px images a stride-16 map has 6-10 cells a side, about one per object;
# upsampling the image instead (scales 1.5-3) lowered the seed (README, "IRN CAM and LPCAM").
TINY_STRIDES = (2, 2, 1, 1)


def resnet_cam_tiny(num_classes: int = 20, **kwargs) -> ResNetCam:
    """One bottleneck per layer, width 16 (512 feature channels), output stride 8
    (``TINY_STRIDES``), trained from scratch on CPU."""
    config = dict(layers=(1, 1, 1, 1), width=16, finetune=False, strides=TINY_STRIDES)
    return ResNetCam(num_classes=num_classes, **{**config, **kwargs})


register_model("resnet50_cam", ModelEntry(resnet50_cam, "irn_cam",
                                          config_from_state=config_from_state,
                                          description="IRN / LPCAM ResNet-50 CAM (OS 16)"))
register_model("resnet_cam_tiny", ModelEntry(resnet_cam_tiny, "irn_cam",
                                             config_from_state=config_from_state,
                                             description="tiny ResNet CAM for CPU training"))
