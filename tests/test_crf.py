"""Dense CRF wrappers (presets, label and probability CRFs, input checks) and the per-image
process pool."""

import dataclasses
import os

import numpy as np
import pytest

from wsss_fast.postprocess.crf import (CRF_PRESETS, CrfPreset, crf_inference_label,
                                      crf_inference_prob)
from wsss_fast.workers import JobFailure, run_in_workers

# Reference §3c table: (unary, gaussian sxy/compat, bilateral sxy/srgb/compat, iterations,
# gt_prob, background power).
EXPECTED_PRESETS = {
    "irn": ("labels", 3, 3, 50, 5, 10, 10, 0.7, None),
    "psa": ("probs", 3, 3, 80, 13, 10, 10, None, 4.0),
    "edam": ("probs", 3, 3, 80, 13, 10, 3, None, 1.0),
    "deeplab": ("probs", 1, 3, 67, 3, 4, 10, None, None),
}


def two_region_image(height=40, width=48, seed=0):
    """Dark left half, bright right half, mild noise; and the true 0/1 region map."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((height, width), np.int64)
    truth[:, width // 2:] = 1
    image = np.where(truth[..., None] == 1, 200, 40) + rng.integers(-8, 9, (height, width, 3))
    return image.astype(np.uint8), truth


def without_pairwise(preset: CrfPreset) -> CrfPreset:
    """The same unary with both pairwise weights 0: mean field then returns softmax(-U)."""
    return dataclasses.replace(preset, gaussian_compat=0, bilateral_compat=0)


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_rows_match_the_reference_table(name):
    p = CRF_PRESETS[name]
    actual = (p.unary, p.gaussian_sxy, p.gaussian_compat, p.bilateral_sxy, p.bilateral_srgb,
              p.bilateral_compat, p.iterations, p.gt_prob, p.background_power)
    assert actual == EXPECTED_PRESETS[name]


def test_label_crf_cleans_up_a_noisy_two_region_map():
    image, truth = two_region_image()
    rng = np.random.default_rng(1)
    flip = rng.random(truth.shape) < 0.25
    noisy = np.where(flip, 1 - truth, truth)
    refined = crf_inference_label(image, noisy, 2)
    assert refined.shape == truth.shape
    before, after = (noisy == truth).mean(), (refined == truth).mean()
    assert before < 0.8
    assert after > 0.98, (before, after)


def test_label_crf_without_pairwise_terms_returns_the_labels():
    # gt_prob 0.7 on the given label (label 0 included: zero_unsure=False) beats the others.
    image, _ = two_region_image(12, 10)
    labels = np.random.default_rng(2).integers(0, 5, image.shape[:2])
    out = crf_inference_label(image, labels, 5, without_pairwise(CRF_PRESETS["irn"]))
    np.testing.assert_array_equal(out, labels)


def test_label_crf_with_a_single_label_is_all_zero():
    image, _ = two_region_image(6, 7)
    out = crf_inference_label(image, np.zeros((6, 7), np.uint8), 1)
    np.testing.assert_array_equal(out, np.zeros((6, 7)))


def test_prob_crf_returns_a_distribution_per_pixel():
    image, truth = two_region_image()
    rng = np.random.default_rng(3)
    probs = rng.random((3,) + truth.shape).astype(np.float32)
    q = crf_inference_prob(image, probs, "psa")
    assert q.shape == probs.shape and q.dtype == np.float32
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)


def test_prob_crf_without_pairwise_terms_is_the_clipped_normalized_input():
    # unary_from_softmax: U = -log(clip(P, 1e-5, 1)), so softmax(-U) = clip(P) / sum clip(P).
    image, truth = two_region_image(9, 11)
    probs = np.random.default_rng(4).random((4,) + truth.shape) * 1.5
    probs[0, :3] = 0.0
    q = crf_inference_prob(image, probs, without_pairwise(CRF_PRESETS["edam"]))
    clipped = np.clip(probs, 1e-5, 1.0)
    np.testing.assert_allclose(q, clipped / clipped.sum(axis=0), rtol=1e-5, atol=1e-7)


def test_scale_factor_divides_both_spatial_widths():
    image, truth = two_region_image(20, 24)
    probs = np.random.default_rng(5).random((2,) + truth.shape).astype(np.float32)
    psa = CRF_PRESETS["psa"]
    halved = dataclasses.replace(psa, gaussian_sxy=1.5, bilateral_sxy=40)
    scaled = crf_inference_prob(image, probs, psa, scale_factor=2.0)
    np.testing.assert_array_equal(scaled, crf_inference_prob(image, probs, halved))
    assert not np.array_equal(scaled, crf_inference_prob(image, probs, psa))


def test_read_only_and_strided_images_are_accepted():
    image, truth = two_region_image(10, 12)
    strided = np.asfortranarray(image)
    strided.setflags(write=False)
    np.testing.assert_array_equal(crf_inference_label(strided, truth, 2),
                                  crf_inference_label(image, truth, 2))


@pytest.mark.parametrize("call, message", [
    (lambda img, lab: crf_inference_label(img.astype(np.float32), lab, 2), r"uint8 \(H, W, 3\)"),
    (lambda img, lab: crf_inference_label(img[..., :2], lab, 2), r"shape \(10, 12, 2\)"),
    (lambda img, lab: crf_inference_label(img, lab[:, :-1], 2),
     r"labels shape \(10, 11\), int64 do not match image shape \(10, 12, 3\)"),
    (lambda img, lab: crf_inference_label(img, lab.astype(np.float32), 2), "integer"),
    (lambda img, lab: crf_inference_label(img, lab + 1, 2), r"\[0, 2\).*\[1, 2\]"),
    (lambda img, lab: crf_inference_label(img, lab, 2, "psa"), "needs a 'labels' preset"),
    (lambda img, lab: crf_inference_label(img, lab, 2, "nope"), "unknown CRF preset 'nope'"),
    (lambda img, lab: crf_inference_prob(img, np.ones((2, 10, 11), np.float32)),
     r"probs shape \(2, 10, 11\), float32 do not match image shape \(10, 12, 3\)"),
    (lambda img, lab: crf_inference_prob(img, np.ones((2, 10, 12), np.int64)), "float32/float64"),
    (lambda img, lab: crf_inference_prob(img, np.ones((2, 10, 12)), "irn"),
     "needs a 'probs' preset"),
])
def test_bad_inputs_raise_naming_shapes_and_dtypes(call, message):
    image, truth = two_region_image(10, 12)
    with pytest.raises(ValueError, match=message):
        call(image, truth)


def crf_jobs():
    """Label CRF jobs of different sizes (so that they finish out of order), one invalid."""
    jobs = []
    for index, (height, width) in enumerate([(60, 80), (8, 9), (40, 30), (12, 50), (30, 30)]):
        image, truth = two_region_image(height, width, seed=index)
        noisy = np.where(np.random.default_rng(index).random(truth.shape) < 0.2, 1 - truth, truth)
        jobs.append((image, noisy, 2))
    jobs[3] = (jobs[3][0], jobs[3][1][:, :-1], 2)  # labels no longer match the image
    return jobs


def check_crf_results(results, jobs):
    assert len(results) == len(jobs)
    failure = results[3]
    assert isinstance(failure, JobFailure) and failure.index == 3
    assert failure.error.startswith("ValueError: crf_inference_label: labels shape (12, 49)")
    assert "Traceback" in failure.traceback
    for index in (0, 1, 2, 4):
        np.testing.assert_array_equal(results[index], crf_inference_label(*jobs[index]))


def test_run_in_workers_in_process_keeps_order_and_reports_failures():
    jobs = crf_jobs()
    check_crf_results(run_in_workers(crf_inference_label, jobs, workers=0, progress=False), jobs)


def test_run_in_workers_with_two_processes_matches_in_process():
    jobs = crf_jobs()
    # A generator: jobs may arrive lazily.
    pooled = run_in_workers(crf_inference_label, (job for job in jobs), workers=2,
                            progress=False)
    check_crf_results(pooled, jobs)


def exit_worker_if(code):
    """Kills its worker process for a non-zero code (a stand-in for a native-code crash)."""
    if code:
        os._exit(code)
    return code


def test_a_dying_worker_fails_its_job_and_the_run_goes_on():
    codes = [0, 0, 3] + [0] * 12
    results = run_in_workers(exit_worker_if, [(code,) for code in codes], workers=2,
                             progress=False)
    assert isinstance(results[2], JobFailure) and results[2].error.startswith("BrokenProcessPool")
    # Jobs in flight with the crash may fail with it; the ones after them ran in a fresh pool.
    assert results[-4:] == [0, 0, 0, 0]
    assert all(r == 0 or isinstance(r, JobFailure) for r in results)


def test_run_in_workers_rejects_negative_workers():
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        run_in_workers(abs, [(1,)], workers=-1)
