"""IRN's IRNet training (``train --method irn``) and its use by ``refine --irn-checkpoint``:
the loop's pieces, bad inputs, and the CLI pipeline end to end at tiny size."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from wsss_fast.cli import main
from wsss_fast.data.images import read_image, write_label_png
from wsss_fast.models.registry import create_model
from wsss_fast.train import irn_trainer as T

TINY_TRAIN = ["--method", "irn", "--crop", "80", "--epochs", "1", "--batch-size", "2",
              "--workers", "0", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 validation images (64-80 px), random-init CAMs, their confident-region labels."""
    root = tmp_path_factory.mktemp("irn")
    data = root / "synth"
    assert main(["synth", "--out", str(data), "--num-train", "2", "--num-val", "6",
                 "--size", "64", "80", "--seed", "5"]) == 0
    assert main(["extract", "--data", str(data), "--split", "val", "--model", "mctformer_v2",
                 "--random-init", "--model-arg", "embed_dim=32", "--model-arg", "depth=2",
                 "--model-arg", "num_heads=2", "--device", "cpu", "--out", str(root / "cams"),
                 "--workers", "0", "--quiet"]) == 0
    assert main(["pseudo-label", "--data", str(data), "--split", "val", "--cams",
                 str(root / "cams" / "cams"), "--out", str(root / "conf"), "--rule",
                 "confident", "--crf", "irn", "--workers", "0", "--quiet"]) == 0
    return root, data


def _ids(data, split="val"):
    return (data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _train(data, labels, out, *extra):
    return main(["train", "--data", str(data), "--split", "val", "--ir-labels", str(labels),
                 "--out", str(out), *TINY_TRAIN, *extra])


# ---- the loop's pieces -----------------------------------------------------------------------

def test_poly_schedule_and_upstream_momentum_quirk():
    assert T.poly_lr(0, 10, 0.1) == 0.1
    assert T.poly_lr(5, 10, 0.1) == pytest.approx(0.1 * 0.5 ** 0.9)
    net = create_model("irn_tiny")
    optimizer = T.irn_optimizer(net, 0.1, 1e-4)
    assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, 10.0]
    assert all(g["momentum"] == 1e-4 and g["weight_decay"] == 1e-4
               for g in optimizer.param_groups)   # weight decay in the momentum slot
    assert T.irn_optimizer(net, 0.1, 1e-4, momentum=0.9).param_groups[0]["momentum"] == 0.9
    edge = {id(p) for p in net.edge_layers.parameters()}
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == edge
    assert not any(p.requires_grad for p in net.resnet50.parameters())   # frozen backbone
    trained = create_model("irn_tiny", freeze_backbone=False)
    assert len(T.irn_optimizer(trained, 0.1, 1e-4).param_groups) == 3


def _disc_batch(rng, count, size=80):
    """Noisy red discs on green: normalised images (B, 3, size, size), exact labels (B, size,
    size) as confident regions (1 disc, 0 background)."""
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(count):
        cy, cx, r = rng.integers(24, 56), rng.integers(24, 56), rng.integers(12, 20)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image = np.where(inside[..., None], [220, 60, 40], [40, 120, 60]) \
            + rng.normal(0, 12, (size, size, 3))
        images.append(T._normalized(np.clip(image, 0, 255).astype(np.uint8)).transpose(2, 0, 1))
        labels.append(inside.astype(np.int64))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def test_the_demo_recipe_learns_boundaries_not_a_foreground_mask():
    # With upstream's momentum (the weight decay, 1e-4) the boundary head of the demo's IRNet
    # learned "inside an object" instead of "on its border", and every walk over it lost to its
    # seed. The synthetic recipe's optimizer must give a map that is high on the discs' border
    # ring and low inside them and in the background.
    from wsss_fast.train.methods import get_method
    recipe = get_method("irn").synthetic_train
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = create_model("irn_tiny", freeze_backbone=False)
    optimizer = T.irn_optimizer(net, recipe["lr"], recipe["weight_decay"], recipe["momentum"])
    steps, threads = 60, torch.get_num_threads()
    torch.set_num_threads(1)   # ~10 s alone; more threads crawl on a loaded machine
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = T.poly_lr(step, steps, recipe["lr"]) * group["lr_scale"]
            net.train()
            loss, _ = T.irn_batch_loss(net, *_disc_batch(rng, 8))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    images, labels = _disc_batch(rng, 16)
    with torch.no_grad():
        edge = torch.sigmoid(net(images)[0][:, 0])
    grid = labels[:, 2::4, 2::4].float()[:, None]
    grown = torch.nn.functional.max_pool2d(grid, 3, 1, 1)[:, 0]
    shrunk = -torch.nn.functional.max_pool2d(-grid, 3, 1, 1)[:, 0]
    ring, interior, background = edge[grown > shrunk], edge[shrunk > 0], edge[grown == 0]
    assert ring.mean() > 10 * interior.mean(), (ring.mean(), interior.mean())
    assert ring.mean() > 2 * background.mean(), (ring.mean(), background.mean())


