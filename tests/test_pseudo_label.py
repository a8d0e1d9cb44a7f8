"""CAM -> pseudo-label rules: hand-computed cases, IRN's confident-region merge against an
independent re-statement given the same CRF outputs, and the official TransCAM CRF seeds
reproduced pixel for pixel.

Golden: tests/data/golden/transcam: official_cam/<name>.npy (dicts
{class: H×W float32}) and official_crf_0.60 / official_crf_0.25 (label PNGs) of liruiwen/TransCAM
@4ffe693 ``infer_TransCAM.py``; see its README.
"""


import numpy as np
import pytest

from tests.golden import golden_path
from tests.test_crf import two_region_image
from wsss_fast.postprocess import crf as crf_module
from wsss_fast.postprocess.pseudo_label import (
    CONFIDENT_THRESHOLDS,
    confident_regions,
    constant_background,
    crf_seed,
    power_background,
    power_background_crf,
)

NAMES = ("2008_000101", "2008_000102", "2008_000103")


# --- constant background ------------------------------------------------------------------------

def test_constant_background_hand_computed():
    cams = np.array([[[0.1, 0.5, 0.9, 0.4]],      # key 7
                     [[0.2, 0.5, 0.3, 0.4]]],     # key 3
                    np.float32)
    # pixel 0: both below τ -> bg; 1: tie between classes -> lower index (3); 2: key 7;
    # 3: tie of both classes with τ -> background.
    out = constant_background(cams, [7, 3], 0.4)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 4, 8, 0]])


def test_constant_background_ties_use_the_float32_threshold():
    # float32(0.3) > 0.3, so a float64 comparison would call this pixel foreground; the
    # references store τ next to float32 CAMs, where it ties and the background wins.
    cams = np.full((1, 1, 2), np.float32(0.3))
    cams[0, 0, 1] = np.nextafter(np.float32(0.3), np.float32(1))
    np.testing.assert_array_equal(constant_background(cams, [0], 0.3), [[0, 1]])


def test_constant_background_with_no_classes_is_all_background():
    out = constant_background(np.zeros((0, 3, 5), np.float32), np.zeros(0, np.int64), 0.2)
    np.testing.assert_array_equal(out, np.zeros((3, 5), np.uint8))


def test_constant_background_does_not_depend_on_key_order():
    rng = np.random.default_rng(0)
    cams, keys = rng.random((4, 6, 7)).astype(np.float32), np.array([19, 0, 11, 4])
    order = np.argsort(keys)
    np.testing.assert_array_equal(constant_background(cams, keys, 0.5),
                                  constant_background(cams[order], keys[order], 0.5))


# --- power background ---------------------------------------------------------------------------

