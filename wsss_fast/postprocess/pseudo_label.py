"""CAM -> pseudo-label rules of the WSSS repositories (reference: cnn_methods_postprocessing.md
§3d, vit_methods.md §2.3).

Every function takes the CAMs of the present classes only: ``cams`` (n, H, W) float with ``keys``
(n,) their 0-based foreground class indices. Label maps are uint8 with ``key + 1`` for a class,
0 for background and 255 (IGNORE_INDEX) for "not sure". The result does not depend on the order
of ``keys``: classes are taken in ascending index order, as in the references (IRN's ``keys`` come
from ``np.nonzero``, TransCAM's dicts are filled over ``range(20)``), so a tie between two
classes goes to the lower index and a tie with the background to the background.
"""

from __future__ import annotations

import numpy as np

from wsss_fast.data.classes import IGNORE_INDEX
from wsss_fast.postprocess import crf as _crf

# (fg, bg) thresholds of the confident-region labels (cam_to_ir_label) per method.
CONFIDENT_THRESHOLDS = {
    "irn": (0.30, 0.05),    # IRN run_sample.py
    "lpcam": (0.45, 0.25),  # LPCAM, VOC and COCO
    "recam": (0.35, 0.10),
    "amn": (0.45, 0.15),
}


def _describe(a: np.ndarray) -> str:
    return f"shape {tuple(a.shape)}, {a.dtype}"


def _check_cams(op: str, cams, keys) -> tuple[np.ndarray, np.ndarray]:
    """Validated float cams and int64 keys, both reordered to ascending keys."""
    cams = np.asarray(cams)
    if cams.ndim != 3 or not np.issubdtype(cams.dtype, np.floating):
        raise ValueError(f"{op}: cams must be a float (n, H, W) array, got {_describe(cams)}")
    keys = np.asarray(keys)
    if keys.ndim != 1 or keys.shape[0] != cams.shape[0]:
        raise ValueError(f"{op}: keys must be (n,) with n = {cams.shape[0]} (one per cam), got "
                         f"{_describe(keys)}")
    if keys.size and not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"{op}: keys must be integer class indices, got {_describe(keys)}")
    keys = keys.astype(np.int64)
    if keys.size and (keys.min() < 0 or keys.max() >= IGNORE_INDEX - 1):
        raise ValueError(f"{op}: keys must lie in [0, {IGNORE_INDEX - 1}) so that key + 1 is a "
                         f"label value below {IGNORE_INDEX}, got {keys.tolist()}")
    if np.unique(keys).size != keys.size:
        raise ValueError(f"{op}: keys must be distinct, got {keys.tolist()}")
    order = np.argsort(keys, kind="stable")
    if np.any(order != np.arange(keys.size)):
        cams, keys = cams[order], keys[order]
    return cams, keys


def _check_image_size(op: str, image, cams: np.ndarray) -> None:
    shape = np.shape(image)
    if len(shape) != 3 or tuple(shape[:2]) != cams.shape[1:]:
        raise ValueError(f"{op}: image of shape {tuple(shape)} does not match cams "
                         f"{_describe(cams)}: need (H, W, 3) with the cams' (H, W)")


def _label_lut(keys: np.ndarray) -> np.ndarray:
    """Position in ``[background; cams]`` -> label value: ``[0, keys + 1]``."""
    return np.concatenate([[0], keys + 1]).astype(np.uint8)


def _argmax_with_background(cams: np.ndarray, threshold: float) -> np.ndarray:
    """Position (0 = background) of ``argmax([threshold; cams])``. The plane is stored in the
    cams' dtype, as the references' ``np.pad(..., constant_values=t)`` / ``tensor[0] = t`` do,
    so comparisons against float32 CAMs use float32(threshold)."""
    plane = np.full((1,) + cams.shape[1:], threshold, dtype=cams.dtype)
    return np.argmax(np.concatenate([plane, cams]), axis=0)


def constant_background(cams, keys, threshold: float) -> np.ndarray:
    """``argmax([τ; cams])`` mapped to label values, uint8 (H, W) (IRN eval_cam, LPCAM, ReCAM,
    AMN, PSA/SEAM out_cam_pred; reference §3d.1). Ties go to the background."""
    cams, keys = _check_cams("constant_background", cams, keys)
    return _label_lut(keys)[_argmax_with_background(cams, threshold)]


def power_background(cams, alpha: float) -> np.ndarray:
    """``[(1 - max_c cam)^α; cams]``, (n + 1, H, W) in the cams' dtype (PSA/SEAM/EDAM; reference
    §3d.2). CAMs must be max-normalized (≤ 1). With no classes the background is all ones."""
    op = "power_background"
    cams = np.asarray(cams)
    if cams.ndim != 3 or not np.issubdtype(cams.dtype, np.floating):
        raise ValueError(f"{op}: cams must be a float (n, H, W) array, got {_describe(cams)}")
    if not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"{op}: alpha must be finite and >= 0, got {alpha}")
    if cams.shape[0] == 0:
        return np.ones((1,) + cams.shape[1:], cams.dtype)
    peak = cams.max(axis=0, keepdims=True)
    if peak.max() > 1:
        raise ValueError(f"{op}: cams must be <= 1 (max-normalized), got a maximum of "
                         f"{peak.max()}")
    return np.concatenate([np.power(1 - peak, alpha), cams])


