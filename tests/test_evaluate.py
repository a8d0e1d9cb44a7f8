"""Evaluation layer: confusion matrix against a per-pixel loop, the three mIoU rules on
hand-computed matrices, the one-pass threshold sweep against per-threshold argmax labels, and the
curve plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from wsss_fast.data.classes import VOC_CLASSES, with_background
from wsss_fast.evaluate import (MIOU_RULES, SEAM_THRESHOLDS, ConfusionMatrix, ThresholdSweep,
                                confusion_matrix, iou_from_confusion, miou_from_confusion,
                                plot_sweep)


@pytest.fixture
def rng(request):
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- independent references


def naive_confusion(pred, gt, num_classes, ignore_index=255):
    """Per-pixel Python loop (no bincount)."""
    conf = [[0] * num_classes for _ in range(num_classes)]
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        if g != ignore_index:
            conf[g][p] += 1
    return np.array(conf, dtype=np.int64)


def seam_style_scores(pred, gt, num_classes, ignore_index=255):
    """Per-class TP/T/P counted as SEAM/MCTformer evaluation.py does, then the three mIoU rules
    written out in plain Python."""
    counted = gt != ignore_index
    tp = [int(((gt == k) & (pred == k) & counted).sum()) for k in range(num_classes)]
    t = [int(((gt == k) & counted).sum()) for k in range(num_classes)]
    p = [int(((pred == k) & counted).sum()) for k in range(num_classes)]
    union = [t[k] + p[k] - tp[k] for k in range(num_classes)]
    defined = [tp[k] / union[k] for k in range(num_classes) if union[k] > 0]
    present = [tp[k] / union[k] for k in range(num_classes) if t[k] > 0]
    return {
        "nanmean": sum(defined) / len(defined),
        "mean": sum(tp[k] / (union[k] + 1e-10) for k in range(num_classes)) / num_classes,
        "present": sum(present) / len(present),
    }


def direct_sweep_confusions(cams, keys, gt, thresholds, num_classes):
    """The upstream recipe at every threshold: prepend a τ plane (in the CAMs' dtype), argmax,
    map through [0] + (keys + 1), confusion matrix."""
    lut = np.array([0] + [k + 1 for k in keys], dtype=np.int64)
    out = []
    for tau in thresholds:
        plane = np.full((1,) + cams.shape[1:], tau, dtype=cams.dtype)
        label = lut[np.concatenate([plane, cams]).argmax(axis=0)]
        out.append(confusion_matrix(label, gt, num_classes))
    return np.stack(out)


def random_labels(rng, shape, num_classes, ignore_fraction=0.1, dtype=np.int64):
    labels = rng.integers(0, num_classes, shape)
    labels[rng.random(shape) < ignore_fraction] = 255
    return labels.astype(dtype)


# ---------------------------------------------------------------- confusion matrix


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_confusion_matches_pixel_loop(rng, dtype):
    for num_classes, shape in [(3, (7, 5)), (21, (17, 13)), (5, (1, 40))]:
        gt = random_labels(rng, shape, num_classes, dtype=dtype)
        pred = rng.integers(0, num_classes, shape).astype(dtype)
        got = confusion_matrix(pred, gt, num_classes)
        assert got.dtype == np.int64 and got.shape == (num_classes, num_classes)
        np.testing.assert_array_equal(got, naive_confusion(pred, gt, num_classes))
        assert got.sum() == (gt != 255).sum() > 0


def test_scores_match_seam_style_counts_on_random_labels(rng):
    for _ in range(5):
        # Class 4 only predicted, class 5 only in GT, class 6 in neither: the rules disagree.
        gt = random_labels(rng, (19, 23), 6)
        gt[gt == 4] = 0
        pred = rng.integers(0, 5, gt.shape)
        matrix = ConfusionMatrix(7).update(pred, gt)
        expected = seam_style_scores(pred, gt, 7)
        for rule in MIOU_RULES:
            assert matrix.miou(rule) == pytest.approx(expected[rule], rel=1e-12), rule
        assert len({round(v, 9) for v in expected.values()}) == 3, "rules should differ here"


# Case A: class 2 in neither GT nor prediction (pred 2 sits on an ignored pixel).
CASE_A = (np.array([0, 1, 0, 1, 0, 2]), np.array([0, 0, 0, 1, 1, 255]))
# Case B: class 2 predicted once but in no GT.
CASE_B = (np.array([0, 2, 1, 1, 0]), np.array([0, 0, 1, 1, 1]))


def test_hand_case_absent_from_both():
    matrix = ConfusionMatrix(3).update(*CASE_A)
    np.testing.assert_array_equal(matrix.matrix, [[2, 1, 0], [1, 1, 0], [0, 0, 0]])
    iou = matrix.iou()
    assert iou[:2] == pytest.approx([2 / 4, 1 / 3]) and np.isnan(iou[2])
    assert matrix.miou("nanmean") == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert matrix.miou("present") == pytest.approx((1 / 2 + 1 / 3) / 2)
    # SEAM: absent class counts as 0/(0 + 1e-10) = 0 in a mean over all three classes.
    assert matrix.miou("mean") == pytest.approx((2 / (4 + 1e-10) + 1 / (3 + 1e-10)) / 3)
    # IRN: fp = 1 - gt_k/union = FP_k/union, fn = 1 - pred_k/union = FN_k/union.
    fp, fn = matrix.fp_rate(), matrix.fn_rate()
    assert fp[:2] == pytest.approx([1 / 4, 1 / 3]) and np.isnan(fp[2])
    assert fn[:2] == pytest.approx([1 / 4, 1 / 3]) and np.isnan(fn[2])
    assert matrix.pixel_accuracy() == pytest.approx(3 / 5)


def test_hand_case_predicted_only():
    matrix = ConfusionMatrix(3).update(*CASE_B)
    np.testing.assert_array_equal(matrix.matrix, [[1, 0, 1], [1, 2, 0], [0, 0, 0]])
    assert matrix.iou() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert matrix.miou("nanmean") == pytest.approx(1 / 3)
    assert matrix.miou("mean") == pytest.approx(1 / 3)
    assert matrix.miou("present") == pytest.approx(1 / 2)  # the false-positive class is dropped
    assert matrix.fp_rate() == pytest.approx([1 / 3, 0.0, 1.0])
    assert matrix.fn_rate() == pytest.approx([1 / 3, 1 / 3, 0.0])


def test_batched_scores_and_empty_matrix():
    a = confusion_matrix(*CASE_A, num_classes=3)
    b = confusion_matrix(*CASE_B, num_classes=3)
    empty = np.zeros((3, 3), np.int64)
    stack = np.stack([a, b, empty])
    for rule in MIOU_RULES:
        per_matrix = [miou_from_confusion(m, rule) for m in stack]
        np.testing.assert_array_equal(miou_from_confusion(stack, rule), per_matrix)
    assert np.isnan(miou_from_confusion(empty, "nanmean"))
    assert np.isnan(miou_from_confusion(empty, "present"))
    assert miou_from_confusion(empty, "mean") == 0.0
    assert np.isnan(iou_from_confusion(empty)).all()
    assert np.isnan(ConfusionMatrix(3).pixel_accuracy())
    with pytest.raises(ValueError, match="unknown mIoU rule 'median'"):
        miou_from_confusion(a, "median")
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\)"):
        iou_from_confusion(np.zeros((3, 4)))


def test_bad_inputs_raise_clear_errors():
    gt = np.zeros((4, 5), np.uint8)
    with pytest.raises(ValueError, match=r"pred \(4, 6\), gt \(4, 5\)"):
        confusion_matrix(np.zeros((4, 6), np.uint8), gt, 3)
    pred = gt.copy()
    pred[1, 2] = 7
    with pytest.raises(ValueError, match=r"pred holds value\(s\) 7 outside \[0, 3\)"):
        confusion_matrix(pred, gt, 3)
    bad_gt = gt.copy()
    bad_gt[0, 0] = 3
    with pytest.raises(ValueError, match=r"gt holds value\(s\) 3 outside \[0, 3\)"):
        confusion_matrix(gt, bad_gt, 3)
    with pytest.raises(ValueError, match="integer label array, got dtype float32"):
        confusion_matrix(gt.astype(np.float32), gt, 3)
    with pytest.raises(ValueError, match="positive integer"):
        confusion_matrix(gt, gt, 0)
    with pytest.raises(ValueError, match="pred_ignore_as"):
        ConfusionMatrix(3, pred_ignore_as=3)


def test_pred_ignore_index_is_an_error_unless_mapped():
    gt = np.array([[0, 1, 1, 255]])
    pred = np.array([[255, 1, 255, 255]])
    with pytest.raises(ValueError, match=r"value\(s\) 255 .*only with pred_ignore_as"):
        confusion_matrix(pred, gt, 2)
    # IRN eval_sem_seg: the 255 band counts as background.
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 2, pred_ignore_as=0),
                                  [[1, 0], [1, 1]])
    np.testing.assert_array_equal(confusion_matrix(pred, gt, 2, pred_ignore_as=1),
                                  [[0, 1], [0, 2]])


def test_accumulate_merge_and_json_round_trip(rng):
    images = [(rng.integers(0, 4, (6, 9)), random_labels(rng, (6, 9), 4)) for _ in range(4)]
    total = sum(naive_confusion(p, g, 4) for p, g in images)
    rank0, rank1 = ConfusionMatrix(4), ConfusionMatrix(4)
    for p, g in images[:3]:
        rank0.update(p, g)
    rank1.update(*images[3])
    merged = rank0 + rank1
    np.testing.assert_array_equal(merged.matrix, total)
    np.testing.assert_array_equal(rank0.merge(rank1).matrix, total)
    assert rank0.matrix.sum() + rank1.matrix.sum() == total.sum()  # inputs untouched
    with pytest.raises(ValueError, match="equal"):
        rank0 + ConfusionMatrix(5)
    with pytest.raises(ValueError, match="equal"):
        rank0 + ConfusionMatrix(4, pred_ignore_as=0)

    matrix = ConfusionMatrix(3).update(*CASE_A)
    text = json.dumps(matrix.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["iou"][2] is None and data["miou"]["nanmean"] == pytest.approx(5 / 12)
    back = ConfusionMatrix.from_dict(data)
    np.testing.assert_array_equal(back.matrix, matrix.matrix)
    assert back.matrix.dtype == np.int64
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix.from_dict({**data, "confusion": [[1, 2], [3, 4]]})
    with pytest.raises(ValueError, match="lacks"):
        ConfusionMatrix.from_dict({"num_classes": 3})


def test_table():
    matrix = ConfusionMatrix(3).update(*CASE_A)
    table = matrix.table(["background", "cat", "dog"])
    lines = table.splitlines()
    assert lines[0] == "| class | IoU (%) | FP (%) | FN (%) |"
    assert lines[2] == "| background | 50.00 | 25.00 | 25.00 |"
    assert lines[3] == "| cat | 33.33 | 33.33 | 33.33 |"
    assert lines[4] == "| dog | n/a | n/a | n/a |"
    assert lines[5] == "| **mIoU (nanmean)** | **41.67** | | |"
    assert "**27.78**" in matrix.table(["a", "b", "c"], rule="mean")
    assert "| 0 | 50.00 |" in matrix.table()
    with pytest.raises(ValueError, match="2 names for 3 classes"):
        matrix.table(["a", "b"])
    voc = ConfusionMatrix(21).table(with_background(VOC_CLASSES))
    assert "| tvmonitor | n/a |" in voc


# ---------------------------------------------------------------- threshold sweep


def test_seam_thresholds():
    assert SEAM_THRESHOLDS == tuple(i / 100.0 for i in range(60))
    assert ThresholdSweep(None, 21).thresholds.tolist() == list(SEAM_THRESHOLDS)


def test_sweep_hand_case():
    sweep = ThresholdSweep([0.2, 0.3], 6)
    cams = np.array([[[0.1, 0.2, 0.3, 0.5]]], np.float64)
    sweep.update(cams, [4], np.array([[0, 5, 5, 5]]))
    # τ=0.2 -> [0, 0, 5, 5] (0.2 ties with the plane: background); τ=0.3 -> [0, 0, 0, 5].
    conf = sweep.confusions()
    assert conf.shape == (2, 6, 6) and conf.dtype == np.int64
    assert conf[0, 0, 0] == 1 and conf[0, 5, 0] == 1 and conf[0, 5, 5] == 2
    assert conf[1, 0, 0] == 1 and conf[1, 5, 0] == 2 and conf[1, 5, 5] == 1
    assert conf.sum() == 8
    assert sweep.best() == (0.2, pytest.approx((1 / 2 + 2 / 3) / 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sweep_matches_direct_argmax_per_threshold(rng, dtype):
    num_classes, shape = 7, (23, 31)
    thresholds = np.array(SEAM_THRESHOLDS)
    sweep = ThresholdSweep(thresholds, num_classes)
    expected = np.zeros((60, num_classes, num_classes), np.int64)
    ties_with_plane = ties_between_classes = 0
    for n_present in (3, 1, 0, 6, 2):
        keys = np.sort(rng.choice(num_classes - 1, n_present, replace=False))
        # CAMs quantised to the 0.01 grid: many equal a threshold exactly, and classes tie.
        cams = (rng.integers(0, 70, (n_present,) + shape) / 100).astype(dtype)
        gt = random_labels(rng, shape, num_classes, dtype=np.uint8)  # incl. classes not in keys
        sweep.update(cams, keys, gt)
        expected += direct_sweep_confusions(cams, keys, gt, thresholds, num_classes)
        if n_present:
            peak = cams.max(axis=0)
            ties_with_plane += np.isin(peak, thresholds.astype(dtype)).sum()
            ties_between_classes += ((cams == peak).sum(axis=0) > 1).sum()
    assert ties_with_plane > 0 and ties_between_classes > 0
    np.testing.assert_array_equal(sweep.confusions(), expected)
    for rule in MIOU_RULES:
        np.testing.assert_array_equal(sweep.miou(rule), miou_from_confusion(expected, rule))
    index = int(np.argmax(sweep.miou()))
    np.testing.assert_array_equal(sweep.matrix_at(index).matrix, expected[index])


def test_sweep_custom_thresholds_unsorted_keys_and_extra_classes(rng):
    thresholds = [0.0, 0.15, 0.333, 0.5, 1.0]
    num_classes, shape = 21, (16, 12)
    sweep = ThresholdSweep(thresholds, num_classes)
    keys = np.array([14, 2, 19])  # upstream keys are sorted, but the mapping must not care
    cams = rng.random((3,) + shape).astype(np.float32)
    cams[0, :2] = np.float32(0.15)  # exact ties with a threshold and across classes
    cams[1, :2] = np.float32(0.15)
    cams[2, :2] = 0.0
    gt = np.where(rng.random(shape) < 0.5, 0, rng.choice([15, 3, 8], shape)).astype(np.uint8)
    gt[0, 0] = 255
    sweep.update(cams, keys, gt)
    np.testing.assert_array_equal(
        sweep.confusions(), direct_sweep_confusions(cams, keys, gt, thresholds, num_classes))


def test_sweep_best_is_first_maximum_and_needs_data():
    sweep = ThresholdSweep([0.1, 0.2, 0.3, 0.95], 3)
    with pytest.raises(ValueError, match="update"):
        sweep.best()
    cams = np.array([[[0.9, 0.9, 0.05]]], np.float32)
    sweep.update(cams, [0], np.array([[1, 1, 0]]))
    assert sweep.miou().tolist() == [1.0, 1.0, 1.0, pytest.approx(1 / 3 / 2)]
    assert sweep.best() == (0.1, 1.0)


def test_sweep_merge_and_json_round_trip(rng):
    thresholds = [0.1, 0.4, 0.7]
    images = [(rng.random((2, 5, 6)), [0, 3], random_labels(rng, (5, 6), 5)) for _ in range(3)]
    whole = ThresholdSweep(thresholds, 5)
    rank0, rank1 = ThresholdSweep(thresholds, 5), ThresholdSweep(thresholds, 5)
    for i, image in enumerate(images):
        whole.update(*image)
        (rank0 if i < 2 else rank1).update(*image)
    np.testing.assert_array_equal((rank0 + rank1).confusions(), whole.confusions())
    with pytest.raises(ValueError, match="equal"):
        rank0.merge(ThresholdSweep([0.1, 0.4], 5))
    data = json.loads(json.dumps(whole.to_dict(), allow_nan=False))
    assert data["best"]["nanmean"]["threshold"] == whole.best()[0]
    assert data["miou"]["present"] == pytest.approx(whole.miou("present").tolist())
    back = ThresholdSweep.from_dict(data)
    np.testing.assert_array_equal(back.confusions(), whole.confusions())
    empty = json.loads(json.dumps(ThresholdSweep(thresholds, 5).to_dict(), allow_nan=False))
    assert empty["best"]["nanmean"] is None and empty["miou"]["nanmean"] == [None] * 3


@pytest.mark.parametrize("thresholds, match", [
    ([0.3, 0.2], "sorted and unique"), ([0.2, 0.2], "sorted and unique"),
    ([-0.1, 0.5], r"\[0, 1\]"), ([0.5, 1.5], r"\[0, 1\]"), ([0.1, float("nan")], r"\[0, 1\]"),
    ([], "non-empty"), ([[0.1, 0.2]], "1-D"), (["a"], "numbers"),
])
def test_sweep_rejects_bad_thresholds(thresholds, match):
    with pytest.raises(ValueError, match=match):
        ThresholdSweep(thresholds, 21)


def test_sweep_rejects_bad_inputs():
    sweep = ThresholdSweep(None, 5)
    cams, gt = np.zeros((2, 3, 4), np.float32), np.zeros((3, 4), np.uint8)
    with pytest.raises(ValueError, match=r"floating \(n, H, W\).*shape \(3, 4\)"):
        sweep.update(np.zeros((3, 4), np.float32), [], gt)
    with pytest.raises(ValueError, match="floating.*int64"):
        sweep.update(cams.astype(np.int64), [0, 1], gt)
    with pytest.raises(ValueError, match=r"gt must be \(H, W\) = \(3, 4\).*got \(4, 3\)"):
        sweep.update(cams, [0, 1], gt.T)
    with pytest.raises(ValueError, match=r"keys must be \(2,\).*got shape \(3,\)"):
        sweep.update(cams, [0, 1, 2], gt)
    with pytest.raises(ValueError, match=r"distinct foreground classes in \[0, 4\)"):
        sweep.update(cams, [0, 4], gt)
    with pytest.raises(ValueError, match="distinct"):
        sweep.update(cams, [1, 1], gt)
    with pytest.raises(ValueError, match=r"gt holds value\(s\) 9"):
        sweep.update(cams, [0, 1], np.full((3, 4), 9, np.uint8))
    nan_cams = cams.copy()
    nan_cams[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sweep.update(nan_cams, [0, 1], gt)
    assert sweep.confusions().sum() == 0  # failed updates leave no partial counts


# ---------------------------------------------------------------- plot


def test_plot_sweep_writes_png_atomically(tmp_path):
    from PIL import Image

    path = tmp_path / "out" / "curve.png"
    thresholds = np.array(SEAM_THRESHOLDS)
    curves = {"cam": (thresholds, 0.5 - (thresholds - 0.26) ** 2),
              "lpcam": (thresholds.tolist(), np.where(thresholds < 0.1, np.nan, 0.4))}
    assert plot_sweep(curves, path, title="VOC train") == path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 480)
        image.load()
    assert os.listdir(path.parent) == ["curve.png"]
    plot_sweep({"all-nan": ([0.1, 0.2], [np.nan, np.nan])}, path)  # overwrite; no best marker
    assert os.listdir(path.parent) == ["curve.png"]


def test_plot_sweep_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "curve.png"
    path.write_bytes(b"old")

    def broken_savefig(self, handle, **kwargs):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_sweep({"cam": ([0.1, 0.2], [0.3, 0.4])}, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["curve.png"]


@pytest.mark.parametrize("curves, match", [
    ({}, "at least one"), ({"c": ([0.1, 0.2], [30.0, 40.0])}, r"fractions in \[0, 1\]"),
    ({"c": ([0.1, 0.2], [0.3])}, "one length"), ({"c": (["x"], [0.1])}, "pair"),
])
def test_plot_sweep_rejects_bad_curves(tmp_path, curves, match):
    with pytest.raises(ValueError, match=match):
        plot_sweep(curves, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_sweep_leaves_pyplot_and_backend_alone(tmp_path):
    code = ("import sys, matplotlib; before = matplotlib.rcParams._get('backend'); "
            "from wsss_fast.evaluate import plot_sweep; "
            f"plot_sweep({{'c': ([0.1, 0.2], [0.3, 0.4])}}, {str(tmp_path / 'c.png')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules; "
            "assert matplotlib.rcParams._get('backend') == before")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_pred_ignore_as_exclude_leaves_predicted_ignore_pixels_out():
    gt = np.array([[0, 1], [1, 255]])
    pred = np.array([[255, 1], [0, 1]])
    excluded = confusion_matrix(pred, gt, 2, pred_ignore_as="exclude")
    np.testing.assert_array_equal(excluded, [[0, 0], [1, 1]])
    as_background = confusion_matrix(pred, gt, 2, pred_ignore_as=0)
    np.testing.assert_array_equal(as_background, [[1, 0], [1, 1]])
    with pytest.raises(ValueError, match="pred_ignore_as must be"):
        confusion_matrix(pred, gt, 2, pred_ignore_as="drop")
