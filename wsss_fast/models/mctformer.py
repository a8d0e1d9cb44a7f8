"""MCTformer-V1 / V2 (Xu et al., CVPR 2022) and MCTformer+: DeiT with one class token per class.

Checkpoint-compatible with the official ``MCTformerV1`` / ``MCTformerV2`` classes (keys
``cls_token (1, C, D)``, ``pos_embed (1, C + N, D)``, ``patch_embed.proj``, ``blocks.i.*``,
``norm`` (present but unused: the final norm is not applied), ``head``: a 3×3 conv PatchCAM head
for V2, an unused linear layer for V1) and ``MCTformerPlus`` (separate ``pos_embed_cls (1, C, D)``
and ``pos_embed_pat (1, N, D)`` for a 448 training input; the base ``pos_embed (1, 197, D)`` stays
in its checkpoints, unused; PatchCAM head). See reference/vit_methods.md §1.

CAMs come from ``cam_maps``: the class→patch attention of the last ``cls_layers`` blocks and the
patch affinity of all blocks are accumulated by ``attention_stats`` while the forward runs (no
attention map is kept), V2 fuses PatchCAM through ``class_patch_reweight``, and refinement is
``propagate``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast import ops
from wsss_fast.models.registry import ModelEntry, count_blocks, register_model
from wsss_fast.models.vit_blocks import Block

ATTENTION_TYPES = ("fused", "patchcam", "mct")
VERSIONS = ("v1", "v2", "plus")


class PatchEmbed(nn.Module):
    """Stride-``patch`` conv: trailing ``H % patch`` rows and ``W % patch`` columns are dropped, as
    upstream."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MCTformer(nn.Module):
    def __init__(self, version: str = "v2", num_classes: int = 20, img_size: int = 224,
                 patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        self.version = version
        # ``train --init`` from a one-token ViT (``load_matching``): V2 / + start every class
        # token and class position row from the backbone's; V1 keeps its own init: its tokens
        # then started alike, and V1 from vit.pt seeded 40.3 against 44.2 / 45.4 with its own
        # init (seed 0; 50.2 at seed 1), while V2 lost (seed 0/1: 46.0 / 57.7 from the
        # backbone, 44.6 / 47.5 own; README, "Pretrained backbones").
        self.class_tokens_from_backbone = version != "v1"
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.train_grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        if version == "plus":
            # The DeiT base embedding (1 + 14², 224 input) is kept by upstream but never used.
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (224 // patch_size) ** 2, embed_dim))
            self.pos_embed_cls = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
            self.pos_embed_pat = nn.Parameter(torch.zeros(1, self.train_grid ** 2, embed_dim))
            nn.init.trunc_normal_(self.pos_embed_cls, std=0.02)
            nn.init.trunc_normal_(self.pos_embed_pat, std=0.02)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_classes + self.train_grid ** 2,
                                                      embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps=1e-6)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)  # in the checkpoints; never applied
        if version in ("v2", "plus"):
            self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=3, padding=1)
        else:
            self.head = nn.Linear(embed_dim, num_classes)  # unused ('average' logits)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_embed.patch_size
        return height // p, width // p

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Upstream's resizing: unchanged only for a square image with the training grid;
        otherwise bicubic with ``scale_factor = (grid + 0.1) / train_grid`` (not ``size=``: the
        factor itself maps the sampling coordinates, so values differ from a size-based resize)."""
        h0, w0 = self.grid(height, width)
        n = self.train_grid
        if self.version == "plus":
            return torch.cat([self.pos_embed_cls, self._plus_patch_pos(h0, w0)], dim=1)
        if h0 * w0 == n * n and height == width:
            return self.pos_embed
        cls_pos = self.pos_embed[:, :self.num_classes]
        patch_pos = self.pos_embed[:, self.num_classes:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=((h0 + 0.1) / n, (w0 + 0.1) / n),
                                  mode="bicubic", align_corners=False)
        if patch_pos.shape[-2:] != (h0, w0):
            raise RuntimeError(f"pos-embed resize gave {tuple(patch_pos.shape[-2:])}, "
                               f"expected {(h0, w0)}")
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def _plus_patch_pos(self, h0: int, w0: int) -> torch.Tensor:
        """MCTformer+ (eval): bicubic with ``scale_factor = grid / train_grid`` and no +0.1. Its
        'unchanged' test compares the patch count minus C with N, so the resize always runs (it is
        exact at factor 1). Sizes whose factor floors to the wrong grid fail, as upstream."""
        n = self.train_grid
        patch_pos = self.pos_embed_pat.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(h0 / n, w0 / n), mode="bicubic",
                                  align_corners=False)
        if patch_pos.shape[-2:] != (h0, w0):
            raise ValueError(f"MCTformer+ cannot resize its {n}x{n} position embedding to "
                             f"{h0}x{w0} (upstream's scale factor floors to "
                             f"{tuple(patch_pos.shape[-2:])}); use another input size")
        return patch_pos.flatten(2).transpose(1, 2)

    def forward_features(self, x: torch.Tensor, stats: Optional[ops.AttentionStats] = None,
                         qk_out: Optional[list] = None):
        """Raw tokens of the last block (no final norm): class tokens (B, C, D), patches (B, P, D).
        ``qk_out``: a list that receives every block's ``(q, k)``."""
        b, _, height, width = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(height, width)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, self.num_classes, stats.block_kwargs(i) if stats else None,
                           qk_out)
        return tokens[:, :self.num_classes], tokens[:, self.num_classes:]

    def patch_cam(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """V2's PatchCAM logits ``head(patch tokens as (B, D, h, w))``."""
        h0, w0 = self.grid(height, width)
        grid = patches.transpose(1, 2).reshape(patches.shape[0], self.embed_dim, h0, w0)
        return self.head(grid)

    def forward(self, x: torch.Tensor):
        """Training logits: V1 ``cls_logits``; V2 ``(cls_logits, patch_logits)`` (GAP of
        PatchCAM); MCTformer+ ``(cls_logits, patch_logits)`` with global ranking pooling."""
        cls_tokens, patches = self.forward_features(x)
        cls_logits = cls_tokens.mean(dim=-1)
        if self.version == "v1":
            return cls_logits
        patch_cam = self.patch_cam(patches, *x.shape[-2:]).flatten(2)
        if self.version == "v2":
            return cls_logits, patch_cam.mean(dim=-1)
        return cls_logits, global_ranking_pool(patch_cam)

    @torch.no_grad()
    def cam_maps(self, x: torch.Tensor, *, cls_layers: int = 3, attention_type: str = "fused",
                 refine: bool = True, affinity: str = "dense") -> torch.Tensor:
        """Low-resolution CAMs ``(B, C, h, w)`` as the official generator computes them per pass.

        Args:
            cls_layers: class→patch attention summed (MCTformer+: averaged) over the last
                ``cls_layers`` blocks (``--layer-index``; the V1/V2 scripts use 3, + uses 12).
            attention_type: V2 / +: ``"fused"`` (class attention ⊙ ReLU(PatchCAM), square-rooted
                for +), ``"patchcam"`` or ``"mct"`` (class attention alone).
            refine: multiply by the patch affinity summed over all blocks (``--patch-attn-refine``).
            affinity: ``"dense"`` accumulates the (B, P, P) affinity during the forward;
                ``"streaming"`` keeps the blocks' q, k instead (O(L·T·d), not O(P²)) and refines
                with ``propagate_streaming`` — for the largest inputs.
        """
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        if affinity not in ("dense", "streaming"):
            raise ValueError(f"affinity must be 'dense' or 'streaming', got {affinity!r}")
        streaming = refine and affinity == "streaming"
        b, _, height, width = x.shape
        h0, w0 = self.grid(height, width)
        if h0 == 0 or w0 == 0:
            raise ValueError(f"input {height}x{width} is smaller than one "
                             f"{self.patch_embed.patch_size}-pixel patch")
        plus = self.version == "plus"
        stats = ops.AttentionStats.allocate(b, self.num_classes, h0 * w0, self.depth,
                                            cls2patch_layers=cls_layers,
                                            cls2patch_reduce="mean" if plus else "sum",
                                            patch2patch_layers="all" if refine and not streaming
                                            else None, device=x.device)
        qk = [] if streaming else None
        _, patches = self.forward_features(x, stats, qk)
        cams = stats.cls2patch                                              # (B, C, P)
        if self.version != "v1" and attention_type != "mct":
            patch_cam = self.patch_cam(patches, height, width).flatten(2).float()
            if attention_type == "fused":  # MCTformer+: sqrt(mean class attention ⊙ ReLU(F))
                cams = ops.class_patch_reweight(cams, 1.0, patchcam=patch_cam, sqrt=plus)
            else:
                cams = patch_cam.clamp_min(0)
        if streaming:
            q, k = torch.stack([q for q, _ in qk]), torch.stack([k for _, k in qk])
            cams = ops.propagate_streaming(
                q, k, cams.transpose(1, 2).float().contiguous(), scale=self.blocks[0].attn.scale,
                num_cls=self.num_classes, weights=[1.0] * self.depth).transpose(1, 2)
        elif refine:
            cams = ops.propagate(stats.patch2patch, cams.transpose(1, 2).contiguous()).transpose(1, 2)
        return cams.reshape(b, self.num_classes, h0, w0)


def global_ranking_pool(patch_cam: torch.Tensor, decay: float = 0.996) -> torch.Tensor:
    """MCTformer+'s patch logits: per class, the patch logits sorted in descending order,
    weighted by ``decay**rank`` and divided by the sum of the weights. ``(B, C, P) -> (B, C)``."""
    ranked = patch_cam.sort(dim=-1, descending=True).values
    weights = decay ** torch.arange(ranked.shape[-1], device=ranked.device, dtype=ranked.dtype)
    return (ranked * weights).sum(dim=-1) / weights.sum()


def _mctformer(version: str, **kwargs) -> MCTformer:
    defaults = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                    qkv_bias=True)
    return MCTformer(version, **{**defaults, **kwargs})


