"""DOEI for multi-class-token ViTs (MCTformer V1 / V2 / +): our explicit, parameter-free
formulation (DESIGN §5.3; upstream released neither code nor equations, vit_methods.md §4).

In each DOEI block (default: the last 4), with ``A_h`` the block's attention of head ``h``,
``Ā = mean_h A_h``, ``u = norm1(x)`` the block's normalized input tokens and ``T = C + P``::

    HFA     R_hyb = (Ā + λ_e·rownorm(relu(cos(u_i, u_j))) + λ_c·rownorm(S_rgb)) / (1 + λ_e + λ_c)
            S_rgb: relu(cos) of the mean-centred mean RGB of two patches (over the image's
            patches); identity rows / columns for the class tokens
    CPDO    R[:C, C:] = φ_γ(R_hyb[:C, C:])      class rows over the patches
    PPDO    R[C:, :C] = φ_γ(R_hyb[C:, :C])      patch rows over the classes
            (the class↔class and patch↔patch blocks stay R_hyb's)
    block   x ← x + MHSA(x) + β·Σ_h (R − A_h) V_h W_o,  then the unchanged MLP sub-block

``φ_γ(a) = (Σa)·a^γ / Σa^γ`` is ``ops.class_patch_reweight`` (DESIGN §3.2) and γ grows linearly
from 1 in the first DOEI block to ``γ_max`` in the last (``γ_max`` when there is one block;
``gamma_schedule="constant"``: ``γ_max`` in every DOEI block). A
vector's cosine with itself is taken as 1 (so a patch whose centred colour is zero keeps its
own row mass). The residual term uses the block's own ``W_o`` without its bias: no new weights.
Since ``R`` and ``A_h`` have rows summing to 1, the block mixes values by
``A_h + β(R − A_h)``.

Where the re-weighting acts (``reweight``; the paper's text allows either): ``"probabilities"``
(the default, above) applies φ_γ to the fused probabilities ``R_hyb``; ``"logits"`` instead
multiplies every head's class→patch and patch→class attention *logits* by γ before its softmax
(a temperature 1/γ on those blocks, so ``A_h`` itself, hence the MHSA path, ``Ā`` and HFA, is
sharpened; unlike φ_γ it also moves mass between the class and the patch keys of a row), and
``R = R_hyb``; ``"both"`` does both. CAMs take the class→patch block of ``R`` in DOEI blocks (``Ā``'s elsewhere);
the patch affinity used for refinement stays ``Ā``'s (as the streaming path recomputes it).

In training the gradient does not flow through ``R`` (``detach_reweight``, the default): only
through ``A_h`` (weighted ``1 − β`` in the mixing) and ``V``. The forward is the same either way.

``S_rgb`` is computed from the network input (ImageNet-normalized; the per-channel scales differ
by under 3%, which barely moves a cosine). Memory: a DOEI block materializes its ``(B, H, T, T)``
attention and mixing matrices and a few ``(B, T, T)`` maps, about ``B·(2H+6)·T²`` floats; the
other blocks keep the fused path. Training keeps these for every DOEI block: 16 MB for 4 blocks
at batch 16, 128 px, patch 16, 8 classes, 3 heads (``T = 72``); at inference one block's worth
is alive at a time (VOC 500×375, 20 classes, DeiT-S: ``T = 733``, 37 MB per image).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from wsss_fast import ops
from wsss_fast.models.mctformer import SMALL_VIT, MCTformer, config_from_state, mctformer_v2
from wsss_fast.models.registry import ModelEntry, register_model
from wsss_fast.ops.attention_stats import block_weights

DEFAULT_BLOCKS = 4


def row_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.sum(dim=-1, keepdim=True).clamp_min(eps)


def cosine_affinity(vectors: torch.Tensor) -> torch.Tensor:
    """``relu(cos(v_i, v_j))`` for ``vectors (B, N, F)`` → ``(B, N, N)``, diagonal 1."""
    unit = F.normalize(vectors.float(), dim=-1)
    similarity = (unit @ unit.transpose(-1, -2)).clamp_min(0)
    eye = torch.eye(vectors.shape[1], dtype=torch.bool, device=vectors.device)
    return torch.where(eye, torch.ones_like(similarity), similarity)


def rgb_similarity(images: torch.Tensor, patch_size: int, num_cls: int) -> torch.Tensor:
    """``S_rgb (B, T, T)``: identity on the class tokens, ``cosine_affinity`` of the patches'
    mean colours minus their mean over the image on the patches (trailing pixels that the patch
    embedding drops are ignored, as it does)."""
    b, _, height, width = images.shape
    h0, w0 = height // patch_size, width // patch_size
    pixels = images[..., :h0 * patch_size, :w0 * patch_size].float()
    colours = F.avg_pool2d(pixels, patch_size).flatten(2).transpose(1, 2)        # (B, P, 3)
    colours = colours - colours.mean(dim=1, keepdim=True)
    p = h0 * w0
    out = torch.zeros(b, num_cls + p, num_cls + p, dtype=torch.float32, device=images.device)
    out[:, :num_cls, :num_cls] = torch.eye(num_cls, device=images.device)
    out[:, num_cls:, num_cls:] = cosine_affinity(colours)
    return out


def hybrid_attention(attn_mean: torch.Tensor, tokens: torch.Tensor, rgb: torch.Tensor,
                     lambda_e: float, lambda_c: float) -> torch.Tensor:
    """HFA: ``(Ā + λ_e·rownorm(relu(cos(u))) + λ_c·rownorm(S_rgb)) / (1 + λ_e + λ_c)``."""
    embedding = row_normalize(cosine_affinity(tokens))
    return (attn_mean + lambda_e * embedding + lambda_c * row_normalize(rgb)) / (
        1 + lambda_e + lambda_c)


def decouple(hybrid: torch.Tensor, num_cls: int, gamma: float) -> torch.Tensor:
    """CPDO / PPDO: ``φ_γ`` on the class→patch rows and on the patch→class rows of ``(B, T, T)``."""
    c = num_cls
    cls2patch = ops.class_patch_reweight(hybrid[:, :c, c:], gamma)
    patch2cls = ops.class_patch_reweight(hybrid[:, c:, :c], gamma)
    return torch.cat([torch.cat([hybrid[:, :c, :c], cls2patch], dim=-1),
                      torch.cat([patch2cls, hybrid[:, c:, c:]], dim=-1)], dim=1)


REWEIGHT_PLACES = ("probabilities", "logits", "both")
GAMMA_SCHEDULES = ("linear", "constant")


def scale_cross_logits(logits: torch.Tensor, num_cls: int, gamma: float) -> torch.Tensor:
    """``logits (..., T, T)`` with the class→patch and patch→class blocks multiplied by γ (the
    class↔class and patch↔patch blocks unchanged)."""
    c = num_cls
    scale = torch.ones(logits.shape[-2:], dtype=logits.dtype, device=logits.device)
    scale[:c, c:] = gamma
    scale[c:, :c] = gamma
    return logits * scale


def progressive_gammas(count: int, gamma_max: float,
                       schedule: str = "linear") -> tuple[float, ...]:
    """γ per DOEI block: linear from 1 to ``gamma_max`` (``gamma_max`` alone for one block), or
    ``gamma_max`` in every block (``schedule="constant"``)."""
    if count == 1 or schedule == "constant":
        return (float(gamma_max),) * count
    return tuple(1 + (gamma_max - 1) * j / (count - 1) for j in range(count))


def _check_number(name: str, value, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"DOEI: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


class DOEI(nn.Module):
    """An MCTformer with DOEI active in ``blocks``; parameters and state-dict keys are the wrapped
    model's (no new weights), so MCTformer checkpoints load into it and its checkpoints are
    MCTformer checkpoints.

    >>> doei = DOEI(model, blocks=4, lambda_e=0.5, lambda_c=0.5, gamma_max=2.0, beta=0.5)
    >>> CamEngine(doei, "mctformer_v2_doei")(image, labels)     # or doei(x) to train

    Args:
        blocks: an int K (the last K blocks), ``"all"``, or block indices (negative from the end).
        lambda_e, lambda_c: HFA weights of the embedding and colour similarities (≥ 0).
        gamma_max: φ_γ exponent of the last DOEI block (> 0; γ starts at 1).
        beta: weight of the residual ``Σ_h (R − A_h) V_h W_o`` (≥ 0).
        reweight: where φ_γ acts: ``"probabilities"`` (on ``R_hyb``), ``"logits"`` (γ times the
            class↔patch logits of every head before the softmax) or ``"both"``.
        gamma_schedule: ``"linear"`` (1 → γ_max over the DOEI blocks) or ``"constant"``.
        detach_reweight: in training, ``R`` (HFA and the φ_γ re-weighting) is a constant of the
            backward pass, as BNR's Ā*: the loss trains the block through ``A_h`` and ``V``
            only. ``False`` lets the gradient through ``R`` too, which trained worse class
            attention on the demo (from scratch, seed 0: seed mIoU 37.4 against 44.2
            detached; README, DOEI). No effect on inference.
    """

    def __init__(self, model: MCTformer, *, blocks: Union[int, str, Sequence[int]] = DEFAULT_BLOCKS,
                 lambda_e: float = 0.5, lambda_c: float = 0.5, gamma_max: float = 2.0,
                 beta: float = 0.5, reweight: str = "probabilities",
                 gamma_schedule: str = "linear", detach_reweight: bool = True):
        super().__init__()
        if not isinstance(model, MCTformer):
            raise ValueError(f"DOEI needs an MCTformer (multi-class-token ViT), "
                             f"got {type(model).__name__}")
        self.model = model
        weights = block_weights(model.depth, blocks)
        indices = [i for i, weight in enumerate(weights) if weight]
        if not indices:
            raise ValueError(f"DOEI: blocks={blocks!r} selects none of the {model.depth} blocks")
        self.lambda_e = _check_number("lambda_e", lambda_e, 0.0)
        self.lambda_c = _check_number("lambda_c", lambda_c, 0.0)
        self.gamma_max = _check_number("gamma_max", gamma_max, 0.0, strict=True)
        self.beta = _check_number("beta", beta, 0.0)
        for name, value, choices in (("reweight", reweight, REWEIGHT_PLACES),
                                     ("gamma_schedule", gamma_schedule, GAMMA_SCHEDULES)):
            if value not in choices:
                raise ValueError(f"DOEI: {name} must be one of {', '.join(choices)}, "
                                 f"got {value!r}")
        self.reweight, self.gamma_schedule = reweight, gamma_schedule
        if not isinstance(detach_reweight, bool):
            raise ValueError(f"DOEI: detach_reweight must be true or false, "
                             f"got {detach_reweight!r}")
        self.detach_reweight = detach_reweight
        self.gammas = dict(zip(indices, progressive_gammas(len(indices), self.gamma_max,
                                                           gamma_schedule)))

    # -- the wrapped model's identity ------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return self.model.grid(height, width)

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    # -- forward ---------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, stats: Optional[ops.AttentionStats] = None,
                         qk_out: Optional[list] = None):
        """As ``MCTformer.forward_features``, with the DOEI blocks replaced."""
        model = self.model
        b, _, height, width = x.shape
        c = model.num_classes
        tokens = torch.cat([model.cls_token.expand(b, -1, -1), model.patch_embed(x)], dim=1)
        tokens = tokens + model.interpolate_pos_encoding(height, width)
        rgb = None
        for i, block in enumerate(model.blocks):
            kwargs = stats.block_kwargs(i) if stats is not None else None
            if i not in self.gammas:
                tokens = block(tokens, c, kwargs, qk_out)
                continue
            if rgb is None:
                rgb = rgb_similarity(x, model.patch_embed.patch_size, c)
            tokens = self._doei_block(block, tokens, rgb, self.gammas[i], kwargs, qk_out)
        return tokens[:, :c], tokens[:, c:]

    def _doei_block(self, block, x, rgb, gamma, stats: Optional[dict], qk_out):
        c = self.model.num_classes
        attention = block.attn
        u = block.norm1(x)
        b, t, dim = u.shape
        heads = attention.num_heads
        qkv = attention.qkv(u).reshape(b, t, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if qk_out is not None:
            qk_out.append((q, k))
        logits = q.float() @ k.float().transpose(-1, -2) * attention.scale
        if self.reweight != "probabilities":
            logits = scale_cross_logits(logits, c, gamma)
        attn = torch.softmax(logits, dim=-1)
        attn_mean = attn.mean(dim=1)
        r = hybrid_attention(attn_mean, u, rgb, self.lambda_e, self.lambda_c)
        if self.reweight != "logits":
            r = decouple(r, c, gamma)
        if self.detach_reweight:
            r = r.detach()
        mixing = attn + self.beta * (r[:, None] - attn)        # A_h + β(R − A_h)
        out = (mixing @ v.float()).to(v.dtype).transpose(1, 2).reshape(b, t, dim)
        x = x + attention.proj(out)
        if stats:
            for name, rows in (("cls2patch", r[:, :c, c:]), ("patch2patch", attn_mean[:, c:, c:]),
                               ("cls_row", r[:, 0, c:])):
                if name in stats:
                    stats[name] += stats[f"{name}_weight"] * rows
        return x + block.mlp(block.norm2(x))

    @contextlib.contextmanager
    def _active(self):
        """Run the wrapped model's own ``forward`` / ``cam_maps`` with DOEI's forward_features
        (so logits, PatchCAM fusion and refinement are exactly the baseline's code)."""
        self.model.forward_features = self.forward_features
        try:
            yield self.model
        finally:
            del self.model.forward_features

    def forward(self, x: torch.Tensor):
        """The wrapped model's training logits, computed with DOEI active."""
        with self._active() as model:
            return model(x)

    def cam_maps(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """``MCTformer.cam_maps`` (same arguments) with DOEI active."""
        with self._active() as model:
            return model.cam_maps(x, **kwargs)


def doei_mctformer_v2(num_classes: int = 20, *, blocks=DEFAULT_BLOCKS, lambda_e: float = 0.5,
                      lambda_c: float = 0.5, gamma_max: float = 2.0, beta: float = 0.5,
                      reweight: str = "probabilities", gamma_schedule: str = "linear",
                      detach_reweight: bool = True, **kwargs) -> DOEI:
    """MCTformer-V2 (``mctformer_v2`` arguments) with DOEI (the registry's builder)."""
    return DOEI(mctformer_v2(num_classes=num_classes, **kwargs), blocks=blocks,
                lambda_e=lambda_e, lambda_c=lambda_c, gamma_max=gamma_max, beta=beta,
                reweight=reweight, gamma_schedule=gamma_schedule,
                detach_reweight=detach_reweight)


register_model("mctformer_v2_doei", ModelEntry(doei_mctformer_v2, "mctformer_v2_doei",
                                               config_from_state=config_from_state,
                                               description="MCTformer-V2 + DOEI (DeiT-S)"))
# DOEI in the last third of the blocks, as its default 4 of DeiT-S's 12.
register_model("mctformer_v2_doei_tiny", ModelEntry(doei_mctformer_v2, "mctformer_v2_doei",
                                                    config_from_state=config_from_state,
                                                    defaults=dict(SMALL_VIT, blocks=2),
                                                    description="small mctformer_v2_doei for "
                                                                "CPU training"))
