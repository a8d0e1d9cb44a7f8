"""The training layer: losses against hand-written restatements (BNR's detach included), a few
optimizer steps reduce every method's loss, the augmentation pipeline, the schedule,
determinism, resume after an interruption, checkpoint formats and the `wsss-fast train` CLI."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wsss_fast  # noqa: F401
from tests.golden import golden_path
from tests.helpers import assert_rel_close
from wsss_fast.cli import main as cli_main
from wsss_fast.data import open_dataset
from wsss_fast.data.synthetic import generate_synthetic
from wsss_fast.models.checkpoint import load_checkpoint
from wsss_fast.models.conformer import Conformer
from wsss_fast.models.mctformer import MCTformer
from wsss_fast.models.registry import create_model
from wsss_fast.engine.presets import get_preset
from wsss_fast.train import (METHODS, SYNTHETIC_TRAIN, Method, TrainConfig, get_method,
                             register_method)
from wsss_fast.train import train as train_config
from wsss_fast.train import losses
from wsss_fast.train.data import Augmentation, TrainingImages, augment, epoch_loader
from wsss_fast.train.trainer import learning_rate, parameter_groups

VIT_METHODS = ("mctformer_v1", "mctformer_v2", "mctformer_plus", "mctformer_v2_doei",
               "transcam", "bnr", "token_cam")
FAST = dict(batch_size=4, crop=64, workers=0, quiet=True)


def train(method, data, out, **options):
    """``wsss_fast.train.train`` of a TrainConfig with these fields."""
    return train_config(TrainConfig(method=method, data=data, out=out, **options))


def mlsm(logits, labels):
    """-mean_k [y log σ(x) + (1 − y) log σ(−x)], then mean over the batch."""
    per_class = labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)
    return -per_class.mean(dim=1).mean()


def random_labels(gen, batch, classes):
    labels = (torch.rand(batch, classes, generator=gen) > 0.6).float()
    labels[0] = 0
    labels[0, 1] = 1
    return labels


class Fixed(torch.nn.Module):
    """A 'model' returning given logits (scaled by a parameter, so gradients exist)."""

    def __init__(self, *outputs):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.outputs = outputs

    def forward(self, images):
        out = tuple(self.scale * o for o in self.outputs)
        return out if len(out) > 1 else out[0]


# ------------------------------------------------------------------------ losses

def test_logit_losses_match_restatements(gen):
    labels = random_labels(gen, 3, 5)
    a, b = torch.randn(3, 5, generator=gen) * 3, torch.randn(3, 5, generator=gen) * 3
    images = torch.zeros(3, 3, 8, 8)
    loss, terms = losses.mctformer_v1_loss(Fixed(a), images, labels)
    assert_rel_close(loss, mlsm(a, labels), 1e-6)
    loss, terms = losses.mctformer_v2_loss(Fixed(a, b), images, labels)
    assert_rel_close(loss, mlsm(a, labels) + mlsm(b, labels), 1e-6)
    assert terms == pytest.approx({"cls": float(mlsm(a, labels)), "patch": float(mlsm(b, labels))})
    loss, _ = losses.token_cam_loss(Fixed(a), images, labels)
    assert_rel_close(loss, mlsm(a, labels), 1e-6)


def test_transcam_loss_sums_logits_and_ignores_background(gen):
    labels = random_labels(gen, 4, 3)
    conv, trans = torch.randn(4, 4, generator=gen), torch.randn(4, 4, generator=gen)
    images = torch.zeros(4, 3, 8, 8)
    loss, _ = losses.transcam_loss(Fixed(conv, trans), images, labels)
    assert_rel_close(loss, mlsm((conv + trans)[:, 1:], labels), 1e-6)
    conv[:, 0] += 100.0
    assert losses.transcam_loss(Fixed(conv, trans), images, labels)[0] == loss


def test_losses_reject_mismatched_classes(gen):
    with pytest.raises(ValueError, match="one output per dataset class"):
        losses.mctformer_v1_loss(Fixed(torch.zeros(2, 4)), torch.zeros(2, 3, 8, 8),
                                 torch.zeros(2, 5))


def test_class_token_contrast_matches_loop(gen):
    tokens = torch.randn(3, 2, 4, 6, generator=gen)
    labels = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 0]])
    expected = 0.0
    for b in range(2):
        positives = [i for i in range(4) if labels[b, i] > 0]
        if not positives:
            continue
        total = 0.0
        for i in positives:
            per_layer = []
            for layer in range(3):
                t = tokens[layer, b]
                cos = (t @ t.T) / (t.norm(dim=1)[:, None] * t.norm(dim=1)[None])
                per_layer.append(-torch.log_softmax(cos[i], 0)[i])
            total += sum(per_layer) / 3
        expected += total / len(positives)
    expected /= 2
    assert_rel_close(losses.class_token_contrast(tokens, labels), expected.reshape(()), 1e-5)


def test_mctformer_plus_loss_collects_every_layer(gen):
    torch.manual_seed(0)
    model = MCTformer("plus", num_classes=3, img_size=32, embed_dim=16, depth=2, num_heads=2)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    loss, terms = losses.mctformer_plus_loss(model, images, labels)
    with torch.no_grad():
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(images)], 1)
        tokens = tokens + model.interpolate_pos_encoding(32, 32)
        per_layer = []
        for block in model.blocks:
            tokens = block(tokens, 3)
            per_layer.append(tokens[:, :3])
        cls_logits, patch_logits = model(images)
    expected = (mlsm(cls_logits, labels) + mlsm(patch_logits, labels)
                + losses.class_token_contrast(torch.stack(per_layer), labels))
    assert_rel_close(loss, expected, 1e-5)
    assert set(terms) == {"cls", "contrast", "patch"}


def tiny_conformer(gen):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = Conformer(num_classes=4, base_channel=64, channel_ratio=0.25, embed_dim=32, depth=3,
                      num_heads=2)
    with torch.no_grad():
        model.conv_cls_head.weight.mul_(0.05)
    return model.train()


def restated_bnr(model, images, labels, detach=True):
    """BNR with A* rebuilt from each block's captured input (softmax of its own q, k)."""
    inputs, maps = [], []
    hooks = [block.attn.register_forward_hook(lambda m, args, out: inputs.append((m, args[0])))
             for block in model.blocks()]
    hooks.append(model.conv_cls_head.register_forward_hook(lambda m, a, out: maps.append(out)))
    conv_logits, trans_logits = model(images)
    for hook in hooks:
        hook.remove()
    affinity = 0
    for attention, x in inputs:
        b, t, dim = x.shape
        q, k, _ = attention.qkv(x).reshape(b, t, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
        affinity = affinity + torch.softmax(q @ k.transpose(-1, -2) * attention.scale,
                                            -1).mean(1)[:, 1:, 1:]
    m = maps[0].flatten(2).transpose(1, 2)
    mean = affinity / len(inputs)
    mean = mean.detach() if detach else mean
    logits = (mean @ (affinity @ m)).mean(1)
    return mlsm((conv_logits + trans_logits)[:, 1:], labels) + mlsm(logits[:, 1:], labels)


def test_bnr_loss_matches_restatement_and_detaches_mean_attention(gen):
    model = tiny_conformer(gen)
    images = torch.randn(2, 3, 48, 48, generator=gen)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    loss, terms = losses.bnr_loss(model, images, labels)
    ours = torch.autograd.grad(loss, [model.conv_cls_head.weight, model.trans_1.attn.qkv.weight])
    expected = restated_bnr(model, images, labels)
    assert_rel_close(loss, expected, 1e-5)
    theirs = torch.autograd.grad(expected, [model.conv_cls_head.weight,
                                            model.trans_1.attn.qkv.weight])
    for a, b in zip(ours, theirs):
        assert_rel_close(a, b, 1e-4, what="BNR gradient")
    # Without the detach the attention gradient differs: the test sees Ā*'s treatment.
    undetached = restated_bnr(model, images, labels, detach=False)
    attention_grad = torch.autograd.grad(undetached, model.trans_1.attn.qkv.weight)[0]
    assert (attention_grad - ours[1]).abs().max() > 1e-3 * ours[1].abs().max()
    assert set(terms) == {"cls", "bnr"}


# ------------------------------------------------------------------------ every method learns

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "voc", num_train=8, num_val=2,
                              image_size=(64, 64), seed=3)


