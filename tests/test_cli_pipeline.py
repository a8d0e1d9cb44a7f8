"""The CLI pipeline on the synthetic benchmark: synth -> extract -> pseudo-label -> evaluate,
with the evaluation checked against an independent confusion-matrix computation."""

import json

import numpy as np
import PIL.Image
import pytest

from wsss_fast.cli import main
from wsss_fast.io.cam_files import load_cam_file

MODEL = ["--model", "mctformer_v2", "--random-init", "--model-arg", "embed_dim=32",
         "--model-arg", "depth=2", "--model-arg", "num_heads=2", "--device", "cpu"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "synth"
    assert main(["synth", "--out", str(data), "--num-train", "4", "--num-val", "6",
                 "--size", "64", "80", "--seed", "3"]) == 0
    assert main(["extract", "--data", str(data), "--split", "val", *MODEL, "--out",
                 str(root / "cams"), "--workers", "0", "--quiet"]) == 0
    return root, data


def _ids(data, split="val"):
    return (data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _gt(data, item):
    return np.asarray(PIL.Image.open(data / "SegmentationClass" / f"{item}.png"))


def _independent_miou(preds, gts, num_classes):
    """IRN's rule, counted pixel by pixel without bincount."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for pred, gt in zip(preds, gts):
        for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
            if g != 255:
                conf[g, 0 if p == 255 else p] += 1
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmean(tp / union))


def test_evaluate_cams_matches_an_independent_computation(pipeline, tmp_path):
    root, data = pipeline
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--split", "val", "--cams",
                 str(root / "cams" / "cams"), "--thresholds", "0.1,0.3,0.5", "--out", str(out),
                 "--workers", "2"]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert (out / "sweep.png").stat().st_size > 0 and (out / "evaluation.md").exists()
    assert report["images"] == 6 and report["thresholds"] == [0.1, 0.3, 0.5]
    for threshold, miou in zip(report["thresholds"], report["miou_curve"]):
        preds, gts = [], []
        for item in _ids(data):
            record = load_cam_file(root / "cams" / "cams" / f"{item}.npy")
            stack = np.concatenate([np.full((1,) + record.high_res.shape[1:], threshold,
                                            np.float32), record.high_res])
            preds.append(np.concatenate([[0], record.keys + 1])[np.argmax(stack, axis=0)])
            gts.append(_gt(data, item))
        assert miou == pytest.approx(_independent_miou(preds, gts, 9), abs=1e-12)
    best = int(np.nanargmax(report["miou_curve"]))
    assert report["best_threshold"] == report["thresholds"][best]


@pytest.mark.parametrize("rule", [["--rule", "constant", "--threshold", "0.3"],
                                  ["--rule", "constant", "--threshold", "0.3", "--crf", "irn"],
                                  ["--rule", "power", "--alpha", "4", "--crf", "psa"],
                                  ["--rule", "confident", "--crf", "irn"]])
def test_pseudo_labels_then_evaluate(pipeline, tmp_path, rule):
    root, data = pipeline
    out = tmp_path / "labels"
    args = ["pseudo-label", "--data", str(data), "--split", "val", "--cams",
            str(root / "cams" / "cams"), "--out", str(out), "--workers", "2", "--quiet", *rule]
    assert main(args) == 0
    preds = [np.asarray(PIL.Image.open(out / "labels" / f"{i}.png")) for i in _ids(data)]
    gts = [_gt(data, i) for i in _ids(data)]
    for pred, gt in zip(preds, gts):
        assert pred.shape == gt.shape and pred.dtype == np.uint8
        assert set(np.unique(pred)) <= set(range(9)) | {255}
    if rule[1] == "confident":
        assert any((p == 255).any() for p in preds)
    report_dir = tmp_path / "eval"
    assert main(["evaluate", "--data", str(data), "--split", "val", "--pred",
                 str(out / "labels"), "--out", str(report_dir), "--workers", "0"]) == 0
    report = json.loads((report_dir / "evaluation.json").read_text())
    assert report["at_best"]["miou"]["nanmean"] == pytest.approx(
        _independent_miou(preds, gts, 9), abs=1e-12)
    assert main(args) == 0     # resumes: nothing redone
    manifest = json.loads((out / "manifest-pseudo-label.json").read_text())
    assert manifest["counts"]["already_done"] == 6 and manifest["counts"]["done"] == 0


def test_pseudo_label_rejects_mismatched_rule_and_crf(pipeline, tmp_path, capsys):
    root, data = pipeline
    assert main(["pseudo-label", "--data", str(data), "--cams", str(root / "cams" / "cams"),
                 "--out", str(tmp_path), "--rule", "confident", "--crf", "none"]) == 2
    assert "--rule confident runs label CRFs" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("scales=[1.0,-2]", "scales must be a non-empty list of positive numbers"),
    ("scales=abc", "scales must be a non-empty list of positive numbers"),
    ("scales=[]", "scales must be a non-empty list of positive numbers"),
    ("square_sizes=[256,0.5]", "square_sizes must be a non-empty list of positive integers"),
    ("flip=3", "flip must be true or false"),
    ("norm=softmax", "norm must be one of none, minmax, max, transcam"),
    ("merge=mean", "merge must be one of sum, max_flip"),
    ("eps=-1", "eps must be a finite number >= 0"),
    ("drop_channels=-1", "drop_channels must be an integer >= 0"),
    ("no_such_field=1", "unknown preset fields: no_such_field"),
])
def test_extract_rejects_a_bad_preset_override_before_any_image(pipeline, tmp_path, capsys,
                                                                 override, message):
    """A bad --preset-arg is one error naming the field (exit 2), not every image skipped."""
    root, data = pipeline
    out = tmp_path / "cams"
    assert main(["extract", "--data", str(data), "--split", "val", *MODEL, "--out", str(out),
                 "--workers", "0", "--quiet", "--preset-arg", override]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "cams").exists() or not any((out / "cams").iterdir())


@pytest.mark.parametrize("preset", ["irn", "psa"])
def test_refine_writes_labels_equal_to_the_python_api(pipeline, tmp_path, preset):
    from wsss_fast.pipeline.refine import image_color_features
    from wsss_fast.data.images import read_image
    from wsss_fast.postprocess import random_walk as rw
    root, data = pipeline
    out = tmp_path / "rw"
    assert main(["refine", "--data", str(data), "--split", "val", "--cams",
                 str(root / "cams" / "cams"), "--out", str(out), "--preset", preset,
                 "--steps", "16", "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    item = _ids(data)[0]
    image = read_image(data / "JPEGImages" / f"{item}.jpg")
    record = load_cam_file(root / "cams" / "cams" / f"{item}.npy")
    if preset == "irn":
        edge = rw.image_edge_map(image, record.low_res.shape[1:])
        expected = rw.refine_irn(record.low_res, record.keys, edge, image.shape[:2], steps=16)
    else:
        features = image_color_features(image, (-(-image.shape[0] // 8), -(-image.shape[1] // 8)))
        expected = rw.refine_psa(record.high_res, record.keys, features, steps=16)
    label = np.asarray(PIL.Image.open(out / "labels" / f"{item}.png"))
    np.testing.assert_array_equal(label, np.asarray(expected))
    assert set(np.unique(label)) <= {0, *(record.keys + 1).tolist()}


def test_bench_runs_every_stage(tmp_path, capsys):
    """`wsss-fast bench` times extract, both pseudo-label rules and refine on a generated set."""
    import json
    assert main(["bench", "--images", "3", "--model", "mctformer_v2_tiny", "--workers", "0",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [row["stage"].split(" ")[0] for row in report["stages"]] == [
        "extract", "pseudo-label", "pseudo-label", "refine"]
    assert all(row["images"] == 3 and row["images_per_second"] > 0 for row in report["stages"])
    assert "| extract | 3 |" in capsys.readouterr().out
