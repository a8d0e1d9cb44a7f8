"""Plain ViT / DeiT (one class token) CAMs, timm-checkpoint compatible.

* Token CAM (ToCo, reference/vit_methods.md §5): a bias-free 1×1 classifier on the final, normed
  patch tokens (``classifier.weight (K, D, 1, 1)``); classification logits are that classifier on
  the global max-pooled tokens.
* Class-token attention maps: ``Σ_l mean_h A_l[0, 1:]`` over chosen blocks, accumulated by
  ``attention_stats`` (its ``cls_row`` statistic).

The positional embedding is always resized bicubically to the input grid with ``size=`` (ToCo).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast import ops
from wsss_fast.models.checkpoint import load_checkpoint, read_state_dict
from wsss_fast.models.mctformer import SMALL_VIT, PatchEmbed, vit_config
from wsss_fast.models.registry import ModelEntry, register_model
from wsss_fast.models.vit_blocks import Block

CAM_KINDS = ("token", "cls_attention")


class ViTCam(nn.Module):
    def __init__(self, num_classes: int = 20, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depth = depth
        self.train_grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.train_grid ** 2, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps=1e-6)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=False)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=1e-6)

    @classmethod
    def from_timm(cls, name: str, num_classes: int = 20, checkpoint=None) -> "ViTCam":
        """The architecture of timm model ``name`` (built offline, no download); backbone weights
        from ``checkpoint`` (a timm / DeiT state dict) when given. The classifier is new."""
        import wsss_fast._compat  # noqa: F401  (timm imports torchvision)
        import timm

        reference = timm.create_model(name, pretrained=False, num_classes=0)
        if reference.num_prefix_tokens != 1 or getattr(reference, "global_pool", "token") != "token":
            raise ValueError(f"{name}: only ViTs with exactly one class token are supported")
        block = reference.blocks[0]
        model = cls(num_classes=num_classes, img_size=reference.patch_embed.img_size[0],
                    patch_size=reference.patch_embed.patch_size[0],
                    embed_dim=reference.embed_dim, depth=len(reference.blocks),
                    num_heads=block.attn.num_heads,
                    mlp_ratio=block.mlp.fc1.out_features / reference.embed_dim,
                    qkv_bias=block.attn.qkv.bias is not None)
        if checkpoint is not None:
            state = {k: v for k, v in read_state_dict(checkpoint).items()
                     if not k.startswith(("head.", "head_dist.", "fc_norm."))}
            load_checkpoint(model, state, ignore=("classifier.weight",))
        return model

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_embed.patch_size
        return height // p, width // p

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        h0, w0 = self.grid(height, width)
        n = self.train_grid
        if (h0, w0) == (n, n):
            return self.pos_embed
        patch_pos = self.pos_embed[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(h0, w0), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward_features(self, x: torch.Tensor, stats: Optional[ops.AttentionStats] = None):
        """Normed final tokens as a grid ``(B, D, h, w)``."""
        b, _, height, width = x.shape
        h0, w0 = self.grid(height, width)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(height, width)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, 1, stats.block_kwargs(i) if stats else None)
        patches = self.norm(tokens)[:, 1:]
        return patches.transpose(1, 2).reshape(b, self.embed_dim, h0, w0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classification logits: the 1×1 classifier on globally max-pooled tokens (ToCo)."""
        pooled = F.adaptive_max_pool2d(self.forward_features(x), 1)
        return self.classifier(pooled).flatten(1)

    @torch.no_grad()
    def cam_maps(self, x: torch.Tensor, *, kind: str = "token", cls_layers="all") -> torch.Tensor:
        """``"token"``: ``classifier ⊛ tokens`` ``(B, K, h, w)``; ``"cls_attention"``: the class
        token's head-mean attention to the patches summed over ``cls_layers`` ``(B, 1, h, w)``."""
        if kind not in CAM_KINDS:
            raise ValueError(f"kind must be one of {CAM_KINDS}, got {kind!r}")
        b, _, height, width = x.shape
        h0, w0 = self.grid(height, width)
        if h0 == 0 or w0 == 0:
            raise ValueError(f"input {height}x{width} is smaller than one patch")
        if kind == "token":
            return F.conv2d(self.forward_features(x), self.classifier.weight)
        stats = ops.AttentionStats.allocate(b, 1, h0 * w0, self.depth, cls_row_layers=cls_layers,
                                            device=x.device)
        self.forward_features(x, stats)
        return stats.cls_row.reshape(b, 1, h0, w0)


def config_from_state(state: dict) -> dict:
    config = vit_config(state, class_tokens=1)
    if "classifier.weight" in state:
        config["num_classes"] = state["classifier.weight"].shape[0]
    return config


register_model("token_cam", ModelEntry(ViTCam, "token_cam", config_from_state=config_from_state,
                                       description="ViT token CAM (1×1 classifier, ToCo)"))
register_model("token_cam_tiny", ModelEntry(ViTCam, "token_cam",
                                            config_from_state=config_from_state,
                                            defaults=dict(SMALL_VIT),
                                            description="small token_cam for CPU training"))
