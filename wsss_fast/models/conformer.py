"""Conformer (the TransCAM / BNR backbone), checkpoint-compatible with ``network.conformer.Net``
of liruiwen/TransCAM, with its attention running through ``wsss_fast.ops.attention_stats``.

Architecture (stride in brackets, ``c1 = base_channel·channel_ratio``, ``c2 = 2·c1``,
``c3 = 4·c1``, ``D = embed_dim``)::

    stem      conv7×7/2 (no bias) → BN(eps 1e-5) → ReLU → maxpool3×3/2           [4], 64 ch
    CNN  0    conv_1 = bottleneck 64 → c1 (projection shortcut)                   [4]
    trans 0   trans_1 = Block(tokens) with tokens = [cls; trans_patch_conv(stem)]  (k = s = patch/4)
    i = 2..L  conv_trans_i:
                x, x2 = cnn_block(x)                       x2 = the bottleneck's mid activation
                x_t   = trans_block(x_t + [x_t[:, 0]; squeeze_block(x2)])
                x     = fusion_block(x, expand_block(x_t))  added to the mid activation, pre-conv2
              stages: i in 2..L/3+1 at [4] (c1), then L/3 blocks at [8] (c2, first strided),
              then L/3 at [16] (c3, first strided; the last fusion block has a projection shortcut;
              ``output_stride=8``: stage 3 unstrided, at [8], for ``patch_size=8``)
    heads     conv_cls_head = conv3×3 c3 → K on the final CNN map: M (B, K, h, w) at [16]
              conv_logits = GAP(M);  trans_logits = trans_cls_head(trans_norm(x_t)[:, 0])

Details that matter for bit-level agreement with the checkpoints (network/conformer.py):

* Normalization eps: every BatchNorm inside the bottlenecks and ``FCUUp`` uses eps 1e-6, but the
  stem ``bn1`` is a default ``BatchNorm2d`` (eps 1e-5); the transformer blocks and ``FCUDown.ln``
  use LayerNorm eps 1e-6, but ``trans_norm`` is a default ``LayerNorm`` (eps 1e-5).
* ``FCUDown`` (squeeze_block): 1×1 conv (bias) → AvgPool(dw) → LayerNorm → GELU, then the *current*
  class token is prepended, and the block input is ``x_t + that``: the class token entering every
  ``conv_trans_i`` transformer block is therefore ``2 · x_t[:, 0]`` (upstream behaviour, kept).
* ``FCUUp`` (expand_block): patch tokens → (B, D, h, w) → 1×1 conv (bias) → BN → ReLU → nearest
  upsampling ×dw; the fusion bottleneck adds it to ``ReLU(BN(conv1(x)))`` before its 3×3 conv.
* The transformer block is the plain pre-norm ViT block (``x + attn(LN(x))``, ``x + mlp(LN(x))``,
  GELU, LayerNorm eps 1e-6, scale ``head_dim**-0.5``) — ``vit_blocks.Block`` is used unchanged;
  the only Conformer-specific part is the input it receives (above).
* There is no positional embedding.

TransCAM's CAM (``forward(method='transcam')``)::

    A*  = Σ_{all blocks} mean_h softmax(q kᵀ·scale)[1:, 1:]     (B, P, P), class row/col dropped
    CAM = A* · M                                                 (B, K, h, w), M without ReLU

Here ``A*`` is accumulated by ``attention_stats`` while the blocks run (no per-block attention is
kept) and the product is ``ops.propagate``.

Input sizes: the official model reshapes the token grid with ``int(sqrt(P))`` on both axes, so it
only works on square token grids (and silently scrambles a non-square grid whose ``P`` is a perfect
square, e.g. 8×32). Here the CAM keeps the CNN map's ``(h, w)``, so any ``H×W`` works for which the
CNN and token grids line up: ``ceil(H/4)`` and ``ceil(W/4)`` must be multiples of ``patch_size/4``
(for patch 16: ``H, W ∈ {16k−3, …, 16k}``); other sizes raise ``ValueError`` (upstream fails with
a shape error inside the fusion block).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast import ops
from wsss_fast.models.registry import ModelEntry, count_blocks, register_model
from wsss_fast.models.vit_blocks import Block

__all__ = ["Conformer", "transcam_small", "transcam_golden_tiny", "mimetic_init_", "ATTN_INITS"]

_BN_EPS = 1e-6      # bottlenecks and FCUUp
_LN_EPS = 1e-6      # transformer blocks and FCUDown
_EXPANSION = 4

# Attention initializations (``Conformer(attn_init=...)``): "trunc_normal" is upstream's (every
# Linear ~ N(0, 0.02²)); "mimetic" is Trockman & Kolter's (ICML 2023) W_q W_kᵀ ≈ α₁Z + β₁I and
# W_v W_o ≈ α₂Z − β₂I; "mimetic_qk" initializes only W_q, W_k that way.
ATTN_INITS = ("trunc_normal", "mimetic", "mimetic_qk")
# The CNN branch's final stride: upstream's 16 (stage 3 strided), or 8 (stage 3 unstrided, for a
# patch-8 token grid: TransCAM's A*·M needs the CNN map and the token grid equal).
OUTPUT_STRIDES = (8, 16)
MIMETIC_QK = (0.7, 0.7)         # (α₁, β₁), the paper's values for small ViTs
MIMETIC_VO = (0.4, 0.4)         # (α₂, β₂)


def _low_rank_factors(alpha: float, beta: float, dim: int, rank: int, generator=None):
    """``(L, R)``, each ``(rank, dim)``, with ``Lᵀ R`` the best rank-``rank`` approximation of
    ``alpha·Z + beta·I`` (``Z`` ~ N(0, 1/dim)): the top singular triplets, split as √σ each."""
    target = alpha * torch.randn(dim, dim, generator=generator) / dim ** 0.5
    target += beta * torch.eye(dim)
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).t(), root[:, None] * vh[:rank]


@torch.no_grad()
def mimetic_init_(attn: nn.Module, qk=MIMETIC_QK, vo=MIMETIC_VO, generator=None) -> None:
    """Mimetic initialization of a ``vit_blocks.Attention`` in place (Trockman & Kolter 2023).

    Per head, ``W_qᵀ W_k`` (the bilinear form of the attention logits, ``q·k = xᵀ W_qᵀ W_k x'``)
    is the rank-head_dim part of ``α₁Z + β₁I``, so that from step 0 a token attends to the tokens
    whose features resemble its own: without positional embeddings (the Conformer has none) the
    attention starts as a content affinity, which is what TransCAM's ``A*·M`` multiplies.
    With ``vo`` (None: keep the current weights), ``W_o W_v`` (the value path, summed over
    heads) is ``α₂Z − β₂I``. Biases are zeroed."""
    dim = attn.proj.in_features
    heads = attn.num_heads
    head_dim = dim // heads
    weight = attn.qkv.weight              # rows [q | k | v], each head-major
    for h in range(heads):
        w_q, w_k = _low_rank_factors(*qk, dim, head_dim, generator)
        rows = slice(h * head_dim, (h + 1) * head_dim)
        weight[rows] = w_q
        weight[dim:][rows] = w_k
    if vo is not None:
        alpha, beta = vo
        w_o, w_v = _low_rank_factors(alpha, -beta, dim, dim, generator)
        weight[2 * dim:] = w_v
        attn.proj.weight.copy_(w_o.t())
        if attn.proj.bias is not None:
            attn.proj.bias.zero_()
    if attn.qkv.bias is not None:
        attn.qkv.bias.zero_()


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` for an eval-mode ``bn``, as one convolution with the folded weights."""
    weight, bias = _folded(conv, bn, x)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor):
    """The folded ``(weight, bias)``, in ``x``'s memory format. Without autograd they are cached
    on ``conv`` until a parameter or statistic changes (a new version or storage): each small
    weight op is one more parallel region, and on a loaded CPU every region waits for its
    threads."""
    sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                     and not x.is_contiguous() else torch.contiguous_format)
    cacheable = not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    key = (memory_format,) + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype)
                                   for t in sources)
    cached = getattr(conv, "_folded_cache", None)
    if cacheable and cached is not None and cached[0] == key:
        return cached[1]
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = (conv.weight * scale.reshape(-1, 1, 1, 1)).contiguous(memory_format=memory_format)
    if cacheable:
        conv._folded_cache = (key, (weight, bias))
    return weight, bias