@pytest.fixture(scope="module")
def fixed_batch(tiny_root):
    dataset = open_dataset("voc", tiny_root, split="train")
    images = TrainingImages(dataset, Augmentation(crop=64, resize_long=(64, 64)), seed=0)
    batch, labels, failed = next(iter(epoch_loader(images, 4, 0, workers=0)))
    assert not failed
    return batch, labels


@pytest.mark.parametrize("name", VIT_METHODS)
def test_optimizer_steps_reduce_the_loss(name, fixed_batch):
    method = get_method(name)
    images, labels = fixed_batch
    torch.manual_seed(0)
    model = create_model(method.model, num_classes=labels.shape[1]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(6):
        loss, _ = method.loss(model, images, labels)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(method.loss(model, images, labels)[0].detach()) < 0.8 * first


# ------------------------------------------------------------------------ data and schedule

def test_augment_pads_small_images_with_zeros_and_crops_large_ones():
    aug = Augmentation(crop=32, resize_long=(16, 16), flip=False, color_jitter=None,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = np.full((8, 16, 3), 255, np.uint8)          # long side 16: stays 8×16
    view = augment(image, aug, np.random.default_rng(0))
    assert view.shape == (3, 32, 32)
    assert float(view.sum()) == pytest.approx(3 * 8 * 16)   # the image once, zeros around it
    big = Augmentation(crop=8, resize_long=(20, 20), flip=False, color_jitter=None)
    ramp = np.tile(np.arange(20, dtype=np.uint8)[None, :, None] * 10, (20, 1, 3))
    view = augment(ramp, big, np.random.default_rng(1))
    assert view.shape == (3, 8, 8)
    row = view[0, 0].numpy() * 0.229 + 0.485
    np.testing.assert_allclose(np.diff(row) * 255, 10, atol=1e-3)   # a contiguous window


def test_augmentation_depends_only_on_seed_epoch_index(tiny_root):
    dataset = open_dataset("voc", tiny_root, split="train")
    images = TrainingImages(dataset, Augmentation(crop=48), seed=5)
    first = images[3][1]
    assert torch.equal(TrainingImages(dataset, Augmentation(crop=48), seed=5)[3][1], first)
    assert not torch.equal(TrainingImages(dataset, Augmentation(crop=48), seed=6)[3][1], first)
    images.epoch = 1
    assert not torch.equal(images[3][1], first)
    serial = [b[0] for b in epoch_loader(images, 2, 1, workers=0)]
    parallel = [b[0] for b in epoch_loader(images, 2, 1, workers=2)]
    resumed = [b[0] for b in epoch_loader(images, 2, 1, start_batch=2, workers=0)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == 4
    assert all(torch.equal(a, b) for a, b in zip(serial[2:], resumed)) and len(resumed) == 2


def test_learning_rate_schedule():
    lrs = [learning_rate(s, 10, 2, 1e-3, 1e-5) for s in range(10)]
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])
    assert lrs[2] == pytest.approx(1e-3)
    assert lrs[6] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * 4 / 8)))
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))