def test_augmentation_keeps_image_and_label_aligned():
    image = np.zeros((60, 90, 3), np.uint8)
    image[:, :45] = 250
    label = np.zeros((60, 90), np.uint8)
    label[:, :45] = 1
    for seed in range(6):
        view, lab = T.irn_augment(image, label, 96, np.random.default_rng(seed))
        assert view.shape == (3, 96, 96) and lab.shape == (96, 96) and lab.dtype == torch.int64
        bright = view[0] > 0.5
        inside = lab != 255
        assert (lab == 1)[inside].float().mean() > 0.2
        assert (bright[lab == 1]).float().mean() > 0.9 and (bright[lab == 0]).float().mean() < 0.1
        assert torch.all(view[:, ~inside] == 0)   # the crop padding: mean colour, label unsure


def test_ir_label_checks():
    ok = np.zeros((8, 8), np.uint8)
    assert T.check_ir_label(ok, (8, 8), 3, "p") is None
    assert "differs from the image size" in T.check_ir_label(ok, (8, 9), 3, "p")
    assert "values 7 outside 0..3" in T.check_ir_label(ok + 7, (8, 8), 3, "p")
    assert "empty confident region" in T.check_ir_label(ok + 255, (8, 8), 3, "p")


def test_create_model_accepts_irn_checkpoints_with_loss_buffers():
    state = create_model("irn_tiny").state_dict()
    state.update({"path_indices0": torch.zeros(2, 3, dtype=torch.int64),
                  "disp_target": torch.zeros(1, 2, 152, 1)})
    model = create_model("irn_tiny", checkpoint=state)
    assert "disp_target" not in model.state_dict()


# ---- bad input ------------------------------------------------------------------------------

def test_bad_ir_labels_are_skipped_and_listed(tiny, tmp_path, capsys):
    root, data = tiny
    ids = _ids(data)
    labels = tmp_path / "labels"
    labels.mkdir()
    for item in ids:
        PIL.Image.open(root / "conf" / "labels" / f"{item}.png").save(labels / f"{item}.png")
    (labels / f"{ids[0]}.png").unlink()                                     # missing
    write_label_png(labels / f"{ids[1]}.png", np.zeros((10, 10), np.uint8))  # wrong size
    shape = read_image(data / "JPEGImages" / f"{ids[2]}.jpg").shape[:2]
    write_label_png(labels / f"{ids[2]}.png", np.full(shape, 40, np.uint8))  # bad values
    write_label_png(labels / f"{ids[3]}.png", np.full(shape, 255, np.uint8))  # empty
    assert _train(data, labels, tmp_path / "run") == 0
    skipped = {s["id"]: s["reason"]
               for s in json.loads((tmp_path / "run" / "train.json").read_text())["skipped"]}
    assert "no confident-region label" in skipped[ids[0]]
    assert "differs from the image size" in skipped[ids[1]]
    assert "outside 0..8" in skipped[ids[2]]
    assert "empty confident region" in skipped[ids[3]]
    assert set(skipped) == set(ids[:4])
    # Nothing usable: one line, exit 1, no checkpoint.
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert _train(data, empty, tmp_path / "none") == 1
    err = capsys.readouterr().err.strip()
    assert "nothing to train IRN on" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "upstream settings" not in line]) == 1
    assert not (tmp_path / "none" / "checkpoint.pth").exists()