def _relu(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    return x.relu_() if inplace else F.relu(x)


class _Bottleneck(nn.Module):
    """Upstream ``ConvBlock``: 1×1 → 3×3 (stride) → 1×1 with residual; ``forward`` also returns
    the mid activation ``x2`` (what ``FCUDown`` consumes). ``x_t`` (the expanded tokens) is added
    to the first activation before the 3×3 conv."""

    def __init__(self, inplanes: int, outplanes: int, stride: int = 1, res_conv: bool = False):
        super().__init__()
        med = outplanes // _EXPANSION
        self.conv1 = nn.Conv2d(inplanes, med, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(med, eps=_BN_EPS)
        self.conv2 = nn.Conv2d(med, med, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(med, eps=_BN_EPS)
        self.conv3 = nn.Conv2d(med, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes, eps=_BN_EPS)
        self.res_conv = res_conv
        if res_conv:
            self.residual_conv = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False)
            self.residual_bn = nn.BatchNorm2d(outplanes, eps=_BN_EPS)

    def forward(self, x: torch.Tensor, x_t: Optional[torch.Tensor] = None):
        if not self.training:
            return self._forward_eval(x, x_t)
        y = F.relu(self.bn1(self.conv1(x)))
        if x_t is not None:
            y = y + x_t
        x2 = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(x2))
        shortcut = self.residual_bn(self.residual_conv(x)) if self.res_conv else x
        return F.relu(y + shortcut), x2

    def _forward_eval(self, x: torch.Tensor, x_t: Optional[torch.Tensor]):
        """The same function with every BatchNorm folded into its conv, and (without autograd) the
        ReLUs and adds in place: on a CPU the elementwise passes over fresh stride-4 maps cost
        as much as the convs they follow."""
        inplace = not torch.is_grad_enabled()
        y = _relu(_conv_bn(self.conv1, self.bn1, x), inplace)
        if x_t is not None:
            y = y.add_(x_t) if inplace else y + x_t
        x2 = _relu(_conv_bn(self.conv2, self.bn2, y), inplace)
        y = _conv_bn(self.conv3, self.bn3, x2)
        shortcut = _conv_bn(self.residual_conv, self.residual_bn, x) if self.res_conv else x
        return _relu(y.add_(shortcut) if inplace else y + shortcut, inplace), x2


class _Squeeze(nn.Module):
    """Upstream ``FCUDown``: CNN mid map → patch tokens, with the current class token prepended."""

    def __init__(self, inplanes: int, embed_dim: int, dw_stride: int):
        super().__init__()
        self.dw_stride = dw_stride
        self.conv_project = nn.Conv2d(inplanes, embed_dim, 1)
        self.ln = nn.LayerNorm(embed_dim, eps=_LN_EPS)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = self.conv_project(x)
            if self.dw_stride > 1:
                x = F.avg_pool2d(x, self.dw_stride, self.dw_stride)
        else:   # a 1×1 conv commutes with average pooling: pool first, project dw² fewer pixels
            if self.dw_stride > 1:
                x = F.avg_pool2d(x, self.dw_stride, self.dw_stride)
            x = self.conv_project(x)
        x = F.gelu(self.ln(x.flatten(2).transpose(1, 2)))
        return torch.cat([x_t[:, :1], x], dim=1)


class _Expand(nn.Module):
    """Upstream ``FCUUp``: patch tokens → (B, C, h·dw, w·dw) by 1×1 conv, BN, ReLU, nearest."""

    def __init__(self, embed_dim: int, outplanes: int, up_stride: int):
        super().__init__()
        self.up_stride = up_stride
        self.conv_project = nn.Conv2d(embed_dim, outplanes, 1)
        self.bn = nn.BatchNorm2d(outplanes, eps=_BN_EPS)

    def forward(self, x_t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, d = x_t.shape
        x = x_t[:, 1:].transpose(1, 2).reshape(b, d, h, w)
        if self.training:
            x = F.relu(self.bn(self.conv_project(x)))
        else:
            x = _relu(_conv_bn(self.conv_project, self.bn, x), not torch.is_grad_enabled())
        if self.up_stride > 1:
            x = F.interpolate(x, size=(h * self.up_stride, w * self.up_stride), mode="nearest")
        return x


class _ConvTransBlock(nn.Module):
    """Upstream ``ConvTransBlock`` (key names kept: cnn_block, fusion_block, med_block,
    squeeze_block, expand_block, trans_block)."""

    def __init__(self, inplanes: int, outplanes: int, res_conv: bool, stride: int, dw_stride: int,
                 embed_dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 last_fusion: bool = False, num_med_block: int = 0):
        super().__init__()
        self.cnn_block = _Bottleneck(inplanes, outplanes, stride=stride, res_conv=res_conv)
        self.fusion_block = _Bottleneck(outplanes, outplanes, stride=1, res_conv=last_fusion)
        if num_med_block > 0:  # upstream Med_ConvBlock: the same bottleneck, identity shortcut
            self.med_block = nn.ModuleList(_Bottleneck(outplanes, outplanes)
                                           for _ in range(num_med_block))
        else:
            self.med_block = None
        self.squeeze_block = _Squeeze(outplanes // _EXPANSION, embed_dim, dw_stride)
        self.expand_block = _Expand(embed_dim, outplanes // _EXPANSION, dw_stride)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps=_LN_EPS)
        self.dw_stride = dw_stride

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, stats: Optional[dict] = None):
        x, x2 = self.cnn_block(x)
        _, _, h, w = x2.shape
        # Upstream: trans_block(x_st + x_t) with x_st = [x_t[:, 0]; squeezed] -> cls doubled.
        x_t = self.trans_block(x_t + self.squeeze_block(x2, x_t), 1, stats)
        if self.med_block is not None:
            for block in self.med_block:
                x, _ = block(x)
        x_up = self.expand_block(x_t, h // self.dw_stride, w // self.dw_stride)
        x, _ = self.fusion_block(x, x_up)
        return x, x_t


class Conformer(nn.Module):
    """Conformer with TransCAM's heads; ``state_dict`` keys/shapes equal upstream ``Net``'s.

    Dropout / drop-path are not modelled (inference; upstream's TransCAM runs eval mode).
    ``conv_cls_head`` takes ``4·base_channel·channel_ratio`` channels (upstream hard-codes
    ``256·channel_ratio``, the same number for the only base_channel it is used with, 64).
    ``attn_init`` (one of ``ATTN_INITS``) chooses how the attention weights start: upstream's
    truncated normal, or mimetic (``mimetic_init_``; the small from-scratch model's default).
    ``output_stride`` (``OUTPUT_STRIDES``): the CNN branch's final stride, equal to
    ``patch_size`` for TransCAM's CAM. ``trunk_lr_scale``: see :meth:`trainable_parameters`.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, num_classes: int = 21,
                 base_channel: int = 64, channel_ratio: float = 4, num_med_block: int = 0,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, attn_init: str = "trunc_normal",
                 output_stride: int = 16, trunk_lr_scale: float = 1.0):
        super().__init__()
        if attn_init not in ATTN_INITS:
            raise ValueError(f"attn_init must be one of {', '.join(ATTN_INITS)}, got {attn_init!r}")
        if depth % 3 or depth < 3:
            raise ValueError(f"depth must be a positive multiple of 3, got {depth}")
        if not trunk_lr_scale > 0:
            raise ValueError(f"trunk_lr_scale must be positive, got {trunk_lr_scale}")
        self.trunk_lr_scale = float(trunk_lr_scale)
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        if patch_size <= 0 or patch_size % output_stride:
            raise ValueError(f"patch_size must be a positive multiple of the output stride "
                             f"{output_stride}, got {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.output_stride = output_stride
        c1 = int(base_channel * channel_ratio)
        c2, c3 = 2 * c1, 4 * c1
        dw = patch_size // 4
        # Stage 3 is strided only at output stride 16; each stage's FCU pools / upsamples its
        # CNN map (at stride 4, 8, output_stride) to / from the token grid (stride patch_size).
        last_stride = output_stride // 8

        # Registration order follows upstream so that state_dict() iterates in the same order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.trans_norm = nn.LayerNorm(embed_dim)                 # eps 1e-5 (upstream default)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.conv_cls_head = nn.Conv2d(c3, num_classes, 3, padding=1)
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)                             # eps 1e-5 (upstream default)
        self.conv_1 = _Bottleneck(64, c1, stride=1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(64, embed_dim, dw, stride=dw)
        self.trans_1 = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps=_LN_EPS)
        per_stage = depth // 3
        common = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                      qkv_bias=qkv_bias, num_med_block=num_med_block)
        for i in range(2, per_stage + 1):
            self.add_module(f"conv_trans_{i}",
                            _ConvTransBlock(c1, c1, False, 1, dw_stride=dw, **common))
        first = per_stage + 1
        for i in range(first, first + per_stage):
            start = i == first
            self.add_module(f"conv_trans_{i}",
                            _ConvTransBlock(c1 if start else c2, c2, start, 2 if start else 1,
                                            dw_stride=dw // 2, **common))
        first += per_stage
        for i in range(first, first + per_stage):
            start = i == first
            self.add_module(f"conv_trans_{i}",
                            _ConvTransBlock(c2 if start else c3, c3, start,
                                            last_stride if start else 1,
                                            dw_stride=patch_size // output_stride,
                                            last_fusion=(i == depth), **common))
        self._init_weights(attn_init)

    # -- initialization (upstream's scheme; checkpoints overwrite it) -------------------------
    def _init_weights(self, attn_init: str = "trunc_normal") -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if attn_init != "trunc_normal":
            for block in self.blocks():
                mimetic_init_(block.attn, vo=MIMETIC_VO if attn_init == "mimetic" else None)

    def trainable_parameters(self) -> list[dict]:
        """Optimizer groups: the two classification heads at the training lr, everything else
        (the trunk, which ``--init`` loads) at ``trunk_lr_scale`` times it (the trainer's
        ``lr_scale``): fine-tuning a pretrained trunk more gently than its fresh heads."""
        if self.trunk_lr_scale == 1.0:     # one group: the optimizer exactly as without groups
            return [{"params": list(self.parameters()), "lr_scale": 1.0}]
        heads = [p for m in (self.conv_cls_head, self.trans_cls_head) for p in m.parameters()]
        chosen = {id(p) for p in heads}
        trunk = [p for p in self.parameters() if id(p) not in chosen]
        return [{"params": trunk, "lr_scale": self.trunk_lr_scale},
                {"params": heads, "lr_scale": 1.0}]

    # -- geometry ------------------------------------------------------------------------------
    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The ``(h, w)`` token / CAM grid for an ``height×width`` input; ``ValueError`` if the
        CNN and transformer grids of this model do not line up at that size."""
        dw = self.patch_size // 4
        grid = []
        for name, n in (("height", height), ("width", width)):
            s4 = ((n - 1) // 2 + 1 - 1) // 2 + 1      # conv7×7/2 then maxpool3×3/2: ceil(ceil(n/2)/2)
            if n <= 0 or s4 % dw:
                raise ValueError(
                    f"Conformer: input {height}×{width} is not supported: the stride-4 map "
                    f"{name} ceil({name}/4) = {s4} must be a multiple of patch_size/4 = {dw} "
                    f"(for patch {self.patch_size}: a size in {{{self.patch_size}k-3, …, "
                    f"{self.patch_size}k}})")
            grid.append(s4 // dw)
        return grid[0], grid[1]

    def blocks(self) -> list[Block]:
        """The transformer blocks in order (block i of ``AttentionStats`` is ``blocks()[i]``)."""
        return [self.trans_1] + [getattr(self, f"conv_trans_{i}").trans_block
                                 for i in range(2, self.depth + 1)]

    # -- forward -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, stats: Optional[ops.AttentionStats] = None):
        """``(final CNN map (B, c3, h, w), tokens (B, 1+P, D))``; ``stats`` (optional) receives the
        attention statistics of every block (block index = depth order)."""
        if x.dim() != 4:
            raise ValueError(f"Conformer: expected a (B, C, H, W) input, got {tuple(x.shape)}")
        self.token_grid(x.shape[-2], x.shape[-1])

        def kwargs(i):
            return stats.block_kwargs(i) if stats is not None else None

        if self.training:
            x_base = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        else:
            # channels_last: oneDNN runs NHWC convs without reordering every map to its blocked
            # layout and back; token <-> map reshapes (FCUDown / FCUUp) stay views.
            x = x.contiguous(memory_format=torch.channels_last)
            x_base = F.max_pool2d(_relu(_conv_bn(self.conv1, self.bn1, x),
                                        not torch.is_grad_enabled()), 3, 2, 1)
        x, _ = self.conv_1(x_base)
        x_t = self.trans_patch_conv(x_base).flatten(2).transpose(1, 2)
        x_t = torch.cat([self.cls_token.expand(x_t.shape[0], -1, -1).to(x_t.dtype), x_t], dim=1)
        x_t = self.trans_1(x_t, 1, kwargs(0))
        for i in range(2, self.depth + 1):
            x, x_t = getattr(self, f"conv_trans_{i}")(x, x_t, kwargs(i - 1))
        return x, x_t

    def _heads(self, x: torch.Tensor, x_t: torch.Tensor):
        conv_map = self.conv_cls_head(x)
        conv_logits = conv_map.mean(dim=(-2, -1))
        trans_logits = self.trans_cls_head(self.trans_norm(x_t)[:, 0])
        return conv_map, conv_logits, trans_logits

    def forward(self, x: torch.Tensor):
        """``(conv_logits, trans_logits)``, each ``(B, num_classes)``, as upstream in eval mode."""
        x, x_t = self.forward_features(x)
        _, conv_logits, trans_logits = self._heads(x, x_t)
        return conv_logits, trans_logits

    def forward_cam(self, x: torch.Tensor, *, layers="all", refine: bool = True):
        """``(conv_logits, trans_logits, cam)`` from one pass; ``cam`` as in :meth:`cam_maps`."""
        b = x.shape[0]
        h, w = self.token_grid(x.shape[-2], x.shape[-1])
        stats = ops.AttentionStats.allocate(b, 1, h * w, self.depth,
                                            patch2patch_layers=layers if refine else None,
                                            device=x.device)
        x, x_t = self.forward_features(x, stats)
        conv_map, conv_logits, trans_logits = self._heads(x, x_t)
        if not refine:
            return conv_logits, trans_logits, conv_map.float()
        if conv_map.shape[-2:] != (h, w):
            raise ValueError(f"Conformer: CNN map {tuple(conv_map.shape[-2:])} and token grid "
                             f"{(h, w)} differ (patch_size {self.patch_size} != output_stride "
                             f"{self.output_stride}); TransCAM's A*·M needs them equal")
        m = conv_map.float().flatten(2).transpose(1, 2)                     # (B, P, K)
        cam = ops.propagate(stats.patch2patch, m)  # differentiable when m requires grad
        cam = cam.transpose(1, 2).reshape(b, self.num_classes, h, w)
        return conv_logits, trans_logits, cam

    def cam_maps(self, x: torch.Tensor, *, layers="all", refine: bool = True) -> torch.Tensor:
        """TransCAM's CAM ``A*·M``: ``(B, num_classes, h, w)`` fp32 on the token grid (index 0 is
        the unused background slot), ``A* = Σ_blocks mean_h A[1:, 1:]``, ``M`` the conv head map
        without ReLU. No normalization (the generator normalizes after merging passes).

        ``layers``: the blocks summed into ``A*`` (``"all"`` as published, the last K, or block
        indices); ``refine=False`` gives ``M`` alone (ablations: how much ``A*`` adds)."""
        return self.forward_cam(x, layers=layers, refine=refine)[2]


def transcam_small(num_classes: int = 21) -> Conformer:
    """Conformer-S as TransCAM uses it (``Net_sm``): patch 16, channel_ratio 4, D 384, 12 blocks,
    6 heads, mlp_ratio 4, qkv_bias."""
    return Conformer(patch_size=16, num_classes=num_classes, base_channel=64, channel_ratio=4,
                     embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True)


def transcam_golden_tiny() -> Conformer:
    """The configuration of ``tests/data/golden/transcam/weights_tiny.pth`` (the test oracle)."""
    return Conformer(patch_size=16, num_classes=21, base_channel=64, channel_ratio=1,
                     embed_dim=64, depth=6, num_heads=2, mlp_ratio=4, qkv_bias=True)


# ----------------------------------------------------------------------------- registry

def config_from_state(state: dict) -> dict:
    config = {}
    if "trans_cls_head.weight" in state:
        config["num_classes"], config["embed_dim"] = state["trans_cls_head.weight"].shape
        config["num_heads"] = max(1, config["embed_dim"] // 64)
        # Blocks are trans_1 and conv_trans_2 .. conv_trans_<depth>.
        config["depth"] = max(count_blocks(state, "conv_trans_") - 1, 1)
    if "trans_patch_conv.weight" in state:
        # the patch conv runs on the stride-4 stem map with kernel = stride = patch_size / 4;
        # the CNN's output stride is not in the weights: the one whose map equals the token grid
        # (what TransCAM's A*·M needs), 16 for upstream's patches of 16 and more.
        config["patch_size"] = 4 * state["trans_patch_conv.weight"].shape[-1]
        config["output_stride"] = min(config["patch_size"], 16)
    if "conv_1.conv1.weight" in state:
        # conv_1 is a bottleneck to c1 = base_channel·channel_ratio channels, 4× expansion.
        config["channel_ratio"] = 4 * state["conv_1.conv1.weight"].shape[0] / 64
    return config


# base_channel stays 64: config_from_state reads channel_ratio from checkpoints assuming it.
# attn_init "mimetic": trained from scratch on the 600 synthetic images, upstream's N(0, 0.02²)
# attention stays near-uniform in the first blocks and collapses onto sinks in the last, so A*·M
# is flat (seed mIoU 10.8 on the demo's data); started as a content affinity it trains to one
# that localizes (44.5; M alone 25.5 -> 37.0). The published transcam / transcam_small keep
# upstream's init (they load ImageNet weights anyway).
# patch 8 at output stride 8: at the demo's 128 px crops upstream's patch 16 leaves an 8×8 grid
# (objects of 20-60 px span 1-4 cells) for both M and A*; at 16×16, from the 300-step source
# pretraining, TransCAM's seed went 33.5 -> 45.9 and BNR's 28.5 -> 51.6 (README, Conformer).
SMALL_CONFORMER = dict(patch_size=8, output_stride=8, base_channel=64, channel_ratio=0.5,
                       embed_dim=128, depth=6, num_heads=2, mlp_ratio=4.0, attn_init="mimetic")

register_model("transcam", ModelEntry(Conformer, "transcam", background_slot=True,
                                      config_from_state=config_from_state,
                                      defaults=dict(patch_size=16, base_channel=64,
                                                    channel_ratio=4, embed_dim=384, depth=12,
                                                    num_heads=6),
                                      description="TransCAM / BNR (Conformer-S)"))
register_model("transcam_tiny", ModelEntry(Conformer, "transcam", background_slot=True,
                                           config_from_state=config_from_state,
                                           defaults=dict(SMALL_CONFORMER),
                                           description="small TransCAM / BNR Conformer"))
