"""Training targets and losses of the learned affinities: IRN (boundary + displacement) and PSA's
AffinityNet (reference/affinity_networks.md §1.2-§1.4, §2.2-§2.3).

Pairs are ``(i, i + δ)`` for sources ``i`` in the source window of the grid and offsets ``δ`` of
the half disk (``wsss_fast.ops.irn_path_set``): IRN's tensors are laid out ``(…, O, S)`` in IRN's
order (base order stably sorted by path length), PSA's in the base order; ``S`` counts the window's
sources row-major. Pair masks are float32 (as upstream's loaders make them); a pair is *bg+* when
both ends are background, *fg+* when both carry the same class, *neg* when both are valid and
differ, and ignored when an end is unsure.

* IRN: ``irn_targets(ir_label)`` — the full-resolution confident-region map, nearest-sampled at
  stride 4 (pixel ``4i + 2``, PIL's choice), radius 10; ``irn_loss(edge_logits, displacement,
  targets)`` — ``((L_bg + L_fg)/2 + L_neg)/2 + (L_dfg + L_dbg)/2`` with path-max affinities
  ``a = 1 − max_{path} sigmoid(z)`` and pair displacements ``D(i) − D(i + δ)`` (target δ for fg+,
  0 for bg+), every term a batch-global normalised mean (ε = 1e-5).
* PSA: ``psa_label_scores`` — the la / ha CRF probability maps (``(1 − max cam)^α`` background,
  α 4 / 32) of one image; ``psa_label(la, ha)`` — 8×8 block means, argmax, the 255/0 rule;
  ``psa_targets(label)`` — radius-5 pair masks; ``psa_loss(affinity, targets)`` —
  ``L_bg/4 + L_fg/4 + L_neg/2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from wsss_fast.data.classes import IGNORE_INDEX
from wsss_fast.ops import irn_path_set, path_affinity, path_affinity_reference
from wsss_fast.postprocess import pseudo_label
from wsss_fast.postprocess.crf import crf_inference_prob

EPS = 1e-5                    # upstream's ε in the logs and the normalisations
IRN_RADIUS = 10               # training radius (irn step/train_irn.py)
IRN_STRIDE = 4
PSA_RADIUS = 5
PSA_STRIDE = 8
PSA_ALPHAS = (4.0, 32.0)      # la, ha background powers (psa infer_cls.py)
PSA_NO_SCORE = 1e-5           # all label scores below: outside the crop → unsure


@dataclass(frozen=True)
class PairTargets:
    """Pair masks ``(B, O, S)`` float32 and, for IRN, the displacement target ``(2, O)``
    (``δ = (dy, dx)`` per offset, float32)."""

    bg_pos: torch.Tensor
    fg_pos: torch.Tensor
    neg: torch.Tensor
    displacement: Optional[torch.Tensor] = None


def _labels_tensor(op: str, label) -> torch.Tensor:
    label = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if label.dim() == 2:
        label = label[None]
    if label.dim() != 3 or label.is_floating_point() or label.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be an integer (H, W) or (B, H, W) map, got shape "
                         f"{tuple(label.shape)} and dtype {label.dtype}")
    return label.long()


def pair_indices(h: int, w: int, radius: int, order: str,
                 device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat grid indices ``src (S,)``, ``dst (O, S)`` of the pairs on an ``h×w`` grid, offsets in
    IRN's ``order="irn"`` or the base ``order="base"`` (PSA's ``get_indices_of_pairs``)."""
    paths = irn_path_set(radius)
    src, dst = paths.pair_indices(h, w, device=device)
    if order == "base":
        dst = dst[torch.as_tensor(np.argsort(paths.base_index), device=dst.device)]
    elif order != "irn":
        raise ValueError(f"order must be 'irn' or 'base', got {order!r}")
    return src, dst


def pair_masks(label, radius: int, order: str, num_labels: Optional[int] = None) -> PairTargets:
    """bg+ / fg+ / neg masks of a label grid ``(B, h, w)`` (or ``(h, w)``).

    A label is valid when it is ``< num_labels`` (IRN: 21 on VOC), or, with ``num_labels=None``,
    when it is not ``IGNORE_INDEX`` (PSA)."""
    label = _labels_tensor("pair_masks", label)
    b, h, w = label.shape
    src, dst = pair_indices(h, w, radius, order, device=label.device)
    flat = label.reshape(b, -1)
    source = flat[:, src][:, None]                                     # (B, 1, S)
    dest = flat[:, dst.reshape(-1)].view(b, *dst.shape)                # (B, O, S)
    if num_labels is None:
        valid = (source != IGNORE_INDEX) & (dest != IGNORE_INDEX)
    else:
        valid = (source < num_labels) & (dest < num_labels)
    equal = source == dest
    return PairTargets(bg_pos=(equal & valid & (source == 0)).float(),
                       fg_pos=(equal & valid & (source > 0)).float(),
                       neg=(~equal & valid).float())