def test_irn_options_are_checked(tiny, tmp_path, capsys):
    _, data = tiny
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "a"), *TINY_TRAIN]) == 2
    assert "--method irn needs --ir-labels" in capsys.readouterr().err
    assert main(["train", "--method", "token_cam", "--data", str(data), "--out",
                 str(tmp_path / "b"), "--momentum", "0.9", "--quiet"]) == 2
    assert "--momentum do(es) not apply to --method token_cam" in capsys.readouterr().err
    assert _train(data, tmp_path, tmp_path / "c", "--crop", "64") == 2
    assert "crop must be a multiple of 4 and at least 76" in capsys.readouterr().err


def test_refine_refuses_a_checkpoint_of_another_network(tiny, tmp_path, capsys):
    root, data = tiny
    other = tmp_path / "aff.pth"
    torch.save(create_model("affinitynet_tiny").state_dict(), other)
    argv = ["refine", "--data", str(data), "--split", "val", "--cams", str(root / "cams" / "cams"),
            "--out", str(tmp_path / "rw"), "--preset", "irn", "--workers", "0", "--quiet"]
    assert main([*argv, "--irn-checkpoint", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "this is an AffinityNet (PSA ResNet-38 affinity) checkpoint, not an IRN" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "rw" / "labels").exists()
    assert main([*argv, "--preset", "psa", "--irn-checkpoint", str(other)]) == 2
    assert "--irn-checkpoint feeds --preset irn" in capsys.readouterr().err
    assert main([*argv, "--irn-checkpoint", str(other), "--edges", str(tmp_path)]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_backbone_from_a_classifier_frozen_or_fine_tuned(tiny, tmp_path, capsys):
    """--backbone loads the classifier's trunk and freezes it; --init loads it and trains it with
    the heads; both report what they loaded and what they did not use (train.json, stderr)."""
    from wsss_fast.models.checkpoint import read_state_dict
    from wsss_fast.train.pretrain import PRETRAINED_DIR
    root, data = tiny
    shipped = PRETRAINED_DIR / "resnet.pt"   # resnet_cam_tiny at output stride 8
    trunk = {k[len("resnet50."):]: v for k, v in read_state_dict(shipped).items()
             if k.startswith("resnet50.")}
    for flag, frozen in (("--backbone", True), ("--init", False)):
        run = tmp_path / flag.strip("-")
        assert _train(data, root / "conf", run, flag, str(shipped)) == 0
        err = capsys.readouterr().err
        assert f"irn backbone {shipped}: loaded {len(trunk)} trunk tensors" in err
        assert "not used: classifier.weight, newly_added.0.weight" in err
        report = json.loads((run / "train.json").read_text())["init"]
        assert report == {"source": str(shipped), "frozen": frozen, "loaded": len(trunk),
                          "skipped": ["classifier.weight", "newly_added.0.weight"]}
        net = create_model("irn_tiny", checkpoint=str(run / "checkpoint.pth"))
        after = net.resnet50.state_dict()
        moved = [k for k, v in trunk.items() if not torch.equal(after[k], v)]
        if frozen:
            assert moved == []
        else:   # trained with the heads: its convolutions left the classifier's values
            assert "conv1.weight" in moved and "layer4.0.conv3.weight" in moved
    assert _train(data, root / "conf", tmp_path / "both", "--backbone", str(shipped),
                  "--init", str(shipped)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if "upstream settings" not in line]
    assert len(errors) == 1 and "--backbone FILE" in errors[0] and "not both" in errors[0]


def test_refine_crf_and_upsample_options(tiny, tmp_path, capsys):
    """refine --crf irn is the label CRF (the seed CRF's label space: background + every class)
    over the labels of the same walk without it; --upsample 2 is the library's finer-grid walk;
    both apply to --preset irn only."""
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.postprocess import random_walk as rw
    from wsss_fast.postprocess.crf import crf_inference_label
    root, data = tiny
    argv = ["refine", "--data", str(data), "--split", "val", "--cams", str(root / "cams" / "cams"),
            "--steps", "8", "--upsample", "2", "--device", "cpu", "--workers", "0", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "walk")]) == 0
    assert main([*argv, "--out", str(tmp_path / "crf"), "--crf", "irn"]) == 0
    num_classes = len((data / "classes.txt").read_text().split())
    changed = 0
    for item in _ids(data):
        image = read_image(data / "JPEGImages" / f"{item}.jpg")
        walk = np.asarray(PIL.Image.open(tmp_path / "walk" / "labels" / f"{item}.png"))
        record = load_cam_file(root / "cams" / "cams" / f"{item}.npy")
        edge = rw.image_edge_map(image, record.low_res.shape[1:])
        np.testing.assert_array_equal(walk, rw.refine_irn(record.low_res, record.keys, edge,
                                                          image.shape[:2], steps=8, upsample=2))
        expected = crf_inference_label(image, walk.astype(np.int64), num_classes + 1, "irn")
        got = np.asarray(PIL.Image.open(tmp_path / "crf" / "labels" / f"{item}.png"))
        np.testing.assert_array_equal(got, expected)
        changed += int((got != walk).any())
    assert changed, "the CRF changed no label: the comparison cannot fail"
    assert main([*argv, "--out", str(tmp_path / "psa"), "--preset", "psa"]) == 2
    assert "--upsample applies to --preset irn only" in capsys.readouterr().err
    psa = [a for a in argv if a not in ("--upsample", "2")]
    assert main([*psa, "--out", str(tmp_path / "psa"), "--preset", "psa", "--crf", "irn"]) == 2
    assert "--crf applies to --preset irn only" in capsys.readouterr().err