def test_parameter_groups_exclude_biases_norms_and_tokens():
    model = MCTformer("v2", num_classes=2, img_size=32, embed_dim=16, depth=1, num_heads=2)
    decay, no_decay = parameter_groups(model, 0.05)
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.cls_token) in ids and id(model.pos_embed) in ids
    assert id(model.blocks[0].norm1.weight) in ids and id(model.head.bias) in ids
    assert {id(p) for p in decay["params"]} == {
        id(p) for p in model.parameters() if id(p) not in ids}
    assert id(model.blocks[0].attn.qkv.weight) not in ids and no_decay["weight_decay"] == 0


# ------------------------------------------------------------------------ the trainer

def read_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    a, b = a.get("model", a), b.get("model", b)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights(tiny_root, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        path = train("mctformer_v2", tiny_root, tmp_path / name, epochs=2, seed=seed, **FAST)
        runs[name] = read_weights(path)
    assert_same_weights(runs["a"], runs["b"])
    assert not torch.equal(runs["a"]["model"]["head.weight"], runs["c"]["model"]["head.weight"])


def test_resume_after_stop_gives_identical_weights(tiny_root, tmp_path):
    options = dict(FAST, batch_size=2, epochs=3)     # 4 steps per epoch
    straight = train("bnr", tiny_root, tmp_path / "straight", max_steps=6, **options)
    train("bnr", tiny_root, tmp_path / "resumed", max_steps=3, **options)   # stops mid-epoch
    report = json.loads((tmp_path / "resumed" / "train.json").read_text())
    assert report["steps"] == 3 and not report["finished"]
    resumed = train("bnr", tiny_root, tmp_path / "resumed", max_steps=6, resume=True, **options)
    assert_same_weights(read_weights(straight), read_weights(resumed))
    histories = [[{k: v for k, v in epoch.items() if k != "elapsed"}
                  for epoch in read_weights(tmp_path / run / "train_state.pth")["run"]["history"]]
                 for run in ("straight", "resumed")]
    assert histories[0] == histories[1] and len(histories[0]) == 1


class Killed(Exception):
    pass


def noisy_v1_method(name, die_at=None):
    """MCTformer-V1's loss scaled by a draw from torch's global generator (so the resumed run
    must restore it), raising ``Killed`` at call ``die_at``."""
    calls = {"n": 0}

    def loss(model, images, labels):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise Killed
        value, terms = losses.mctformer_v1_loss(model, images, labels)
        return value * (1 + torch.rand(())), terms

    if name not in METHODS:
        register_method(Method(name, "mctformer_v1_tiny", loss, "mctformer-v1", "wrapped"))
    return name


def test_killed_run_resumes_from_last_save(tiny_root, tmp_path):
    dying = noisy_v1_method("test_noisy_v1_dying", die_at=4)
    options = dict(FAST, batch_size=2, epochs=2, save_every=1)
    with pytest.raises(Killed):
        train(dying, tiny_root, tmp_path / "killed", **options)
    assert read_weights(tmp_path / "killed" / "train_state.pth")["run"]["step"] == 3
    with pytest.raises(ValueError, match="already holds a training run"):
        train(dying, tiny_root, tmp_path / "killed", **options)
    with pytest.raises(ValueError, match="lr"):
        train(dying, tiny_root, tmp_path / "killed", resume=True, **dict(options, lr=1e-2))
    resumed = train(dying, tiny_root, tmp_path / "killed", resume=True, **options)
    straight = train(noisy_v1_method("test_noisy_v1"), tiny_root, tmp_path / "straight",
                     **options)
    assert_same_weights(read_weights(resumed), read_weights(straight))


def recording_edam_method(name, calls):
    """EDAM's two losses, each appending its phase to ``calls`` when called."""
    from wsss_fast.train.cnn_methods import edam_loss, edam_warm_loss

    def recorded(phase, loss):
        def call(model, images, labels):
            calls.append(phase)
            return loss(model, images, labels)
        return call

    if name not in METHODS:
        register_method(Method(name, "edam_tiny", recorded("edam", edam_loss), "edam", "plain",
                               warm_loss=recorded("warm", edam_warm_loss)))
    return name


def test_warm_phase_switches_to_the_method_loss_after_warm_epochs(tiny_root, tmp_path):
    calls = []
    method = recording_edam_method("test_recording_edam", calls)
    train(method, tiny_root, tmp_path / "run", epochs=3, warm_epochs=1,
          **dict(FAST, batch_size=2))                  # 4 steps per epoch
    assert calls == ["warm"] * 4 + ["edam"] * 8
    history = json.loads((tmp_path / "run" / "train.json").read_text())["epochs"]
    assert [("warm_cls" in e, "bce" in e) for e in history] == [(True, False), (False, True),
                                                                (False, True)]
    assert [round(e["lr"], 10) for e in history] == [
        round(learning_rate(4 * (e + 1) - 1, 12, 4, 5e-4, 1e-6), 10) for e in range(3)]
    calls.clear()
    train(method, tiny_root, tmp_path / "plain", epochs=2, **dict(FAST, batch_size=2))
    assert calls == ["edam"] * 8                     # warm_epochs 0: no warm phase
    train(method, tiny_root, tmp_path / "scaled", epochs=3, warm_epochs=1, lr_after_warm=3.0,
          max_steps=8, **dict(FAST, batch_size=2))
    scaled = json.loads((tmp_path / "scaled" / "train.json").read_text())["epochs"]
    assert scaled[0]["lr"] == pytest.approx(history[0]["lr"])      # the warm phase: unscaled
    assert scaled[1]["lr"] == pytest.approx(3 * history[1]["lr"])


@pytest.mark.parametrize("freeze_trunk", [False, True])
def test_resume_across_the_warm_switch_gives_identical_weights(tiny_root, tmp_path,
                                                               freeze_trunk):
    options = dict(FAST, batch_size=2, epochs=2, warm_epochs=1,   # switch at step 4 of 8
                   freeze_trunk=freeze_trunk)
    straight = train("edam", tiny_root, tmp_path / "straight", **options)
    train("edam", tiny_root, tmp_path / "resumed", max_steps=3, **options)
    resumed = train("edam", tiny_root, tmp_path / "resumed", resume=True, **options)
    assert_same_weights(read_weights(straight), read_weights(resumed))
    with pytest.raises(ValueError, match="warm_epochs: 1 in the run, 0 now"):
        train("edam", tiny_root, tmp_path / "resumed", resume=True,
              **dict(options, warm_epochs=0, freeze_trunk=False))


def test_freeze_trunk_keeps_the_warm_phase_trunk(tiny_root, tmp_path):
    options = dict(FAST, batch_size=2, epochs=2, warm_epochs=1, freeze_trunk=True)
    train("edam", tiny_root, tmp_path / "run", max_steps=4, **options)      # the warm phase
    warm = read_weights(tmp_path / "run" / "checkpoint.pth")
    final = read_weights(train("edam", tiny_root, tmp_path / "run", resume=True, **options))
    start = create_model("edam_tiny", num_classes=8)
    trunk = {f"{name}.{key}" for name, module in start.named_children()
             if module in start.trunk() for key, p in module.named_parameters()}
    assert "conv1a.weight" in trunk and "bn7.weight" in trunk and "b7.conv_branch1.weight" in trunk
    assert not any(name.startswith(("mask_layer", "d_d", "fc_list", "trans_list")) for name in trunk)
    assert all(torch.equal(warm[k], final[k]) for k in trunk)
    assert not torch.equal(warm["mask_layer.weight"], final["mask_layer.weight"])
    assert not torch.equal(warm["d_d.weight"], final["d_d.weight"])
    unfrozen = read_weights(train("edam", tiny_root, tmp_path / "unfrozen",
                                  **dict(options, freeze_trunk=False)))
    assert not torch.equal(unfrozen["conv1a.weight"], final["conv1a.weight"])


@pytest.mark.parametrize("method, options, message", [
    ("mctformer_v2", dict(epochs=3, warm_epochs=1),
     "--warm-epochs does not apply to --method mctformer_v2 .*methods with one: edam"),
    ("edam", dict(epochs=3, warm_epochs=3), "--warm-epochs 3 must be below --epochs 3"),
    ("edam", dict(warm_epochs=20), "--warm-epochs 20 must be below --epochs 20"),   # the default
    ("edam", dict(epochs=3, warm_epochs=-1), r"--warm-epochs: expected an integer in \[0, "),
    ("edam", dict(epochs=3, warm_epochs=1.5), r"--warm-epochs: expected an integer"),
    ("edam", dict(epochs=3, freeze_trunk=True), "--freeze-trunk needs --warm-epochs N > 0"),
    ("edam", dict(epochs=3, lr_after_warm=0.5), "--lr-after-warm needs --warm-epochs N > 0"),
    ("edam", dict(epochs=3, warm_epochs=1, lr_after_warm=0), "--lr-after-warm: expected"),
])
def test_warm_epochs_errors(tiny_root, tmp_path, method, options, message):
    with pytest.raises(ValueError, match=message):
        train(method, tiny_root, tmp_path / "run", **FAST, **options)
    assert not (tmp_path / "run" / "train_state.pth").exists()


def test_checkpoint_formats_load_upstream_style(tiny_root, tmp_path):
    path = train("mctformer_v2", tiny_root, tmp_path / "v2", max_steps=1, **FAST)
    saved = read_weights(path)
    assert set(saved) == {"model"}
    golden = read_weights(golden_path("mctformer", "weights_v2_tiny.pth"))["model"]
    assert set(saved["model"]) == set(golden)     # the official MCTformerV2 key set (depth 4)
    by_name = create_model("mctformer_v2_tiny", num_classes=8, checkpoint=path)
    by_architecture = create_model("mctformer_v2", num_classes=8, checkpoint=path)
    direct = load_checkpoint(create_model("mctformer_v2_tiny", num_classes=8), path)
    for model in (by_name, by_architecture, direct):
        assert_same_weights(model.state_dict(), saved["model"])

    path = train("transcam", tiny_root, tmp_path / "transcam", max_steps=1, **FAST)
    saved = read_weights(path)
    golden = read_weights(golden_path("transcam", "weights_tiny.pth"))
    assert set(saved) == set(golden)              # the official Net key set (depth 6), plain
    model = create_model("transcam", num_classes=8, checkpoint=path)
    assert_same_weights(model.state_dict(), saved)

    path = train("mctformer_v2_doei", tiny_root, tmp_path / "doei", max_steps=1, **FAST)
    assert_same_weights(create_model("mctformer_v2", num_classes=8, checkpoint=path).state_dict(),
                        read_weights(path))


def test_report_lists_unlabelled_and_undecodable_images(tiny_root, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(tiny_root, root)
    ids = open_dataset("voc", root, split="train").ids
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    del labels[int(ids[0].replace("_", ""))]
    np.save(root / "cls_labels.npy", np.array(labels, dtype=object), allow_pickle=True)
    jpeg = root / "JPEGImages" / f"{ids[2]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:100])
    train("token_cam", root, tmp_path / "out", epochs=1, **FAST)
    report = json.loads((tmp_path / "out" / "train.json").read_text())
    reasons = {item["id"]: item["reason"] for item in report["skipped"]}
    assert "labels" in reasons[ids[0]]
    assert "JPEG" in reasons[ids[2]]
    assert report["dataset"]["images"] == len(ids) - 1 and report["finished"]


def test_synthetic_recipe_fits_train_config_and_presets():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(SYNTHETIC_TRAIN) <= fields
    for name in VIT_METHODS:
        method = get_method(name)
        assert set(method.synthetic_train) <= fields
        get_preset(method.preset, **method.synthetic_extract)


def test_synthetic_settings_are_not_the_defaults_of_other_data(tmp_path):
    """The demo's crop 128 / 15 epochs apply only through the explicit recipe."""
    generic = TrainConfig(method="mctformer_v2", data=str(tmp_path), out="o")
    recipe = TrainConfig.from_recipe("synthetic", method="mctformer_v2", data=str(tmp_path),
                                     out="o", crop=96)
    assert (generic.crop, generic.epochs) != (128, 15)
    assert (recipe.crop, recipe.epochs) == (96, 15)   # given options win over the recipe
    with pytest.raises(ValueError, match="unknown training recipe"):
        TrainConfig.from_recipe("voc-magic", method="mctformer_v2")


# ------------------------------------------------------------------------ CLI

def test_cli_train_end_to_end(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    threads_before = torch.get_num_threads()
    code = cli_main(["train", "--method", "mctformer_v2", "--data", str(tiny_root), "--out",
                     str(out), "--max-steps", "2", "--batch-size", "4", "--crop", "64",
                     "--workers", "0", "--device", "cpu", "--threads", "1", "--quiet"])
    assert code == 0 and torch.get_num_threads() == threads_before
    assert "2/" in capsys.readouterr().err
    assert {"checkpoint.pth", "train_state.pth", "train.json"} <= set(os.listdir(out))
    report = json.loads((out / "train.json").read_text())
    assert report["config"]["method"] == "mctformer_v2" and report["steps"] == 2
    code = cli_main(["train", "--method", "mctformer_v2", "--data", str(tiny_root), "--out",
                     str(out), "--max-steps", "3", "--batch-size", "4", "--crop", "64",
                     "--workers", "0", "--resume", "--quiet"])
    assert code == 0 and json.loads((out / "train.json").read_text())["steps"] == 3
    assert cli_main(["train", "--method", "mctformer_v2", "--data", str(tiny_root)]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli_main(["train", "--method", "mctformer_v2", "--data", str(tiny_root), "--out",
                     str(tmp_path / "other"), "--threads", "0"]) == 2
    assert "--threads: expected an integer in [1, 1024], got '0'" in capsys.readouterr().err


def test_cli_train_recipe_is_explicit_and_printed(tiny_root, tmp_path, capsys):
    out = tmp_path / "recipe"
    code = cli_main(["train", "--method", "mctformer_v2", "--recipe", "synthetic", "--data",
                     str(tiny_root), "--out", str(out), "--max-steps", "1", "--batch-size", "4",
                     "--crop", "64", "--workers", "0", "--device", "cpu", "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert "recipe synthetic for mctformer_v2" in err and "epochs=15" in err
    assert "crop=" not in err                     # given on the command line: not the recipe's
    config = json.loads((out / "train.json").read_text())["config"]
    assert config["epochs"] == 15 and config["crop"] == 64
    # Without the recipe the generic defaults apply, not the synthetic ones.
    plain = tmp_path / "plain"
    assert cli_main(["train", "--method", "mctformer_v2", "--data", str(tiny_root), "--out",
                     str(plain), "--max-steps", "1", "--batch-size", "4", "--crop", "64",
                     "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    generic = TrainConfig(method="mctformer_v2", data=str(tiny_root), out=str(plain))
    generic = generic.resolved(get_method("mctformer_v2"))   # the method's defaults filled in
    assert generic.epochs == 20
    assert json.loads((plain / "train.json").read_text())["config"]["epochs"] == generic.epochs