def irn_targets(ir_label, radius: int = IRN_RADIUS, num_labels: int = 21) -> PairTargets:
    """IRN's training targets from full-resolution confident-region maps ``(B, H, W)`` or
    ``(H, W)`` (ids < ``num_labels``, anything else unsure; H, W multiples of 4, e.g. the 512
    crop): stride-4 nearest sampling (pixel ``4i + 2``), pair masks in IRN's order, and the
    displacement target δ ``(2, O)`` (upstream ``disp_target``)."""
    label = _labels_tensor("irn_targets", ir_label)
    height, width = label.shape[1:]
    if height % IRN_STRIDE or width % IRN_STRIDE:
        raise ValueError(f"irn_targets: the label size {height}×{width} must be a multiple of "
                         f"{IRN_STRIDE} (IRN trains on 512 crops)")
    grid = label[:, IRN_STRIDE // 2::IRN_STRIDE, IRN_STRIDE // 2::IRN_STRIDE]
    masks = pair_masks(grid, radius, "irn", num_labels)
    offsets = torch.tensor(irn_path_set(radius).offsets, dtype=torch.float32,
                           device=label.device).t()
    return PairTargets(masks.bg_pos, masks.fg_pos, masks.neg, offsets.contiguous())


def path_max_affinity(edge: torch.Tensor, radius: int = IRN_RADIUS) -> torch.Tensor:
    """IRN's ``to_affinity``: ``a(i, i + δ) = 1 − max_{c ∈ path(δ)} edge(i + c)`` for the pairs of
    an ``(B, 1, h, w)`` or ``(B, h, w)`` boundary map: ``(B, O, S)`` in IRN's order, by the fused
    ``ops.path_affinity`` (the gradient goes to each pair's maximal cell; only that cell's index
    is kept for the backward, where upstream's gather keeps every path cell)."""
    if edge.dim() == 3:
        edge = edge[:, None]
    if edge.dim() != 4 or edge.shape[1] != 1 or not edge.is_floating_point():
        raise ValueError(f"path_max_affinity: edge must be a float (B, 1, h, w) map, got shape "
                         f"{tuple(edge.shape)} and dtype {edge.dtype}")
    if edge.dtype == torch.float64:   # the op's faces are fp32/16; fp64 (gradient checks): its
        return path_affinity_reference(edge, radius)   # specification, differentiable as is
    return path_affinity(edge, radius)


def pair_displacement(displacement: torch.Tensor, radius: int = IRN_RADIUS) -> torch.Tensor:
    """IRN's ``to_pair_displacement``: ``D(i) − D(i + δ)`` of a ``(B, 2, h, w)`` field,
    ``(B, 2, O, S)`` in IRN's order."""
    if displacement.dim() != 4 or displacement.shape[1] != 2:
        raise ValueError(f"pair_displacement: displacement must be (B, 2, h, w), got "
                         f"{tuple(displacement.shape)}")
    b, _, h, w = displacement.shape
    src, dst = irn_path_set(radius).pair_indices(h, w, device=displacement.device)
    flat = displacement.reshape(b, 2, -1)
    return flat[:, :, src][:, :, None] - flat[:, :, dst.reshape(-1)].view(b, 2, *dst.shape)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    mask = mask.to(values.dtype)   # counts and ε in the values' precision
    return (values * mask).sum() / (scale * mask.sum() + EPS)


def _affinity_terms(affinity: torch.Tensor, targets: PairTargets) -> dict:
    if affinity.shape != targets.bg_pos.shape:
        raise ValueError(f"affinities {tuple(affinity.shape)} and pair masks "
                         f"{tuple(targets.bg_pos.shape)} differ (same grid, radius and batch?)")
    positive = -torch.log(affinity + EPS)
    negative = -torch.log(1 + EPS - affinity)
    return {"bg": _masked_mean(positive, targets.bg_pos),
            "fg": _masked_mean(positive, targets.fg_pos),
            "neg": _masked_mean(negative, targets.neg)}


def irn_loss(edge_logits: torch.Tensor, displacement: torch.Tensor, targets: PairTargets,
             radius: int = IRN_RADIUS) -> tuple[torch.Tensor, dict]:
    """IRN's loss (train_irn.py) of the network outputs ``edge_logits (B, 1, h, w)`` and
    ``displacement (B, 2, h, w)`` for ``irn_targets`` of the same grid. Returns the total and
    the five terms (floats)."""
    if targets.displacement is None:
        raise ValueError("irn_loss: targets have no displacement target (use irn_targets)")
    terms = _affinity_terms(path_max_affinity(torch.sigmoid(edge_logits), radius), targets)
    pair = pair_displacement(displacement, radius)                        # (B, 2, O, S)
    target = targets.displacement.to(pair)[None, :, :, None]
    terms["disp_fg"] = _masked_mean((pair - target).abs(), targets.fg_pos[:, None], 2.0)
    terms["disp_bg"] = _masked_mean(pair.abs(), targets.bg_pos[:, None], 2.0)
    total = (((terms["bg"] + terms["fg"]) / 2 + terms["neg"]) / 2
             + (terms["disp_fg"] + terms["disp_bg"]) / 2)
    return total, {name: float(value.detach()) for name, value in terms.items()}


def psa_pairs(h: int, w: int, device: Optional[torch.device] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """PSA's radius-5 pairs on an ``h×w`` grid in its base order: ``src (S,)``, ``dst (34, S)``
    (for ``models.affinitynet.pair_affinity``)."""
    return pair_indices(h, w, PSA_RADIUS, "base", device=device)


def psa_label_scores(image, cams, keys, alphas=PSA_ALPHAS, crf="psa") -> tuple[np.ndarray, ...]:
    """PSA's la / ha label maps of one image (infer_cls.py): per α, the dense-CRF probabilities
    of ``[(1 − max_c cam)^α; cams]`` — ``(1 + n, H, W)`` float32 over [bg, the n classes in
    ascending key order].

    Args:
        image: uint8 ``(H, W, 3)`` RGB. cams: ``(n, H, W)`` max-normalised CAMs of the present
            classes, with their 0-based ``keys``.
    """
    cams = np.asarray(cams)
    keys = np.asarray(keys)
    if cams.ndim != 3 or keys.shape != (cams.shape[0],):
        raise ValueError(f"psa_label_scores: cams must be (n, H, W) with n keys, got cams "
                         f"{cams.shape} and keys {keys.shape}")
    order = np.argsort(keys, kind="stable")
    cams = cams[order]
    return tuple(crf_inference_prob(image, pseudo_label.power_background(cams, alpha), crf)
                 for alpha in alphas)


def psa_label(la, ha, stride: int = PSA_STRIDE) -> torch.Tensor:
    """PSA's affinity label (voc12/data.py) from la / ha score stacks ``(K, H, W)`` (or batched
    ``(B, K, H, W)``), after the crop: every channel averaged over ``stride × stride`` blocks (zero
    padded at the bottom/right, as ``skimage.block_reduce``), then ``label = argmax(la)``, 255
    where la says background, 0 where ha says background, 255 where every score is < 1e-5 (crop
    padding). Values are indices into the stacks; uint8 ``(B, ⌈H/s⌉, ⌈W/s⌉)``."""
    la, ha = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
              for x in (la, ha))
    if la.dim() == 3:
        la, ha = la[None], ha[None]
    if la.dim() != 4 or la.shape != ha.shape or not la.is_floating_point():
        raise ValueError(f"psa_label: la and ha must be float (K, H, W) stacks of one shape, got "
                         f"{tuple(la.shape)} and {tuple(ha.shape)}")
    height, width = la.shape[2:]
    pad = (0, -width % stride, 0, -height % stride)
    la, ha = (F.avg_pool2d(F.pad(x, pad), stride, stride) for x in (la, ha))
    no_score = torch.maximum(la.amax(dim=1), ha.amax(dim=1)) < PSA_NO_SCORE
    la_arg, ha_arg = la.argmax(dim=1), ha.argmax(dim=1)
    label = la_arg.clone()
    label[la_arg == 0] = IGNORE_INDEX
    label[ha_arg == 0] = 0
    label[no_score] = IGNORE_INDEX
    return label.to(torch.uint8)


def psa_targets(label, radius: int = PSA_RADIUS) -> PairTargets:
    """PSA's pair masks (``ExtractAffinityLabelInRadius``) of ``psa_label`` grids, base order."""
    return pair_masks(label, radius, "base", num_labels=None)


def psa_loss(affinity: torch.Tensor, targets: PairTargets) -> tuple[torch.Tensor, dict]:
    """PSA's loss (train_aff.py): ``L_bg/4 + L_fg/4 + L_neg/2`` of affinities ``(B, O, S)``."""
    terms = _affinity_terms(affinity, targets)
    total = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    return total, {name: float(value.detach()) for name, value in terms.items()}
