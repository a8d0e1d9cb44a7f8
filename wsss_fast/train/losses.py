"""Training losses of the ViT-family methods (reference/vit_methods.md §1.4, §2.4, §3.1, §5.3).

Every loss has the signature ``loss(model, images, labels) -> (loss, {name: float})`` with
``images (B, 3, H, W)`` normalized and ``labels (B, K)`` float multi-hot over the foreground
classes. ``MLSM`` is ``F.multilabel_soft_margin_loss`` (mean over classes, then over the batch),
the criterion every one of these repositories uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_fast import ops

LossResult = tuple[torch.Tensor, dict]


def _mlsm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ "
                         f"(does the model have one output per dataset class?)")
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


def _terms(**terms: torch.Tensor) -> LossResult:
    total = sum(terms.values())
    return total, {name: float(value.detach()) for name, value in terms.items()}


def mctformer_v1_loss(model, images, labels) -> LossResult:
    """MCTformer-V1: ``MLSM(cls_logits)`` with ``cls_logits = mean_D(class tokens)``
    (MCTformer engine.py:30-40 @96065977, V1 returns one tensor)."""
    return _terms(cls=_mlsm(model(images), labels))


def mctformer_v2_loss(model, images, labels) -> LossResult:
    """MCTformer-V2: ``MLSM(cls_logits) + MLSM(GAP(PatchCAM))`` (engine.py:30-40 @96065977).
    Also the loss of MCTformer-V2 + DOEI, given the DOEI-wrapped model."""
    cls_logits, patch_logits = model(images)
    return _terms(cls=_mlsm(cls_logits, labels), patch=_mlsm(patch_logits, labels))


def class_token_contrast(class_tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MCTformer+'s class-token regularizer (vit_methods.md §1.4, HEAD engine.py:35-62).

    ``class_tokens (L, B, C, D)``: per layer, the L2-normalized class tokens give a ``C×C`` cosine
    matrix used as logits; token ``i``'s row is scored by cross-entropy against class ``i``. The
    per-row losses are summed over the image's positive classes, averaged over layers, divided by
    the number of positives and averaged over the batch (images without a positive add 0).
    """
    if class_tokens.dim() != 4 or class_tokens.shape[1:3] != labels.shape:
        raise ValueError(f"class_tokens must be (L, B, C, D) with (B, C) = labels "
                         f"{tuple(labels.shape)}, got {tuple(class_tokens.shape)}")
    layers, batch, classes, _ = class_tokens.shape
    unit = F.normalize(class_tokens.float(), dim=-1)
    cosine = unit @ unit.transpose(-1, -2)                                    # (L, B, C, C)
    target = torch.arange(classes, device=cosine.device).expand(layers, batch, classes)
    per_row = F.cross_entropy(cosine.reshape(-1, classes), target.reshape(-1),
                              reduction="none").reshape(layers, batch, classes)
    positive = (labels > 0).float()
    per_image = (per_row.mean(dim=0) * positive).sum(dim=-1)
    return (per_image / positive.sum(dim=-1).clamp_min(1)).mean()


def mctformer_plus_loss(model, images, labels, *, contrast_weight: float = 1.0,
                        contrast_layers: int = 12) -> LossResult:
    """MCTformer+: ``MLSM(cls_logits) + contrast_weight·R + MLSM(GRP patch logits)`` with ``R``
    the class-token contrast over the last ``contrast_layers`` blocks (``num_cct = 12``;
    all blocks when the model has fewer)."""
    collected = []
    hooks = [block.register_forward_hook(
        lambda _module, _inputs, output: collected.append(output[:, :model.num_classes]))
        for block in model.blocks[-contrast_layers:]]
    try:
        cls_logits, patch_logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return _terms(cls=_mlsm(cls_logits, labels),
                  contrast=contrast_weight * class_token_contrast(torch.stack(collected), labels),
                  patch=_mlsm(patch_logits, labels))


def transcam_loss(model, images, labels) -> LossResult:
    """TransCAM: ``MLSM((conv_logits + trans_logits)[:, 1:])`` — one loss on the summed logits,
    the background slot 0 ignored (train_TransCAM.py:88-94)."""
    conv_logits, trans_logits = model(images)
    return _terms(cls=_mlsm((conv_logits + trans_logits)[:, 1:], labels))


def conformer_training_outputs(model, images):
    """``(conv_logits, trans_logits, M, A*)`` of a Conformer in one pass, all differentiable:
    ``M (B, K+1, h, w)`` the conv head map, ``A* = Σ_blocks mean_h A[1:, 1:]`` ``(B, P, P)``."""
    batch = images.shape[0]
    h, w = model.token_grid(*images.shape[-2:])
    stats = ops.AttentionStats.allocate(batch, 1, h * w, model.depth, patch2patch_layers="all",
                                        device=images.device)
    cnn, tokens = model.forward_features(images, stats)
    conv_map = model.conv_cls_head(cnn)
    trans_logits = model.trans_cls_head(model.trans_norm(tokens)[:, 0])
    return conv_map.mean(dim=(-2, -1)), trans_logits, conv_map, stats.patch2patch


def bnr_loss(model, images, labels) -> LossResult:
    """BNR (vit_methods.md §3.1; conformer_bnr.py:464-489, train_bnr.py:92-97, with the two
    crashing lines repaired as the reference describes)::

        M*  = A* · M                  TransCAM's CAM (gradient through A* and M)
        Ā*  = A* / L, detached        the layer-mean attention, no gradient
        ŷ   = GAP(Ā* · M*)
        L   = MLSM((conv + trans)[:, 1:]) + MLSM(ŷ[:, 1:])
    """
    conv_logits, trans_logits, conv_map, affinity = conformer_training_outputs(model, images)
    m = conv_map.float().flatten(2).transpose(1, 2)                          # (B, P, K+1)
    cam = affinity @ m                                                       # M* = A*·M
    mean_affinity = affinity.detach() / model.depth                          # Ā*
    noise_logits = (mean_affinity @ cam).mean(dim=1)                         # GAP(Ā*·M*)
    return _terms(cls=_mlsm((conv_logits + trans_logits)[:, 1:], labels),
                  bnr=_mlsm(noise_logits[:, 1:], labels))


def token_cam_loss(model, images, labels) -> LossResult:
    """Token CAM (ToCo's classification term): ``MLSM`` of the 1×1 classifier on the globally
    max-pooled final tokens (model_seg_neg.py:143-151; ToCo's other terms are not modelled)."""
    return _terms(cls=_mlsm(model(images), labels))
