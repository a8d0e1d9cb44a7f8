"""Consistency of the data, training and evaluation stages (issue 12): label values outside
{0, 1} and unknown class names are errors, a missing (directory) image is one skip, an empty
dataset exits 1, evaluate lists the images without ground truth, and the training state is read,
written and resumed safely (unreadable states, nothing to resume, torn pairs, a full disk)."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_fast.cli import main
from wsss_fast.data import (EmptyDataset, FolderDataset, image_loader, open_dataset,
                            read_labels_file)
from wsss_fast.data.dataset import require_images
from wsss_fast.data.images import read_label_png, write_label_png
from wsss_fast.data.synthetic import generate_synthetic
from wsss_fast.io import atomic
from wsss_fast.io.checksums import file_checksum
from wsss_fast.models.checkpoint import read_torch_file
from wsss_fast.pipeline import EvaluateOptions, JobSpec, NothingToDo, evaluate, run_dataset_job
from wsss_fast.pipeline.job import item_path
from wsss_fast.pipeline.options import DatasetOptions
from wsss_fast.train.data import Augmentation, TrainingImages, epoch_loader

TRAIN = ["--method", "mctformer_v2", "--max-steps", "1", "--batch-size", "4", "--crop", "64",
         "--workers", "0", "--device", "cpu", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return Path(generate_synthetic(tmp_path_factory.mktemp("synth") / "voc", num_train=8,
                                   num_val=3, image_size=(64, 64), seed=3))


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        write_label_png(str(folder / f"{name}.png"), np.zeros((8, 8), np.uint8), palette=False)
    return folder


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------ label values and names

@pytest.mark.parametrize("value", [2, -1, 0.5, float("nan")])
def test_label_values_other_than_0_and_1_are_errors_naming_file_id_and_value(tmp_path, value):
    vector = np.zeros(20, np.float32)
    vector[4] = value
    np.save(tmp_path / "l.npy", {"2008_000101": np.eye(20)[1], "2008_000102": vector},
            allow_pickle=True)
    shown = f"{value:g}"
    with pytest.raises(ValueError, match=rf"l.npy, entry '2008_000102': label value {shown} at "
                                         r"class index 4 is not 0 or 1"):
        read_labels_file(tmp_path / "l.npy")
    (tmp_path / "wide.csv").write_text(f"id,cat,dog\na,1,0\nb,0,{value}\n")
    with pytest.raises(ValueError, match=rf"wide.csv:3 \(id 'b'\): label value {shown} at class "
                                         r"index 1"):
        read_labels_file(tmp_path / "wide.csv")
    if value == value:   # JSON has no nan
        (tmp_path / "hot.json").write_text(json.dumps({"a": [0, 1, 1], "b": [value, 0, 1]}))
        with pytest.raises(ValueError, match=rf"hot.json, entry 'b': label value {shown} at "
                                             r"class index 0"):
            read_labels_file(tmp_path / "hot.json", ["x", "y", "z"])
    (tmp_path / "tokens.csv").write_text(f"a,cat\nb,{value}\n")
    with pytest.raises(ValueError, match=r"tokens.csv:2: (label value '.*' is not a class index|"
                                         r"class index 2 out of range)"):
        read_labels_file(tmp_path / "tokens.csv", ["cat", "dog"])


def test_zero_one_files_still_read(tmp_path):
    np.save(tmp_path / "l.npy", {"a": np.eye(20, dtype=np.float32)[3]}, allow_pickle=True)
    _, entries = read_labels_file(tmp_path / "l.npy")
    np.testing.assert_array_equal(entries["a"], np.eye(20)[3])
    (tmp_path / "hot.json").write_text(json.dumps({"a": [0, 1.0, True], "b": [1, 0, 0]}))
    _, entries = read_labels_file(tmp_path / "hot.json", ["x", "y", "z"])
    np.testing.assert_array_equal(entries["a"], [0, 1, 1])


def test_unknown_class_names_list_every_unknown_and_the_known_ones(tmp_path):
    (tmp_path / "shapes.csv").write_text("a,circle\nb,sqaure circle\nc,triangel\n")
    with pytest.raises(ValueError) as info:   # no class names given: only VOC's are known
        read_labels_file(tmp_path / "shapes.csv")
    message = str(info.value)
    assert "shapes.csv:1: unknown class name 'circle' and 2 more ('sqaure', 'triangel')" \
        in message
    assert "aeroplane" in message and "tvmonitor" in message and "--classes" in message
    (tmp_path / "classes.txt").write_text("circle\nsquare\ntriangle\n")
    with pytest.raises(ValueError, match=r"shapes.csv:2: unknown class name 'sqaure' and 1 more "
                                         r"\('triangel'\) \(known: circle, square, triangle\)"):
        read_labels_file(tmp_path / "shapes.csv", ["circle", "square", "triangle"])
    (tmp_path / "shapes.json").write_text(json.dumps({"a": ["circle"], "b": ["sqaure"]}))
    with pytest.raises(ValueError, match=r"entry 'b': unknown class name 'sqaure' \(known: "
                                         r"circle, square, triangle\)"):
        read_labels_file(tmp_path / "shapes.json", ["circle", "square", "triangle"])
    (tmp_path / "good.csv").write_text("a,circle\nb,square circle\n")
    names, entries = read_labels_file(tmp_path / "good.csv", ["circle", "square", "triangle"])
    np.testing.assert_array_equal(entries["b"], [1, 1, 0])
    root = _images(tmp_path / "images", ["a", "b"])
    dataset = FolderDataset(root, labels=tmp_path / "good.csv", classes=tmp_path / "classes.txt")
    assert dataset.class_names == ("circle", "square", "triangle")


# ------------------------------------------------------------ whole numbers

def test_data_and_training_apis_refuse_fractions_instead_of_rounding(tiny_root, tmp_path):
    dataset = open_dataset("voc", tiny_root, split="train")
    for arguments in (dict(crop=64.5), dict(crop=True), dict(resize_long=(60.5, 80))):
        with pytest.raises(ValueError, match="whole number"):
            Augmentation(**arguments)
    aug = Augmentation(crop=32, resize_long=(32, 48))
    with pytest.raises(ValueError, match="seed must be a whole number, got 0.5"):
        TrainingImages(dataset, aug, seed=0.5)
    images = TrainingImages(dataset, aug, seed=np.int64(1))
    with pytest.raises(ValueError, match=r"batch_size=2.5"):
        epoch_loader(images, 2.5, 0, workers=0)
    with pytest.raises(ValueError, match=r"start_batch=0.5"):
        epoch_loader(images, 2, 0, start_batch=0.5, workers=0)
    with pytest.raises(ValueError, match="workers must be an integer"):
        image_loader(dataset, dataset.ids, workers=1.5)
    for arguments, words in ((dict(num_train=2.5), "num_train=2.5"),
                             (dict(num_classes=2.0), "num_classes=2.0"),
                             (dict(workers=0.5), "workers=0.5"),
                             (dict(image_size=((64.5, 70), (64, 64))), "image_size")):
        with pytest.raises(ValueError, match=words):
            generate_synthetic(tmp_path / "synth", **{"num_train": 2, "num_val": 1,
                                                      **arguments})
    assert not (tmp_path / "synth").exists()


# ------------------------------------------------------------ one skip, empty datasets

def test_a_directory_where_an_image_should_be_is_one_skip(tiny_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(tiny_root, root)
    first = open_dataset("voc", root, split="val").ids[0]
    image = root / "JPEGImages" / f"{first}.jpg"
    image.unlink()
    image.mkdir()
    dataset = open_dataset("voc", root, split="val")
    assert first not in dataset.ids
    assert [id for id, _ in dataset.problems()] == [first]   # not also its labels entry

    def setup(dataset, context):
        def work(todo, state):
            for item in todo:
                path = item_path(tmp_path / "out" / "files", item, ".txt")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(item)
                state.record_done(item, {"file": path})
        return JobSpec(config={"stage": "ids"}, work=work,
                       outputs=lambda item: {"file": item_path(tmp_path / "out" / "files", item,
                                                               ".txt")})

    result = run_dataset_job("ids", DatasetOptions(data=str(root), split="val"), tmp_path / "out",
                             setup)
    assert result.manifest["counts"]["skipped"] == 1
    assert [item["id"] for item in result.manifest["skipped"]] == [first]


def test_empty_dataset_exits_1_for_every_dataset_stage(tiny_root, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "cams").mkdir()
    with pytest.raises(EmptyDataset, match="has no images \\(none found\\)"):
        require_images(open_dataset("folder", empty))
    stages = {
        "extract": ["--model", "mctformer_v2_tiny", "--random-init", "--out", str(tmp_path / "x")],
        "pseudo-label": ["--cams", str(tmp_path / "cams"), "--out", str(tmp_path / "p")],
        "refine": ["--cams", str(tmp_path / "cams"), "--out", str(tmp_path / "r")],
        "evaluate": ["--cams", str(tmp_path / "cams")],
        "train": [*TRAIN[:2], "--out", str(tmp_path / "t"), "--split",
                  str(tmp_path / "none.txt")],
    }
    (tmp_path / "none.txt").write_text("")
    for command, args in stages.items():
        assert main([command, "--data", str(empty), *args]) == 1, command
        line = _one_line(capsys)
        assert "nothing to do" in line and "has no images (none found)" in line, line
    # every id dropped at indexing: a split whose images are all missing
    (tmp_path / "ghosts.txt").write_text("ghost_1\nghost_2\n")
    assert main(["evaluate", "--data", str(tiny_root), "--split", str(tmp_path / "ghosts.txt"),
                 "--cams", str(tmp_path / "cams")]) == 1
    line = _one_line(capsys)
    assert "all 2 found were dropped at indexing (ghost_1: listed in the split" in line
    # labelled images but none with image-level labels: nothing to train on
    (tmp_path / "labels.csv").write_text("id,labels\n")
    root = _images(tmp_path / "unlabelled", ["a", "b"])
    (tmp_path / "both.txt").write_text("a\nb\n")
    assert main(["train", "--data", str(root), "--labels", str(tmp_path / "labels.csv"),
                 "--split", str(tmp_path / "both.txt"), *TRAIN[:2], "--out",
                 str(tmp_path / "t2")]) == 1
    assert "nothing to train on" in _one_line(capsys)


def test_evaluate_lists_images_without_ground_truth(tiny_root, tmp_path, capsys):
    root = tmp_path / "voc"
    shutil.copytree(tiny_root, root)
    ids = open_dataset("voc", root, split="val").ids
    pred = tmp_path / "pred"
    pred.mkdir()
    for id in ids:
        gt = open_dataset("voc", root, split="val").sample(id).gt_path
        write_label_png(str(pred / f"{id}.png"), read_label_png(gt))
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        for id in ids[1:]:
            (root / folder / f"{id}.png").unlink()
    result = evaluate(EvaluateOptions(data=str(root), split="val", pred=str(pred), workers=0,
                                      out=str(tmp_path / "eval")))
    assert result.images == 1 and result.no_ground_truth == ids[1:]
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["no_ground_truth"] == ids[1:] and saved["images"] == 1
    assert main(["evaluate", "--data", str(root), "--split", "val", "--pred", str(pred),
                 "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{len(ids) - 1} images without ground truth were left out" in err
    assert ", ".join(ids[1:]) in err
    empty = tmp_path / "nopred"
    empty.mkdir()
    with pytest.raises(NothingToDo, match="all 1 images with ground truth were skipped"):
        evaluate(EvaluateOptions(data=str(root), split="val", pred=str(empty), workers=0))
    for folder in ("SegmentationClass", "SegmentationClassAug"):
        (root / folder / f"{ids[0]}.png").unlink(missing_ok=True)
    with pytest.raises(NothingToDo, match=f"none of the {len(ids)} images .* has a ground-truth"):
        evaluate(EvaluateOptions(data=str(root), split="val", pred=str(pred), workers=0))


# ---------------------------------------------------------------------- training state

def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *TRAIN, *extra])


def test_resume_with_nothing_to_resume_is_an_error(tiny_root, tmp_path, capsys):
    assert _train(tiny_root, tmp_path / "new", "--resume") == 2
    line = _one_line(capsys)
    assert f"nothing to resume in {tmp_path / 'new'} (no train_state.pth)" in line
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "checkpoint.pth").write_bytes(b"x")
    assert _train(tiny_root, tmp_path / "half", "--resume") == 2
    assert "checkpoint.pth is there without its train_state.pth" in _one_line(capsys)
    assert not (tmp_path / "new").exists()


def test_unreadable_training_state_is_one_line_naming_the_file(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_root, out) == 0
    capsys.readouterr()
    state = out / "train_state.pth"
    good = state.read_bytes()
    saved = read_torch_file(state)
    cases = {
        "truncated": (good[: len(good) // 2], "truncated"),
        "empty": (b"", "empty file"),
        "not torch": (b"hello, not a torch file\n", "not a torch file"),
        "checkpoint instead": ((out / "checkpoint.pth").read_bytes(), "missing 'config'"),
        "a list": (None, "a dict was expected"),
        "wrong model": ({**saved, "model": {"w": torch.ones(2)}},
                        "training state does not fit this run"),
        "wrong config": ({**saved, "config": [1, 2]}, "'config' is a list"),
    }
    for name, (content, words) in cases.items():
        if isinstance(content, bytes):
            state.write_bytes(content)
        else:
            torch.save([1, 2] if content is None else content, state)
        assert _train(tiny_root, out, "--resume", "--max-steps", "2") == 2, name
        line = _one_line(capsys)
        assert str(state) in line and words in line, (name, line)
    state.write_bytes(good)
    assert _train(tiny_root, out, "--resume", "--max-steps", "2") == 0


class _FullFile:
    """A handle whose writes fail as on a full disk."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def test_disk_full_keeps_the_last_pair_and_a_torn_pair_resumes_cleanly(tiny_root, tmp_path,
                                                                      monkeypatch, capsys):
    out = tmp_path / "run"
    checkpoint, state = out / "checkpoint.pth", out / "train_state.pth"
    assert _train(tiny_root, out) == 0
    capsys.readouterr()
    first = {path: path.read_bytes() for path in (checkpoint, state)}
    assert read_torch_file(state)["checkpoint_blake2b"] == file_checksum(checkpoint)

    real_open = open

    def full_for_the_state(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return _FullFile(handle) if "train_state" in str(path) and "w" in mode else handle

    monkeypatch.setattr(atomic, "open", full_for_the_state, raising=False)
    assert _train(tiny_root, out, "--resume", "--max-steps", "2") == 2
    line = _one_line(capsys)
    assert f"no space left on the device while writing {state}" in line
    monkeypatch.setattr(atomic, "open", real_open, raising=False)
    assert {path: path.read_bytes() for path in (checkpoint, state)} == first   # the last pair
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # Torn pair: a newer checkpoint next to the older state (killed between the two renames).
    torch.save({"model": {"w": torch.zeros(3)}}, checkpoint)
    assert _train(tiny_root, out, "--resume") == 0          # max_steps 1: already reached
    assert "does not match" in capsys.readouterr().err
    saved = read_torch_file(state)
    assert saved["checkpoint_blake2b"] == file_checksum(checkpoint)
    weights = read_torch_file(checkpoint)["model"]
    assert set(weights) == set(saved["model"])
    assert all(torch.equal(weights[k], saved["model"][k]) for k in weights)
    assert _train(tiny_root, out, "--resume", "--max-steps", "2") == 0
    assert json.loads((out / "train.json").read_text())["steps"] == 2
