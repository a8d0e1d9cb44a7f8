"""Transformer blocks whose attention is ``wsss_fast.ops.attention_stats``.

Parameter names follow timm / DeiT (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``), so upstream checkpoints load unchanged. A block given the keyword
arguments of ``AttentionStats.block_kwargs`` accumulates the CAM statistics while it computes its
attention (one attention per block); without them it runs plain fused SDPA. Given a list as
``qk_out``, a block appends its ``(q, k)`` (for ``propagate_streaming``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast import ops


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_cls: int = 0, stats: Optional[dict] = None,
                qk_out: Optional[list] = None) -> torch.Tensor:
        b, t, dim = x.shape
        # qkv rows are [q | k | v], each head-major (the upstream layout).
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if qk_out is not None:
            qk_out.append((q, k))
        if stats:
            out = ops.attention_stats(q, k, v, self.scale, num_cls, **stats)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, t, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (no drop-path at
    inference)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, num_cls: int = 0, stats: Optional[dict] = None,
                qk_out: Optional[list] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), num_cls, stats, qk_out)
        return x + self.mlp(self.norm2(x))
