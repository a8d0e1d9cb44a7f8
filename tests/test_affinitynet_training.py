"""AffinityNet (PSA) training and ``refine --preset psa --affinity-checkpoint``: the training view
and label rule against a restatement of PSA's ``VOC12AffDataset.__getitem__``, the poly schedule
against ``PolyOptimizer``, the parameter groups and momentum quirk, the loss of the loop against
``train_aff.py``'s lines, checkpoints in PSA's key layout, bad inputs, and the CLI end to end
(reference/affinity_networks.md §2.2-§2.4)."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from wsss_fast.cli import main
from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_fast.data.synthetic import generate_synthetic
from wsss_fast.io.cam_files import save_cam_file
from wsss_fast.models.affinitynet import affinitynet, affinitynet_tiny, pair_affinity
from wsss_fast.models.checkpoint import CheckpointError, CheckpointMismatch
from wsss_fast.models.irnet import irn_tiny
from wsss_fast.postprocess.psa_affinity import affinity_features, load_affinitynet
from wsss_fast.train import TrainConfig
from wsss_fast.train.affinity import psa_pairs
from wsss_fast.train.affinitynet_trainer import (PSA_TRAIN, affinitynet_loss, parameter_groups,
                                                 poly_lr, score_job, training_view)
from wsss_fast.train.config import recipe_settings
from wsss_fast.train.methods import get_method

KEYS = Path(__file__).parent / "data" / "upstream_keys" / "psa_resnet38_aff.json"


# --- restatements of upstream ------------------------------------------------------------------

def upstream_view(image, la, ha, crop, offsets, flip):
    """psa voc12/data.py VOC12AffDataset.__getitem__ (jitter off) with RandomCrop's draws given:
    offsets = (row draw, column draw) as RandomCrop's randrange values."""
    img = image.astype(np.float32)                       # np.asarray of the PIL image
    label = np.concatenate([la, ha]).transpose(1, 2, 0)  # dict values, HWC
    imgarr = np.concatenate([img, label], axis=-1)
    h, w, _ = imgarr.shape
    ch, cw = min(crop, h), min(crop, w)
    w_space, h_space = w - crop, h - crop
    top_draw, left_draw = offsets
    cont_left, img_left = (0, left_draw) if w_space > 0 else (left_draw, 0)
    cont_top, img_top = (0, top_draw) if h_space > 0 else (top_draw, 0)
    container = np.zeros((crop, crop, imgarr.shape[-1]), np.float32)
    container[cont_top:cont_top + ch, cont_left:cont_left + cw] = \
        imgarr[img_top:img_top + ch, img_left:img_left + cw]
    if flip:
        container = np.fliplr(container).copy()
    img, label = container[..., :3], container[..., 3:]
    img = (img / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    k = label.shape[-1]   # skimage.measure.block_reduce(label, (8, 8, 1), np.mean), crop % 8 == 0
    label = label.reshape(crop // 8, 8, crop // 8, 8, k).mean(axis=(1, 3))
    no_score_region = np.max(label, -1) < 1e-5
    label_la, label_ha = np.array_split(label, 2, axis=-1)
    label_la = np.argmax(label_la, axis=-1).astype(np.uint8)
    label_ha = np.argmax(label_ha, axis=-1).astype(np.uint8)
    label = label_la.copy()
    label[label_la == 0] = 255
    label[label_ha == 0] = 0
    label[no_score_region] = 255
    return img.transpose(2, 0, 1), label


class _Draws:
    """Stands in for the generator: records the crop and flip draws training_view makes."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.integers_drawn, self.flip = [], None

    def integers(self, low, high):
        value = int(self.rng.integers(low, high))
        self.integers_drawn.append(value)
        return value

    def random(self):
        self.flip = float(self.rng.random())
        return self.flip


@pytest.mark.parametrize("size,crop", [((37, 53), 32), ((70, 90), 48), ((40, 30), 48)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_view_matches_psa_dataset(size, crop, seed):
    gen = np.random.default_rng(seed + 10)
    image = gen.integers(0, 256, size + (3,), dtype=np.uint8)
    la = gen.random((3,) + size).astype(np.float32)
    ha = gen.random((3,) + size).astype(np.float32)
    la[0, : size[0] // 2] *= 3          # some confident background and foreground
    ha[0, size[0] // 2:] *= 0.1
    draws = _Draws(seed)
    view, label = training_view(image, la, ha, crop, None, draws)
    expected_view, expected_label = upstream_view(image, la, ha, crop, draws.integers_drawn,
                                                  draws.flip < 0.5)
    np.testing.assert_allclose(view.numpy(), expected_view, atol=1e-6)
    assert label.dtype == torch.uint8 and np.array_equal(label.numpy(), expected_label)
    if size[0] < crop or size[1] < crop:
        assert (expected_label == 255).any()   # the padding's no-score rule is exercised


def test_poly_lr_is_psa_poly_optimizer():
    """PolyOptimizer.step: lr = lr0·(1 − global_step/max_step)^0.9 before stepping."""
    lr0, total = 0.1, 37
    for step in range(total):
        assert poly_lr(step, total, lr0) == pytest.approx(lr0 * (1 - step / total) ** 0.9,
                                                          rel=1e-12)
    assert poly_lr(total, total, lr0) == 0.0


def test_parameter_groups_and_momentum_quirk():
    with torch.device("meta"):
        net = affinitynet()
    backbone, head, norm = parameter_groups(net, 5e-4)
    assert (backbone["lr_scale"], head["lr_scale"], norm["lr_scale"]) == (1.0, 10.0, 1.0)
    assert backbone["weight_decay"] == head["weight_decay"] == 5e-4
    assert sum(p.numel() for p in head["params"]) == 1_413_120
    assert sum(p.numel() for p in backbone["params"]) == 104_202_240
    assert norm["params"] == []          # PSA's regime: every BatchNorm frozen
    tiny = affinitynet_tiny()            # from scratch: BN trained, without weight decay
    assert parameter_groups(tiny, 5e-4)[2]["params"] and \
        parameter_groups(tiny, 5e-4)[2]["weight_decay"] == 0.0
    assert PSA_TRAIN == dict(lr=0.1, weight_decay=5e-4, batch_size=8, epochs=8)
    assert recipe_settings(None, "affinitynet") == recipe_settings(None, "mctformer_v2") == {}
    config = TrainConfig.from_recipe(None, method="affinitynet", data="d", out="o", cams="c")
    resolved = config.resolved(get_method("affinitynet"))     # PSA's settings fill the Nones
    assert (resolved.lr, resolved.weight_decay, resolved.batch_size, resolved.epochs,
            resolved.crop, resolved.momentum) == (0.1, 5e-4, 8, 8, 448, None)
    # None: momentum = weight decay, upstream's quirk


def test_loss_of_the_loop_is_train_aff(gen):
    """train_aff.py's lines on the network's affinities and ExtractAffinityLabelInRadius's
    masks (restated), against affinitynet_loss of the same label grids."""
    net = affinitynet_tiny().eval()
    images = torch.randn(2, 3, 48, 80, generator=gen)
    labels = torch.randint(0, 3, (2, 6, 10), generator=gen).to(torch.uint8)
    labels[0, :2] = 255
    loss, terms = affinitynet_loss(net, images, labels)
    with torch.no_grad():
        g = net(images)
    src, dst = psa_pairs(6, 10)
    aff = pair_affinity(g, src, dst)
    flat = labels.reshape(2, -1).long()
    la_from, la_to = flat[:, src][:, None], flat[:, dst.reshape(-1)].view(2, *dst.shape)
    valid = (la_from != 255) & (la_to != 255)
    bg = ((la_from == la_to) & (la_from == 0)).float()
    fg = ((la_from == la_to) & (la_from != 0) & valid).float()
    neg = ((la_from != la_to) & valid).float()
    bg_loss = torch.sum(-bg * torch.log(aff + 1e-5)) / (torch.sum(bg) + 1e-5)
    fg_loss = torch.sum(-fg * torch.log(aff + 1e-5)) / (torch.sum(fg) + 1e-5)
    neg_loss = torch.sum(-neg * torch.log(1. + 1e-5 - aff)) / (torch.sum(neg) + 1e-5)
    expected = bg_loss / 4 + fg_loss / 4 + neg_loss / 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert terms["neg"] == pytest.approx(float(neg_loss), rel=1e-6)
    with pytest.raises(ValueError, match="feature grid"):
        affinitynet_loss(net, images, labels[:, :5])


def test_features_are_psa_inference_padding(gen):
    """infer_aff.py: normalize, zero-pad the normalized image to a multiple of 8, forward."""
    net = affinitynet_tiny().eval()
    image = np.random.default_rng(0).integers(0, 256, (21, 30, 3), dtype=np.uint8)
    other = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    features = affinity_features(net, [image, other, image])
    x = (image / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    x = F.pad(torch.from_numpy(x.transpose(2, 0, 1)).float()[None], (0, 2, 0, 3))
    with torch.no_grad():
        expected = net(x)[0].numpy()
    assert features[0].shape == (112, 3, 4) and features[1].shape == (112, 2, 2)
    np.testing.assert_allclose(features[0], expected, atol=1e-5)
    np.testing.assert_allclose(features[2], expected, atol=1e-5)


def test_checkpoints_identified_by_their_keys(tmp_path):
    torch.save(irn_tiny().state_dict(), tmp_path / "irn.pth")
    with pytest.raises(CheckpointError, match="looks like an IRN checkpoint"):
        load_affinitynet(tmp_path / "irn.pth")
    with pytest.raises(CheckpointMismatch, match="not a ResNet-38: it looks like an IRN"):
        affinitynet_tiny().load_backbone(tmp_path / "irn.pth")
    torch.save(affinitynet_tiny(width=16).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointMismatch, match="width/blocks"):
        affinitynet_tiny().load_backbone(tmp_path / "wide.pth")
    tiny = affinitynet_tiny()
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    assert isinstance(load_affinitynet(tmp_path / "tiny.pth"), torch.nn.Module)


def test_backbone_from_an_edam_classifier(tmp_path):
    from wsss_fast.models.registry import create_model
    edam = create_model("edam_tiny", num_classes=5)
    torch.save(edam.state_dict(), tmp_path / "edam.pth")
    net = affinitynet_tiny()
    copied = net.load_backbone(tmp_path / "edam.pth")
    assert copied > 0 and torch.equal(net.conv1a.weight, edam.conv1a.weight)
    assert torch.equal(net.b5.conv_branch2a.weight, edam.b5.conv_branch2a.weight)


def test_backbone_dilation_problems_read_the_backbone_run(tmp_path):
    from wsss_fast.train.affinitynet_trainer import backbone_dilation_problems
    checkpoint = tmp_path / "checkpoint.pth"
    assert backbone_dilation_problems(checkpoint, "affinitynet_tiny") == []   # no train.json
    (tmp_path / "train.json").write_text('{"config": {"model": "affinitynet_tiny"}}')
    assert backbone_dilation_problems(checkpoint, "affinitynet_tiny") == []   # same dilations
    (tmp_path / "train.json").write_text('{"config": {"model": "edam_tiny"}}')
    [problem] = backbone_dilation_problems(checkpoint, "affinitynet_tiny")
    assert "edam_tiny" in problem and "(1, 1, 1)" in problem and "(2, 4, 4)" in problem


# --- la / ha scores and bad inputs -------------------------------------------------------------

def _write_image(path, array):
    PIL.Image.fromarray(array).save(path)


def test_score_job_bad_inputs(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    _write_image(tmp_path / "a.png", image)
    cam = np.zeros((1, 24, 32), np.float32)
    cam[0, 4:20, 4:28] = 1.0
    out = tmp_path / "a.npz"
    assert "no CAM file" in score_job(str(tmp_path / "a.png"), str(tmp_path / "x.npy"),
                                      str(out), (4, 32))
    save_cam_file(tmp_path / "small.npy", [2], cam[:, :20], fmt="mctformer")
    assert "differs from the image size" in score_job(str(tmp_path / "a.png"),
                                                      str(tmp_path / "small.npy"), str(out),
                                                      (4, 32))
    save_cam_file(tmp_path / "big.npy", [2], cam * 3, fmt="mctformer")
    assert "max-normalized" in score_job(str(tmp_path / "a.png"), str(tmp_path / "big.npy"),
                                         str(out), (4, 32))
    flat = np.full((1, 24, 32), 0.2, np.float32)   # la: (0.8)^4 > 0.2, ha: (0.8)^32 < 0.2
    save_cam_file(tmp_path / "flat.npy", [2], flat, fmt="mctformer")
    assert "empty region" in score_job(str(tmp_path / "a.png"), str(tmp_path / "flat.npy"),
                                       str(out), (4, 32))
    assert not out.exists()
    save_cam_file(tmp_path / "good.npy", [2], cam, fmt="mctformer")
    assert score_job(str(tmp_path / "a.png"), str(tmp_path / "good.npy"), str(out),
                     (4, 32)) is None
    with np.load(out) as scores:
        assert scores["la"].shape == scores["ha"].shape == (2, 24, 32)


# --- the CLI end to end ------------------------------------------------------------------------

def _gt_cams(data: Path, split: str, out: Path) -> None:
    """CAMs from the ground truth: each present class's mask blurred (a good, imperfect seed)."""
    out.mkdir(parents=True)
    for item in (data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
        gt = np.asarray(PIL.Image.open(data / "SegmentationClass" / f"{item}.png"))
        keys = sorted(int(v) - 1 for v in np.unique(gt) if 0 < v < 255)
        maps = []
        for key in keys:
            mask = torch.from_numpy((gt == key + 1).astype(np.float32))[None, None]
            blurred = F.avg_pool2d(mask, 9, 1, 4, count_include_pad=False)[0, 0].numpy()
            maps.append(blurred / max(blurred.max(), 1e-6))
        maps = np.stack(maps) if maps else np.zeros((0,) + gt.shape, np.float32)
        save_cam_file(out / f"{item}.npy", keys, maps.astype(np.float32), fmt="mctformer")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("psa")
    data = root / "data"
    generate_synthetic(data, num_train=6, num_val=3, image_size=(64, 80), seed=5)
    _gt_cams(data, "train", root / "cams_train")
    _gt_cams(data, "val", root / "cams_val")
    return root, data


def _train_args(root, data, out, *extra):
    return ["train", "--method", "affinitynet", "--data", str(data), "--split", "train",
            "--cams", str(root / "cams_train"), "--out", str(out), "--crop", "72",
            "--batch-size", "3", "--epochs", "2", "--workers", "0", "--threads", "1",
            "--device", "cpu", "--quiet", *extra]


def test_cli_train_resume_and_refine(tiny_set, tmp_path, capsys):
    root, data = tiny_set
    out = tmp_path / "aff"
    assert main(_train_args(root, data, out, "--max-steps", "2")) == 0
    assert "upstream settings for affinitynet: lr=0.1, weight_decay=0.0005" in \
        capsys.readouterr().err
    assert main(_train_args(root, data, out, "--resume")) == 0
    report = json.loads((out / "train.json").read_text())
    assert report["steps"] == report["total_steps"] == 4 and report["finished"]
    assert set(report["final"]) >= {"loss", "bg", "fg", "neg"}
    assert sorted(p.stem for p in (out / "psa_scores").glob("*.npz")) == \
        sorted((data / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
    uninterrupted = tmp_path / "once"
    assert main(_train_args(root, data, uninterrupted)) == 0
    resumed, once = (torch.load(p / "checkpoint.pth") for p in (out, uninterrupted))
    assert all(torch.equal(resumed[k], once[k]) for k in once)    # seeded, resumable

    labels = tmp_path / "rw"
    refine = ["refine", "--data", str(data), "--split", "val", "--cams",
              str(root / "cams_val"), "--out", str(labels), "--preset", "psa",
              "--affinity-checkpoint", str(out / "checkpoint.pth"), "--device", "cpu",
              "--quiet"]
    assert main(refine) == 0
    manifest = json.loads((labels / "manifest-refine.json").read_text())
    assert manifest["counts"]["done"] == 3
    for item in (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        label = np.asarray(PIL.Image.open(labels / "labels" / f"{item}.png"))
        assert label.shape == (64, 80)
    assert main(refine) == 0   # resumes: nothing left to do
    manifest = json.loads((labels / "manifest-refine.json").read_text())
    assert manifest["counts"].get("already_done", 0) == 3


def test_cli_bad_inputs(tiny_set, tmp_path, capsys):
    root, data = tiny_set
    assert main(_train_args(root, data, tmp_path / "a", "--crop", "76")) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert main(_train_args(root, data, tmp_path / "a", "--crop", "64")) == 2
    assert "at least 72" in capsys.readouterr().err
    assert main(_train_args(root, data, tmp_path / "a", "--model", "irn_tiny")) == 2
    assert "not an AffinityNet" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    args = _train_args(root, data, tmp_path / "b")
    args[args.index("--cams") + 1] = str(tmp_path / "none")
    assert main(args) == 2 and "--cams" in capsys.readouterr().err
    empty = tmp_path / "empty_cams"
    empty.mkdir()
    args[args.index("--cams") + 1] = str(empty)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "nothing to train on" in err and "no CAM file" in err and "Traceback" not in err
    edam_run = tmp_path / "edam_run"   # an undilated edam_tiny trunk into a dilated AffinityNet
    edam_run.mkdir()
    from wsss_fast.models.registry import create_model
    torch.save(create_model("edam_tiny", num_classes=3).state_dict(), edam_run / "checkpoint.pth")
    (edam_run / "train.json").write_text('{"config": {"model": "edam_tiny"}}')
    assert main(_train_args(root, data, tmp_path / "c", "--backbone",
                            str(edam_run / "checkpoint.pth"))) == 2
    err = capsys.readouterr().err
    assert "dilated (1, 1, 1), but affinitynet_tiny's are (2, 4, 4)" in err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
    assert "Traceback" not in err and not (tmp_path / "c").exists()
    torch.save(irn_tiny().state_dict(), tmp_path / "irn.pth")
    refine = ["refine", "--data", str(data), "--split", "val", "--cams",
              str(root / "cams_val"), "--out", str(tmp_path / "rw"), "--preset", "psa",
              "--affinity-checkpoint", str(tmp_path / "irn.pth"), "--quiet"]
    assert main(refine) == 2
    err = capsys.readouterr().err
    assert "this is an IRN (IRNet boundary + displacement) checkpoint, not an AffinityNet" in err
    assert "use it with --preset irn --irn-checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rw").exists()
    assert main(refine[:-3] + ["--preset", "irn", "--affinity-checkpoint",
                               str(tmp_path / "irn.pth")]) == 2
    assert "--affinity-checkpoint feeds --preset psa, not --preset irn" in capsys.readouterr().err


@pytest.mark.slow
def test_published_size_checkpoint_has_psa_layout(tiny_set, tmp_path):
    """One step of the published-size AffinityNet through the CLI: the saved checkpoint has
    exactly the keys and shapes of PSA's resnet38_aff.Net."""
    root, data = tiny_set
    out = tmp_path / "big"
    assert main(_train_args(root, data, out, "--model", "affinitynet", "--max-steps", "1")) == 0
    layout = json.loads(KEYS.read_text())
    saved = torch.load(out / "checkpoint.pth")
    assert {k: tuple(v.shape) for k, v in saved.items()} == \
        {key: tuple(shape) for key, shape in layout["keys"]}


def test_affinitynet_is_a_registered_learned_affinity(tmp_path):
    from wsss_fast.engine.learned_affinity import AFFINITY_NETWORKS
    entry = AFFINITY_NETWORKS.get("psa")
    assert (entry.walk, entry.option) == ("psa", "affinity_checkpoint")
    net = affinitynet_tiny().eval()
    torch.save(net.state_dict(), tmp_path / "aff.pth")
    side_input = entry.load(str(tmp_path / "aff.pth"), torch.device("cpu"), 512)
    images = [np.random.default_rng(i).integers(0, 256, (21, 30, 3), dtype=np.uint8)
              for i in range(2)]
    expected = affinity_features(net, images)
    for got, want in zip(side_input.batch(images) + [side_input(images[1])],
                         expected + expected[1:]):
        np.testing.assert_allclose(got, want, atol=1e-5)