def confident_regions(image, cams, keys, fg_threshold: float = 0.30, bg_threshold: float = 0.05,
                      crf: str | _crf.CrfPreset = "irn") -> np.ndarray:
    """IRN ``cam_to_ir_label`` (reference §3d.3): class where the CRF of the high-threshold
    (``fg_threshold``) constant-background labels says foreground, 0 where even the CRF of the
    low-threshold labels says background, 255 in between. uint8 (H, W).

    The CRFs run in the compact label space ``[background, present classes]`` (n_labels =
    1 + n), as IRN does. Thresholds per method: ``CONFIDENT_THRESHOLDS`` (defaults: IRN). No
    present class: all background (IRN's COCO rule).
    """
    op = "confident_regions"
    cams, keys = _check_cams(op, cams, keys)
    _check_image_size(op, image, cams)
    if fg_threshold < bg_threshold:
        raise ValueError(f"{op}: fg_threshold ({fg_threshold}) must be >= bg_threshold "
                         f"({bg_threshold})")
    if keys.size == 0:
        return np.zeros(cams.shape[1:], np.uint8)
    lut = _label_lut(keys)
    n_labels = 1 + keys.size
    fg = lut[_crf.crf_inference_label(image, _argmax_with_background(cams, fg_threshold),
                                      n_labels, crf)]
    bg = lut[_crf.crf_inference_label(image, _argmax_with_background(cams, bg_threshold),
                                      n_labels, crf)]
    label = fg.copy()
    label[fg == 0] = IGNORE_INDEX
    label[(fg == 0) & (bg == 0)] = 0
    return label


def crf_seed(image, cams, keys, threshold: float, crf: str | _crf.CrfPreset = "irn",
             num_classes: int = 20) -> np.ndarray:
    """TransCAM / PSA-style CRF seed: ``argmax([τ; cams])`` -> ``crf_inference_label`` ->
    uint8 label values (TransCAM infer_TransCAM.py:84-98; reference vit_methods.md §2.3).

    Reproduces the official TransCAM seeds bit for bit. What matters (measured on the three
    golden images at τ = 0.60 and 0.25):
    * the CRF runs over the full label space, ``n_labels = num_classes + 1`` (TransCAM's
      ``crf_inference_label`` default 21) on the label values themselves. IRN's compact
      ``1 + n`` space changes every off-label unary ``-log(0.3 / (n_labels - 1))`` and 755-4584
      pixels of five of the six seeds;
    * the image in RGB order (``np.asarray(Image.open(path))``): BGR changes 54-245 pixels of
      five of the six seeds (OpenCV's decoder, flipped to RGB, gave identical pixels here);
    * the CAMs' order does not matter (sorted by key here), nor did storing τ in float32 as
      upstream does (kept anyway, see ``_argmax_with_background``).
    Absent classes are zero planes upstream; for τ ≥ 0 they never win (ties go to the
    background), which is why only the present classes are needed — and why τ < 0 is refused.
    """
    op = "crf_seed"
    cams, keys = _check_cams(op, cams, keys)
    _check_image_size(op, image, cams)
    if not threshold >= 0:
        raise ValueError(f"{op}: threshold must be >= 0 (upstream's zero planes of absent "
                         f"classes would win below 0), got {threshold}")
    if keys.size and keys.max() >= num_classes:
        raise ValueError(f"{op}: keys must be < num_classes = {num_classes}, got "
                         f"{keys.tolist()}")
    labels = _label_lut(keys)[_argmax_with_background(cams, threshold)]
    return _crf.crf_inference_label(image, labels, num_classes + 1, crf).astype(np.uint8)


def power_background_crf(image, cams, keys, alpha: float | None = None,
                         crf: str | _crf.CrfPreset = "psa", scale_factor: float = 1.0
                         ) -> np.ndarray:
    """PSA ``crf_with_alpha`` / EDAM as a label map: ``crf_inference_prob`` of
    ``[(1 - max)^α; cams]`` (n_labels = 1 + n), argmax, label values; uint8 (H, W).
    ``alpha=None`` takes the preset's ``background_power`` (psa 4, edam 1)."""
    op = "power_background_crf"
    preset = _crf.resolve_preset(crf, "probs", op)
    cams, keys = _check_cams(op, cams, keys)
    _check_image_size(op, image, cams)
    if alpha is None:
        if preset.background_power is None:
            raise ValueError(f"{op}: the preset has no background_power; pass alpha")
        alpha = preset.background_power
    q = _crf.crf_inference_prob(image, power_background(cams, alpha), preset, scale_factor)
    return _label_lut(keys)[np.argmax(q, axis=0)]