def mctformer_v1(num_classes: int = 20, **kwargs) -> MCTformer:
    """``deit_small_MCTformerV1_patch16_224``."""
    return _mctformer("v1", num_classes=num_classes, **kwargs)


def mctformer_v2(num_classes: int = 20, **kwargs) -> MCTformer:
    """``deit_small_MCTformerV2_patch16_224``."""
    return _mctformer("v2", num_classes=num_classes, **kwargs)


def mctformer_plus(num_classes: int = 20, img_size: int = 448, **kwargs) -> MCTformer:
    """``deit_small_MCTformerPlus`` (448 training input: a 28×28 patch position embedding)."""
    return _mctformer("plus", num_classes=num_classes, img_size=img_size, **kwargs)


# ----------------------------------------------------------------------------- registry

def vit_config(state: dict, class_tokens: Optional[int]) -> dict:
    """embed_dim, depth, num_classes and img_size of a DeiT-style checkpoint (``class_tokens``
    None: one class token per class, as MCTformer)."""
    config = {}
    if "cls_token" in state:
        embed_dim = state["cls_token"].shape[-1]
        config.update(embed_dim=embed_dim, num_heads=max(1, embed_dim // 64),
                      depth=count_blocks(state, "blocks."))
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


def config_from_state(state: dict) -> dict:
    return vit_config(state, class_tokens=None)


# Small ViT-family configurations for training on the synthetic benchmark on a CPU (DESIGN §9):
# heads = embed_dim // 64 so that checkpoints reload with no architecture arguments.
SMALL_VIT = dict(patch_size=16, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0, img_size=128)

for _name, _builder, _description in (
        ("mctformer_v1", mctformer_v1, "MCTformer-V1 (DeiT-S, C class tokens)"),
        ("mctformer_v2", mctformer_v2, "MCTformer-V2 (+ PatchCAM head)"),
        ("mctformer_plus", mctformer_plus, "MCTformer+ (GRP, 448 training)")):
    register_model(_name, ModelEntry(_builder, _name, config_from_state=config_from_state,
                                     description=_description))
    register_model(f"{_name}_tiny", ModelEntry(_builder, _name,
                                               config_from_state=config_from_state,
                                               defaults=dict(SMALL_VIT),
                                               description=f"small {_name} for CPU training"))