def test_power_background_hand_computed():
    cams = np.array([[[0.2, 0.5]], [[0.4, 1.0]]], np.float32)
    out = power_background(cams, 2)
    assert out.shape == (3, 1, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [[0.36, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(out[1:], cams)


def test_power_background_with_no_classes_is_one():
    np.testing.assert_array_equal(power_background(np.zeros((0, 2, 3)), 4), np.ones((1, 2, 3)))


@pytest.mark.parametrize("cams, alpha, message", [
    (np.full((1, 2, 2), 1.5), 4, "<= 1 .* maximum of 1.5"),
    (np.zeros((1, 2, 2)), -1, "alpha must be finite and >= 0"),
    (np.zeros((2, 2)), 4, r"float \(n, H, W\).*shape \(2, 2\)"),
])
def test_power_background_rejects(cams, alpha, message):
    with pytest.raises(ValueError, match=message):
        power_background(cams, alpha)


# --- confident regions (IRN cam_to_ir_label) ----------------------------------------------------

def irn_cam_to_ir_label(cams, keys, fg_thres, bg_thres, crf):
    """step/cam_to_ir_label.py:23-43 re-stated: keys ascending, padded planes, crf(labels, n)."""
    keys = np.pad(keys + 1, (1, 0), mode="constant")
    fg_cam = np.argmax(np.pad(cams, ((1, 0), (0, 0), (0, 0)), constant_values=fg_thres), axis=0)
    fg_conf = keys[crf(fg_cam, keys.shape[0])]
    bg_cam = np.argmax(np.pad(cams, ((1, 0), (0, 0), (0, 0)), constant_values=bg_thres), axis=0)
    bg_conf = keys[crf(bg_cam, keys.shape[0])]
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[bg_conf + fg_conf == 0] = 0
    return conf.astype(np.uint8)


def scrambling_crf(labels, n_labels):
    """A deterministic stand-in for the CRF that changes labels (so that fg and bg disagree in
    every combination): relabels a pixel-dependent fraction of pixels."""
    flat = np.arange(labels.size).reshape(labels.shape)
    return np.where(flat % 5 == 0, (labels + flat) % n_labels, labels)


@pytest.fixture
def fake_crf(monkeypatch):
    calls = []

    def fake(image, labels, n_labels, preset="irn"):
        assert image.shape[:2] == labels.shape
        calls.append((n_labels, preset))
        return scrambling_crf(labels, n_labels)

    monkeypatch.setattr(crf_module, "crf_inference_label", fake)
    return calls


def test_confident_regions_merge_matches_irn_given_the_same_crf(fake_crf):
    rng = np.random.default_rng(1)
    keys = np.array([14, 2, 7])
    cams = rng.random((3, 16, 20)).astype(np.float32) * 0.6
    image = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    out = confident_regions(image, cams, keys, 0.35, 0.10, crf="psa-like-name-passed-through")
    order = np.argsort(keys)
    expected = irn_cam_to_ir_label(cams[order], keys[order], 0.35, 0.10, scrambling_crf)
    np.testing.assert_array_equal(out, expected)
    assert set(np.unique(out)) == {0, 255, 3, 8, 15}
    assert fake_crf == [(4, "psa-like-name-passed-through")] * 2


def test_confident_regions_hand_computed_with_an_identity_crf(monkeypatch):
    monkeypatch.setattr(crf_module, "crf_inference_label", lambda image, labels, n, preset: labels)
    cams = np.array([[[0.5, 0.2, 0.01, 0.05]]], np.float32)   # key 6, τ_fg 0.3, τ_bg 0.05
    out = confident_regions(np.zeros((1, 4, 3), np.uint8), cams, [6])
    np.testing.assert_array_equal(out, [[7, 255, 0, 0]])   # class, unsure, bg, tie -> bg


def test_confident_regions_with_the_real_crf():
    image, truth = two_region_image()
    cams = np.where(truth == 1, 0.9, 0.02)[None].astype(np.float32)
    cams[0, :, truth.shape[1] // 2 - 3: truth.shape[1] // 2] = 0.15   # a weak band: unsure
    out = confident_regions(image, cams, [11])
    assert set(np.unique(out)) <= {0, 12, 255}
    assert (out[truth == 1] == 12).mean() > 0.99
    assert (out[:, :5] == 0).all()


def test_confident_regions_with_no_classes_is_all_background():
    out = confident_regions(np.zeros((3, 4, 3), np.uint8), np.zeros((0, 3, 4)), [])
    np.testing.assert_array_equal(out, np.zeros((3, 4), np.uint8))


def test_confident_thresholds_table():
    assert CONFIDENT_THRESHOLDS == {"irn": (0.30, 0.05), "lpcam": (0.45, 0.25),
                                    "recam": (0.35, 0.10), "amn": (0.45, 0.15)}


# --- TransCAM CRF seeds -------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0.60, 0.25])
@pytest.mark.parametrize("name", NAMES)
def test_crf_seed_reproduces_the_official_transcam_seeds(name, threshold):
    from PIL import Image

    cam_dict = np.load(golden_path("transcam", "official_cam", name + ".npy"),
                       allow_pickle=True).item()
    keys = np.array(list(cam_dict.keys()))
    cams = np.stack(list(cam_dict.values()))
    image = np.asarray(Image.open(golden_path("images", "JPEGImages", name + ".jpg"))
                       .convert("RGB"))
    golden = np.asarray(Image.open(golden_path("transcam", f"official_crf_{threshold:.2f}",
                                                name + ".png")))
    seed = crf_seed(image, cams, keys, threshold)
    assert seed.dtype == np.uint8 and seed.shape == golden.shape
    mismatched = int((seed != golden).sum())
    assert mismatched == 0, f"{mismatched} of {golden.size} pixels differ"


def test_crf_seed_runs_in_the_full_label_space(monkeypatch):
    calls = []
    monkeypatch.setattr(crf_module, "crf_inference_label",
                        lambda image, labels, n, preset: calls.append((labels.copy(), n)) or labels)
    cams = np.array([[[0.9, 0.1]], [[0.2, 0.8]]], np.float32)
    out = crf_seed(np.zeros((1, 2, 3), np.uint8), cams, [16, 4], 0.5, num_classes=80)
    np.testing.assert_array_equal(out, [[17, 5]])
    np.testing.assert_array_equal(calls[0][0], [[17, 5]])
    assert calls[0][1] == 81


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": -0.1}, "threshold must be >= 0"),
    ({"threshold": 0.5, "num_classes": 5}, r"keys must be < num_classes = 5, got \[12\]"),
])
def test_crf_seed_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        crf_seed(np.zeros((2, 2, 3), np.uint8), np.zeros((1, 2, 2), np.float32), [12], **kwargs)


# --- power background + probability CRF ---------------------------------------------------------

def test_power_background_crf_argmax_and_default_alpha(monkeypatch):
    seen = []

    def identity(image, probs, preset, scale_factor):
        seen.append((preset.iterations, scale_factor))
        return probs

    monkeypatch.setattr(crf_module, "crf_inference_prob", identity)
    # pixel 0: bg 0.7^4 = 0.24 < 0.3 (psa α=4), 0.7^1 > 0.3 (edam α=1); pixel 1: bg 0.85^α
    # beats 0.15 for α = 4 and 1, not for α = 32 (0.0055), where key 2 (0.15) wins.
    cams = np.array([[[0.3, 0.1]], [[0.2, 0.15]]], np.float32)
    image = np.zeros((1, 2, 3), np.uint8)
    np.testing.assert_array_equal(power_background_crf(image, cams, [9, 2]), [[10, 0]])
    np.testing.assert_array_equal(power_background_crf(image, cams, [9, 2], crf="edam"), [[0, 0]])
    np.testing.assert_array_equal(power_background_crf(image, cams, [9, 2], alpha=32,
                                                       crf="edam", scale_factor=2.0), [[10, 3]])
    assert seen == [(10, 1.0), (3, 1.0), (3, 2.0)]
    with pytest.raises(ValueError, match="no background_power; pass alpha"):
        power_background_crf(image, cams, [9, 2], crf="deeplab")


def test_power_background_crf_with_the_real_crf():
    image, truth = two_region_image()
    cams = np.where(truth == 1, 0.95, 0.05)[None].astype(np.float32)
    out = power_background_crf(image, cams, [0], crf="edam")
    assert out.dtype == np.uint8
    assert (out == truth).mean() > 0.99


# --- input checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: constant_background(np.zeros((2, 3)), [1, 2], 0.1), r"float \(n, H, W\).*\(2, 3\)"),
    (lambda: constant_background(np.zeros((2, 3, 4)), [1], 0.1),
     r"keys must be \(n,\) with n = 2.*shape \(1,\)"),
    (lambda: constant_background(np.zeros((1, 3, 4)), [0.5], 0.1), "integer class indices"),
    (lambda: constant_background(np.zeros((2, 3, 4)), [1, 1], 0.1), "distinct"),
    (lambda: constant_background(np.zeros((1, 3, 4)), [254], 0.1), r"\[0, 254\)"),
    (lambda: confident_regions(np.zeros((3, 5, 3), np.uint8), np.zeros((1, 3, 4)), [0]),
     r"image of shape \(3, 5, 3\) does not match cams shape \(1, 3, 4\)"),
    (lambda: confident_regions(np.zeros((3, 4, 3), np.uint8), np.zeros((1, 3, 4)), [0], 0.1, 0.2),
     "fg_threshold"),
    (lambda: crf_seed(np.zeros((3, 4), np.uint8), np.zeros((1, 3, 4)), [0], 0.5),
     r"image of shape \(3, 4\)"),
])
def test_bad_inputs_raise_naming_shapes(call, message):
    with pytest.raises(ValueError, match=message):
        call()
