"""Dense CRF (Krähenbühl & Koltun) through ``pydensecrf``, with the parameter sets used by the WSSS
repositories (run one image per process with ``wsss_fast.workers.run_in_workers``).

Reference: docs/reference/cnn_methods_postprocessing.md §3c. The library normalizes both
kernels symmetrically and runs mean field ``Q = softmax(-U + sum_k w_k K_k Q)`` from
``Q0 = softmax(-U)``; its permutohedral lattice is deterministic, so the same inputs give the same
bits (the TransCAM golden seeds are reproduced pixel for pixel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CrfPreset:
    """One row of reference §3c.

    ``unary``: ``"labels"`` (hard labels, ``unary_from_labels`` with ``gt_prob``, label 0 a real
    class, i.e. ``zero_unsure=False``) or ``"probs"`` (``unary_from_softmax``: ``-log(clip(P,
    1e-5, 1))``, P not renormalized). ``background_power``: default α of the power background
    ``(1 - max cam)^α`` for the probs presets that build their input from CAMs.
    """

    unary: str
    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    iterations: int
    gt_prob: float | None = None
    background_power: float | None = None


CRF_PRESETS = {
    # IRN misc/imutils.py:156-170 crf_inference_label (LPCAM, ReCAM, AMN copy it; TransCAM
    # tool/imutils.py crf_inference_label has the same numbers).
    "irn": CrfPreset("labels", gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=50,
                     bilateral_srgb=5, bilateral_compat=10, iterations=10, gt_prob=0.7),
    # PSA tool/imutils.py:200-217 crf_inference (SEAM copies it); sxy are divided by the
    # scale factor. α: PSA's low-α ("la") CRF is 4, its high-α ("ha") 32 (SEAM 4/24).
    "psa": CrfPreset("probs", gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80,
                     bilateral_srgb=13, bilateral_compat=10, iterations=10,
                     background_power=4.0),
    # EDAM calls PSA's crf_inference with t=3 on [(1 - max)^1; cams].
    "edam": CrfPreset("probs", gaussian_sxy=3, gaussian_compat=3, bilateral_sxy=80,
                      bilateral_srgb=13, bilateral_compat=10, iterations=3,
                      background_power=1.0),
    # deeplab-pytorch libs/utils/crf.py with its config (final segmentation stage, softmax of
    # the network's logits, so no background power).
    "deeplab": CrfPreset("probs", gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67,
                         bilateral_srgb=3, bilateral_compat=4, iterations=10),
}


def resolve_preset(preset: str | CrfPreset, unary: str, op: str) -> CrfPreset:
    """A preset by name (or as given), checked to be of the ``unary`` kind ``op`` needs."""
    if isinstance(preset, str):
        if preset not in CRF_PRESETS:
            raise ValueError(f"{op}: unknown CRF preset {preset!r}; known: {sorted(CRF_PRESETS)}")
        preset = CRF_PRESETS[preset]
    if not isinstance(preset, CrfPreset):
        raise ValueError(f"{op}: preset must be a name or a CrfPreset, got {type(preset).__name__}")
    if preset.unary != unary:
        raise ValueError(f"{op}: needs a {unary!r} preset, got one with unary {preset.unary!r}")
    return preset


def _describe(a: np.ndarray) -> str:
    return f"shape {tuple(a.shape)}, {a.dtype}"


def _check_image(op: str, image) -> np.ndarray:
    """uint8 (H, W, 3) RGB, returned as a private C-contiguous, writable copy: pydensecrf takes
    a non-const memoryview, which rejects read-only arrays such as ``np.asarray(PIL image)``."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{op}: image must be uint8 (H, W, 3) RGB, got {_describe(image)}")
    return np.array(image, order="C", copy=True)


def _densecrf(image: np.ndarray, unary: np.ndarray, preset: CrfPreset,
              scale_factor: float) -> np.ndarray:
    """Mean-field Q, float32 (n, H, W), of the CRF with this (n, H*W) float32 unary."""
    import pydensecrf.densecrf as dcrf

    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=preset.gaussian_sxy / scale_factor, compat=preset.gaussian_compat)
    crf.addPairwiseBilateral(sxy=preset.bilateral_sxy / scale_factor, srgb=preset.bilateral_srgb,
                             rgbim=image, compat=preset.bilateral_compat)
    q = crf.inference(preset.iterations)
    return np.array(q, dtype=np.float32).reshape(unary.shape[0], height, width)


def crf_inference_label(image, labels, n_labels: int, preset: str | CrfPreset = "irn"
                        ) -> np.ndarray:
    """Refine a hard label map: labels unary (``gt_prob``), mean field, argmax of Q.

    image: uint8 (H, W, 3) RGB. labels: integer (H, W) in ``[0, n_labels)``. Returns int64
    (H, W). ``n_labels`` changes the unary of every label (``-log((1 - gt_prob)/(n - 1))`` off
    the given one), so it must be the label space the caller's reference used (IRN: 1 + present
    classes; TransCAM: 21). With ``n_labels == 1`` the answer is all zeros.
    """
    op = "crf_inference_label"
    preset = resolve_preset(preset, "labels", op)
    image = _check_image(op, image)
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{op}: labels must be an integer (H, W) array, got {_describe(labels)}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"{op}: labels {_describe(labels)} do not match image "
                         f"{_describe(image)} (H, W)")
    if int(n_labels) < 1:
        raise ValueError(f"{op}: n_labels must be >= 1, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"{op}: labels must lie in [0, {n_labels}), got values in "
                         f"[{labels.min()}, {labels.max()}]")
    if n_labels == 1:
        return np.zeros(labels.shape, np.int64)
    from pydensecrf.utils import unary_from_labels

    unary = unary_from_labels(labels, int(n_labels), gt_prob=preset.gt_prob, zero_unsure=False)
    return np.argmax(_densecrf(image, unary, preset, 1.0), axis=0)


def crf_inference_prob(image, probs, preset: str | CrfPreset = "psa", scale_factor: float = 1.0
                       ) -> np.ndarray:
    """Refine per-label scores: ``U = -log(clip(probs, 1e-5, 1))``, mean field; returns Q,
    float32 (n, H, W), a distribution over the n labels at every pixel.

    image: uint8 (H, W, 3) RGB. probs: float32/float64 (n, H, W), not necessarily normalized
    (PSA feeds ``[(1 - max)^α; cams]`` as is). ``scale_factor`` divides both kernels' ``sxy``
    (PSA's argument for CAMs computed at a reduced resolution).
    """
    op = "crf_inference_prob"
    preset = resolve_preset(preset, "probs", op)
    image = _check_image(op, image)
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.dtype not in (np.float32, np.float64):
        raise ValueError(f"{op}: probs must be float32/float64 (n, H, W), got {_describe(probs)}")
    if probs.shape[1:] != image.shape[:2] or probs.shape[0] < 1:
        raise ValueError(f"{op}: probs {_describe(probs)} do not match image {_describe(image)} "
                         "(need n >= 1 maps of the image's H, W)")
    if not scale_factor > 0:
        raise ValueError(f"{op}: scale_factor must be > 0, got {scale_factor}")
    from pydensecrf.utils import unary_from_softmax

    return _densecrf(image, unary_from_softmax(probs), preset, float(scale_factor))