def test_refine_save_scores_feeds_the_evaluate_sweep_and_pseudo_label(tiny, tmp_path, capsys):
    """refine --save-scores writes the walked, normalized maps beside the labels (the labels are
    their background plane at --bg-threshold); pseudo-label --crf irn over them at τ is refine
    --crf irn --bg-threshold τ; evaluate --cams sweeps them. Resumable: a rerun redoes only an
    item missing its scores; another config in the folder and --preset psa are refused."""
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.postprocess import random_walk as rw
    root, data = tiny
    cams = root / "cams" / "cams"
    argv = ["refine", "--data", str(data), "--split", "val", "--cams", str(cams), "--steps", "8",
            "--normalize", "class", "--device", "cpu", "--workers", "0", "--quiet"]
    out = tmp_path / "walk"
    assert main([*argv, "--out", str(out), "--save-scores", "--bg-threshold", "0.3"]) == 0
    ids = _ids(data)
    nonempty = 0
    for item in ids:
        image = read_image(data / "JPEGImages" / f"{item}.jpg")
        record = load_cam_file(cams / f"{item}.npy")
        scores = load_cam_file(out / "scores" / f"{item}.npy")
        np.testing.assert_array_equal(scores.keys, record.keys)
        edge = rw.image_edge_map(image, record.low_res.shape[1:])
        expected = rw.irn_walk_scores(record.low_res, edge, image.shape[:2], steps=8,
                                      normalize="class").numpy()
        np.testing.assert_allclose(scores.high_res, expected, rtol=0, atol=1e-6)
        label = np.asarray(PIL.Image.open(out / "labels" / f"{item}.png"))
        np.testing.assert_array_equal(label, rw.irn_labels(torch.from_numpy(scores.high_res),
                                                           scores.keys, 0.3))
        nonempty += int(scores.keys.size > 0 and (label > 0).any() and (label == 0).any())
    assert nonempty, "no image has both classes and background: the checks cannot fail"
    # the protocol: the sweep over the scores, then the label CRF at a threshold
    assert main(["evaluate", "--data", str(data), "--split", "val", "--cams", str(out / "scores"),
                 "--thresholds", "0:1:0.05", "--out", str(tmp_path / "eval"),
                 "--workers", "0"]) == 0
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["images"] == len(ids) and len(report["miou_curve"]) == 20
    assert main(["pseudo-label", "--data", str(data), "--split", "val", "--cams",
                 str(out / "scores"), "--out", str(tmp_path / "pl"), "--threshold", "0.4",
                 "--crf", "irn", "--workers", "0", "--quiet"]) == 0
    assert main([*argv, "--out", str(tmp_path / "crf"), "--crf", "irn",
                 "--bg-threshold", "0.4"]) == 0
    for item in ids:
        np.testing.assert_array_equal(
            np.asarray(PIL.Image.open(tmp_path / "pl" / "labels" / f"{item}.png")),
            np.asarray(PIL.Image.open(tmp_path / "crf" / "labels" / f"{item}.png")))
    # resume: nothing to redo, then only the item whose scores are gone
    capsys.readouterr()
    again = [*argv, "--out", str(out), "--save-scores", "--bg-threshold", "0.3"]
    assert main(again) == 0
    manifest = json.loads((out / "manifest-refine.json").read_text())
    assert manifest["counts"]["already_done"] == len(ids) and manifest["counts"]["done"] == 0
    (out / "scores" / f"{ids[0]}.npy").unlink()
    assert main(again) == 0
    manifest = json.loads((out / "manifest-refine.json").read_text())
    assert manifest["counts"]["done"] == 1 and (out / "scores" / f"{ids[0]}.npy").exists()
    assert not list((out / "scores").glob("*.tmp")), "a temporary file was left behind"
    # the labels-only run's folder holds another configuration
    assert main([*argv, "--out", str(tmp_path / "crf"), "--crf", "irn", "--bg-threshold", "0.4",
                 "--save-scores"]) == 2
    assert "another configuration" in capsys.readouterr().err
    assert main([*argv[:7], "--out", str(tmp_path / "psa"), "--preset", "psa",
                 "--device", "cpu", "--workers", "0", "--save-scores"]) == 2
    assert "--save-scores applies to --preset irn only" in capsys.readouterr().err
    assert not (tmp_path / "psa").exists()


