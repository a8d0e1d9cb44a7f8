"""``prototype_cam``: LPCAM's heatmap as one normalized 1×1 convolution (DESIGN §3.6).

LPCAM scores every feature ``F(x)`` by its mean cosine to the class prototypes ``P_c`` minus its
mean cosine to the context prototypes ``Q_c``, ReLU'd when ``Q_c`` is non-empty
(reference/cnn_methods_postprocessing.md §1.5). A mean of cosines against fixed vectors is linear
in the normalized feature (§1.6):

    mean_{u ∈ P_c} cos(F, u) − mean_{v ∈ Q_c} cos(F, v) = F̂ · (p̄_c − q̄_c),
    p̄_c = mean_{u ∈ P_c} u / ‖u‖,   q̄_c = mean_{v ∈ Q_c} v / ‖v‖   (0 when Q_c = ∅)

so the maps of all classes are ``conv1x1(F, W) / ‖F‖`` with ``W_c = p̄_c − q̄_c``. Norms are
clamped at 1e-8 as in ``F.cosine_similarity``. A single PyTorch GEMM is already the fast form
(upstream loops prototypes in Python over an ``h×w×D`` repeated copy each), so this op has one face.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsss_fast.ops._validate import check_same_device, check_tensor

OP = "prototype_cam"
NORM_EPS = 1e-8


def prototype_weight(class_prototypes: torch.Tensor,
                     context_prototypes: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(p̄ − q̄ (D,) float32, relu)`` for one class from its prototypes ``(n_p, D)`` and
    ``(n_q, D)``; ``relu`` is whether context prototypes exist. No class prototypes: a zero
    weight (the class's map is 0)."""
    for name, t in (("class_prototypes", class_prototypes),
                    ("context_prototypes", context_prototypes)):
        check_tensor(OP, name, t, ndim=2, dtypes=(torch.float32, torch.float16, torch.bfloat16,
                                                  torch.float64))
    if class_prototypes.shape[1] != context_prototypes.shape[1]:
        raise ValueError(f"{OP}: class and context prototypes must share D, got "
                         f"{tuple(class_prototypes.shape)} and {tuple(context_prototypes.shape)}")

    def mean_direction(prototypes: torch.Tensor) -> torch.Tensor:
        if prototypes.shape[0] == 0:
            return prototypes.new_zeros(prototypes.shape[1], dtype=torch.float32)
        p = prototypes.float()
        return (p / p.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)).mean(dim=0)

    if class_prototypes.shape[0] == 0:
        return mean_direction(class_prototypes), False
    return (mean_direction(class_prototypes) - mean_direction(context_prototypes),
            context_prototypes.shape[0] > 0)


def prototype_cam(features: torch.Tensor, weights: torch.Tensor,
                  relu: torch.Tensor) -> torch.Tensor:
    """Maps ``F̂ · W_k`` (ReLU'd where ``relu[k]``) for all classes at once.

    Args:
        features: ``(B, D, h, w)`` (or ``(D, h, w)``) backbone features, float.
        weights: ``(K, D)`` per-class weights ``p̄_c − q̄_c`` (``prototype_weight``).
        relu: ``(K,)`` bool, per class whether to ReLU.
    Returns:
        ``(B, K, h, w)`` (or ``(K, h, w)``) float32.
    """
    check_tensor(OP, "features", features)
    check_tensor(OP, "weights", weights, ndim=2)
    if not isinstance(relu, torch.Tensor) or relu.dtype != torch.bool or relu.dim() != 1:
        raise ValueError(f"{OP}: relu must be a 1-D bool tensor, got "
                         f"{relu.dtype if isinstance(relu, torch.Tensor) else type(relu)}")
    if features.dim() == 3:
        return prototype_cam(features[None], weights, relu)[0]
    if features.dim() != 4 or features.shape[1] != weights.shape[1]:
        raise ValueError(f"{OP}: expected features (B, D, h, w) and weights (K, D) with one D, "
                         f"got {tuple(features.shape)} and {tuple(weights.shape)}")
    if relu.shape[0] != weights.shape[0]:
        raise ValueError(f"{OP}: relu must have one flag per class ({weights.shape[0]}), got "
                         f"{relu.shape[0]}")
    check_same_device(OP, features=features, weights=weights, relu=relu)
    x = features.float()
    maps = F.conv2d(x, weights.float()[:, :, None, None])
    maps = maps / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return torch.where(relu[None, :, None, None], maps.clamp_min(0), maps)
