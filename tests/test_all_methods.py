"""Every training method end to end through the CLI on a synthetic set unlike the demo's
(13 classes, non-square 80×112 images, another seed): train one short run with the method's own
small model, extract CAMs with its preset, evaluate; plus LPCAM's prototypes and extraction over
the IRN CAM classifier. Checks that nothing assumes the demo's 8 classes or image sizes."""

import json

import numpy as np
import pytest

from wsss_fast.cli import main
from wsss_fast.data.factory import open_dataset
from wsss_fast.io.cam_files import load_cam_file
from wsss_fast.train.methods import get_method, list_methods

NUM_CLASSES = 13


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unseen") / "data"
    assert main(["synth", "--out", str(root), "--num-train", "16", "--num-val", "4",
                 "--num-classes", str(NUM_CLASSES), "--size", "80", "112", "--seed", "11",
                 "--workers", "0"]) == 0
    return root


def _train_and_extract(data, out, method, extra=()):
    chosen = get_method(method)
    assert main(["train", "--method", method, "--data", str(data), "--out", str(out / "train"),
                 "--epochs", "1", "--batch-size", "8", "--crop", "64", "--workers", "0",
                 "--quiet"]) == 0
    checkpoint = out / "train" / "checkpoint.pth"
    assert main(["extract", "--data", str(data), "--split", "val", "--model", chosen.model,
                 "--checkpoint", str(checkpoint), "--out", str(out / "cams"), "--workers", "0",
                 "--quiet", *extra]) == 0
    return checkpoint


def _check_cams_and_evaluate(data, out):
    dataset = open_dataset("auto", data, split="val")
    for item in dataset.ids:
        record = load_cam_file(out / "cams" / "cams" / f"{item}.npy")
        present = np.flatnonzero(dataset.sample(item).labels)
        assert sorted(record.keys.tolist()) == sorted(present.tolist())
        assert np.isfinite(record.high_res).all() and record.high_res.shape[1:] == (80, 112)
    assert main(["evaluate", "--data", str(data), "--split", "val", "--cams",
                 str(out / "cams" / "cams"), "--out", str(out / "eval")]) == 0
    report = json.loads((out / "eval" / "evaluation.json").read_text())
    assert 0.0 <= report["best_miou"] <= 1.0
    assert len(report["at_best"]["iou"]) == NUM_CLASSES + 1


# The CAM classifiers (a method with a loop of its own, AffinityNet, makes no CAMs: its end-to-end
# test is tests/test_affinitynet_training.py).
@pytest.mark.parametrize("method", [m for m in list_methods() if get_method(m).runner is None])
def test_method_trains_extracts_and_evaluates(data, tmp_path, method):
    _train_and_extract(data, tmp_path, method)
    _check_cams_and_evaluate(data, tmp_path)


def test_lpcam_over_irn_cam_classifier(data, tmp_path):
    checkpoint = _train_and_extract(data, tmp_path / "irn", "irn_cam")
    prototypes = tmp_path / "prototypes.pt"
    assert main(["prototypes", "--data", str(data), "--split", "train", "--model",
                 "resnet_cam_tiny", "--checkpoint", str(checkpoint), "--out", str(prototypes),
                 "--workers", "0", "--quiet"]) == 0
    assert main(["extract", "--data", str(data), "--split", "val", "--model", "resnet_cam_tiny",
                 "--checkpoint", str(checkpoint), "--method", "lpcam", "--prototypes",
                 str(prototypes), "--out", str(tmp_path / "cams"), "--workers", "0",
                 "--quiet"]) == 0
    _check_cams_and_evaluate(data, tmp_path)