def test_refine_save_scores_run_killed_between_an_items_two_files_redoes_it(tiny, tmp_path,
                                                                             monkeypatch):
    """A label write that fails after the item's scores were published stops the run; the rerun
    redoes that item (its scores alone do not count as done) and every item ends with both."""
    import wsss_fast.data.images as images
    from wsss_fast.io.run_state import OutputNotWritable
    from wsss_fast.pipeline import RefineOptions, refine
    root, data = tiny
    options = RefineOptions(data=str(data), split="val", cams=str(root / "cams" / "cams"),
                            out=str(tmp_path / "walk"), steps=4, save_scores=True,
                            device="cpu", workers=0, quiet=True)
    real = images.write_label_png
    calls = []

    def fail_second(path, label, palette=True):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(13, "Permission denied")
        real(path, label, palette)
    monkeypatch.setattr(images, "write_label_png", fail_second)
    with pytest.raises(OutputNotWritable):
        refine(options)
    monkeypatch.setattr(images, "write_label_png", real)
    ids = _ids(data)
    assert (tmp_path / "walk" / "scores" / f"{ids[1]}.npy").exists()
    assert not (tmp_path / "walk" / "labels" / f"{ids[1]}.png").exists()
    result = refine(options)
    assert result.counts["done"] == len(ids) - 1 and result.counts["already_done"] == 1
    for item in ids:
        assert (tmp_path / "walk" / "scores" / f"{item}.npy").exists()
        assert (tmp_path / "walk" / "labels" / f"{item}.png").exists()


# ---- end to end -----------------------------------------------------------------------------

def test_cli_confident_regions_train_irn_then_refine(tiny, tmp_path):
    """confident regions → train irn (resumable, MeanShift stored) → refine with the network:
    the labels equal the Python API's walk over the network's boundary map."""
    from wsss_fast.engine.learned_affinity import IrnBoundary
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.postprocess import random_walk as rw
    root, data = tiny
    run = tmp_path / "irn"
    assert _train(data, root / "conf", run) == 0
    checkpoint = run / "checkpoint.pth"
    report = json.loads((run / "train.json").read_text())
    assert report["finished"] and report["steps"] == 3 and report["config"]["momentum"] is None
    before = checkpoint.read_bytes()
    assert _train(data, root / "conf", run, "--resume") == 0      # finished: nothing to redo
    assert checkpoint.read_bytes() == before
    # The stored displacement mean is the mean of the raw field over the padded images.
    net = create_model("irn_tiny", checkpoint=str(checkpoint), freeze_backbone=False)
    stored = net.mean_shift.running_mean.clone()
    from wsss_fast.data.factory import open_dataset
    images = T.IrLabelImages(open_dataset("voc", str(data), split="val"), root / "conf", 80)
    assert torch.allclose(T.displacement_mean(net, images, 2, "cpu"), stored, atol=1e-6)
    assert stored.abs().sum() > 0

    out = tmp_path / "rw"
    assert main(["refine", "--data", str(data), "--split", "val", "--cams",
                 str(root / "cams" / "cams"), "--out", str(out), "--preset", "irn",
                 "--irn-checkpoint", str(checkpoint), "--pad-size", "96", "--steps", "16",
                 "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    item = _ids(data)[0]
    image = read_image(data / "JPEGImages" / f"{item}.jpg")
    record = load_cam_file(root / "cams" / "cams" / f"{item}.npy")
    edge = IrnBoundary(str(checkpoint), torch.device("cpu"), 96)(image)
    assert edge.shape == record.low_res.shape[1:] and 0 <= edge.min() and edge.max() <= 1
    expected = rw.refine_irn(record.low_res, record.keys, edge, image.shape[:2], steps=16)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / "labels" / f"{item}.png")),
                                  expected)


@pytest.mark.slow
def test_cli_classifier_to_irn_refine_with_backbone(tmp_path):
    """The whole IRN pipeline: classifier → CAMs → confident regions → IRNet on the classifier's
    frozen backbone → refine, every stage through the CLI."""
    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "--num-train", "16", "--num-val", "8",
                 "--size", "80", "96", "--seed", "2"]) == 0
    assert main(["train", "--method", "irn_cam", "--data", str(data), "--out",
                 str(tmp_path / "cls"), "--crop", "80", "--epochs", "1", "--batch-size", "4",
                 "--workers", "0", "--quiet"]) == 0
    classifier = tmp_path / "cls" / "checkpoint.pth"
    assert main(["extract", "--data", str(data), "--split", "val", "--model", "resnet_cam_tiny",
                 "--checkpoint", str(classifier), "--device", "cpu", "--out",
                 str(tmp_path / "cams"), "--workers", "0", "--quiet"]) == 0
    assert main(["pseudo-label", "--data", str(data), "--split", "val", "--cams",
                 str(tmp_path / "cams" / "cams"), "--out", str(tmp_path / "conf"), "--rule",
                 "confident", "--crf", "irn", "--workers", "0", "--quiet"]) == 0
    assert _train(data, tmp_path / "conf", tmp_path / "irn", "--backbone", str(classifier)) == 0
    assert main(["refine", "--data", str(data), "--split", "val", "--cams",
                 str(tmp_path / "cams" / "cams"), "--out", str(tmp_path / "rw"), "--preset",
                 "irn", "--irn-checkpoint", str(tmp_path / "irn" / "checkpoint.pth"),
                 "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    assert len(list((tmp_path / "rw" / "labels").glob("*.png"))) == 8
