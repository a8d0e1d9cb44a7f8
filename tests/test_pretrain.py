"""`wsss-fast pretrain` (source-domain pretraining of a family's tiny backbone), `train --init`
(with its mismatch report) and the shipped backbones."""

from __future__ import annotations

import json

import pytest
import torch

from wsss_fast.cli import main as cli_main
from wsss_fast.data.source_domain import NUM_SOURCE_CLASSES
from wsss_fast.data.synthetic import generate_synthetic
from wsss_fast.models.checkpoint import describe_load, load_matching, read_state_dict
from wsss_fast.models.registry import create_model
from wsss_fast.train import pretrain as pretraining
from wsss_fast.train.methods import get_method, list_methods
from wsss_fast.train.pretrain import (PRETRAIN_FAMILIES, PRETRAINED_DIR, PretrainConfig,
                                      average_precision, family_of_model, pretrain,
                                      read_pretrain_record, state_path, write_manifest)

TINY = dict(batch_size=4, size=64, val_images=8, workers=0, quiet=True, warmup_steps=1)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "voc", num_train=8, num_val=2,
                              image_size=(64, 64), seed=3)


def test_cli_pretrains_a_few_steps(tmp_path, capsys):
    out = tmp_path / "vit.pt"
    code = cli_main(["pretrain", "--family", "vit", "--out", str(out), "--steps", "3",
                     "--batch-size", "4", "--size", "64", "--val-images", "8", "--workers", "0",
                     "--seed", "2", "--quiet"])
    assert code == 0
    assert "source-domain val mAP" in capsys.readouterr().err
    record = read_pretrain_record(out)
    assert record["family"] == "vit" and record["steps"] == 3 and record["seed"] == 2
    assert 0 <= record["val_map"] <= 1 and record["minutes"] >= 0
    assert record["command"].startswith("wsss-fast pretrain --family vit --out ")
    assert "--steps 3" in record["command"] and "--quiet" not in record["command"]
    weights = read_state_dict(out)
    assert weights["classifier.weight"].shape[0] == NUM_SOURCE_CLASSES
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    assert not state_path(out).exists()        # the resumable state goes once OUT is written
    # a finished file is not overwritten by accident; a bad option is one line, status 2
    assert cli_main(["pretrain", "--family", "vit", "--out", str(out), "--steps", "3"]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["pretrain", "--family", "mlp", "--out", str(out)]) == 2


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    whole = tmp_path / "whole.pt"
    pretrain(PretrainConfig(family="resnet", out=str(whole), steps=4, save_every=2, **TINY))
    cut = tmp_path / "cut.pt"
    real_batch = pretraining.source_batch

    def failing_at_step_3(start, count, **kwargs):
        if kwargs.get("stream") == "train" and start == 3 * count:
            raise KeyboardInterrupt("stopped")
        return real_batch(start, count, **kwargs)

    monkeypatch.setattr(pretraining, "source_batch", failing_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(family="resnet", out=str(cut), steps=4, save_every=2, **TINY))
    assert not cut.exists() and state_path(cut).exists()
    monkeypatch.setattr(pretraining, "source_batch", real_batch)
    with pytest.raises(ValueError, match="unfinished pretraining run"):
        pretrain(PretrainConfig(family="resnet", out=str(cut), steps=4, save_every=2, **TINY))
    with pytest.raises(ValueError, match="cannot resume .*lr: 0.001 in the run"):
        pretrain(PretrainConfig(family="resnet", out=str(cut), steps=4, save_every=2,
                                resume=True, **{**TINY, "quiet": True}, lr=0.01))
    pretrain(PretrainConfig(family="resnet", out=str(cut), steps=4, save_every=2, resume=True,
                            **TINY))
    a, b = read_state_dict(whole), read_state_dict(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_average_precision():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2]]).numpy()
    targets = torch.tensor([[1, 0], [0, 0], [1, 0]]).numpy()
    aps = average_precision(scores, targets)
    assert aps[0] == pytest.approx((1 + 2 / 3) / 2) and aps[1] != aps[1]   # NaN: no positive


@pytest.fixture(scope="module")
def vit_backbone(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "vit.pt"
    pretrain(PretrainConfig(family="vit", out=str(out), steps=1, **TINY))
    return out


@pytest.mark.parametrize("name", ["mctformer_v1_tiny", "mctformer_v2_tiny"])
def test_load_matching_adapts_vit_tokens_and_reports_heads(vit_backbone, name):
    """A one-token backbone into MCTformer's C class tokens: the patch position rows are
    loaded; V2 starts each class token and class position row from the backbone's, V1 keeps
    its own (distinct) init for both, and the report says which."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    own = name == "mctformer_v1_tiny"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_matching(model, vit_backbone)
    state = read_state_dict(vit_backbone)
    assert "blocks.0.attn.qkv.weight" in report["loaded"] and "cls_token" not in report["loaded"]
    assert torch.equal(model.state_dict()["blocks.3.mlp.fc2.weight"],
                       state["blocks.3.mlp.fc2.weight"].float())
    patches = model.train_grid ** 2
    assert torch.equal(model.pos_embed[0, -patches:].detach(),
                       state["pos_embed"][0, -patches:].float())
    class_pos, tokens = model.pos_embed.detach()[0, :5], model.cls_token.detach()[0]
    if own:
        assert report["adapted"] == ["pos_embed"] and report["class_tokens"] == "kept initialized"
        assert report["shape_mismatched"] == [
            "cls_token: checkpoint (1, 1, 128) vs model (1, 5, 128)"]
        assert torch.equal(class_pos, before["pos_embed"][0, :5])
        assert torch.equal(tokens, before["cls_token"][0])
        started = torch.nn.functional.normalize(tokens + class_pos, dim=-1)
        cosine = started @ started.T
        assert cosine[~torch.eye(5, dtype=torch.bool)].abs().max() < 0.5   # distinct per class
    else:
        assert report["adapted"] == ["cls_token", "pos_embed"]
        assert report["class_tokens"] == "from the backbone's class token"
        assert not report["shape_mismatched"]
        assert torch.equal(class_pos, state["pos_embed"][0, :1].float().expand(5, -1))
        assert torch.allclose(tokens - before["cls_token"][0], state["cls_token"][0].float())
        assert not torch.equal(tokens[0], tokens[1])        # pretrained, yet distinct per class
    assert {"head.weight", "head.bias"} <= set(report["missing"])
    assert report["unexpected"] == ["classifier.weight"]
    # the counted values: every loaded tensor, and the rows of the backbone's adapted ones
    loaded = sum(state[k].numel() for k in report["loaded"])
    adapted = (patches if own else patches + 1 + 1) * model.embed_dim
    assert report["loaded_values"] == loaded + adapted
    text = describe_load(report, "vit.pt")
    assert f"patch rows loaded, class tokens {report['class_tokens']})" in text
    assert ("shape-mismatched (kept initialized) (1): cls_token" in text) == own


def test_load_matching_reports_shape_mismatches_and_keeps_them_initialized():
    source = create_model("transcam_tiny", num_classes=NUM_SOURCE_CLASSES).state_dict()
    model = create_model("transcam_tiny", num_classes=5)
    head = model.conv_cls_head.weight.detach().clone()
    report = load_matching(model, source)
    mismatched = {entry.split(":")[0] for entry in report["shape_mismatched"]}
    assert mismatched == {"conv_cls_head.weight", "conv_cls_head.bias", "trans_cls_head.weight",
                          "trans_cls_head.bias"}
    assert not mismatched & set(report["missing"]) and not mismatched & set(report["loaded"])
    assert torch.equal(model.conv_cls_head.weight.detach(), head)
    assert report["loaded_values"] < report["model_values"]


def test_train_init_loads_prints_and_records_the_report(vit_backbone, tiny_root, tmp_path,
                                                        capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--method", "token_cam", "--init", str(vit_backbone), "--data",
                     str(tiny_root), "--out", str(out), "--max-steps", "1", "--batch-size", "4",
                     "--crop", "64", "--workers", "0", "--device", "cpu", "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"init {vit_backbone}: loaded" in err and "shape-mismatched" in err
    report = json.loads((out / "train.json").read_text())
    assert report["config"]["init"] == str(vit_backbone)
    assert report["init"]["shape_mismatched"] == [
        f"classifier.weight: checkpoint ({NUM_SOURCE_CLASSES}, 128, 1, 1) vs model (8, 128, 1, 1)"]
    assert "blocks.0.norm1.weight" in report["init"]["loaded"]


def test_every_method_model_has_a_family():
    """Every classifier method (the affinity networks, with loops of their own, start from a
    classifier via --backbone instead)."""
    classifiers = [m for m in list_methods() if get_method(m).runner is None]
    assert len(classifiers) >= 9
    for method in classifiers:
        assert family_of_model(get_method(method).model) in PRETRAIN_FAMILIES


SHIPPED = sorted(PRETRAINED_DIR.glob("*.pt"))


@pytest.mark.skipif(not SHIPPED, reason="no shipped backbones (make pretrain)")
def test_shipped_backbones_fit_every_method_and_the_manifest(tmp_path):
    assert {path.stem for path in SHIPPED} == set(PRETRAIN_FAMILIES)
    assert sum(path.stat().st_size for path in SHIPPED) <= 20 * 2 ** 20
    manifest = json.loads((PRETRAINED_DIR / "MANIFEST.json").read_text())
    for path in SHIPPED:
        entry = manifest["checkpoints"][path.name]
        record = read_pretrain_record(path)
        assert entry["val_map"] == record["val_map"] and entry["command"] == record["command"]
        assert entry["command"].startswith("wsss-fast pretrain ") and entry["minutes"] > 0
    for method in [m for m in list_methods() if get_method(m).runner is None]:
        model_name = get_method(method).model
        model = create_model(model_name, num_classes=8)
        report = load_matching(model, PRETRAINED_DIR / f"{family_of_model(model_name)}.pt")
        # only classification heads (and method-specific layers) stay initialized
        assert report["loaded_values"] > 0.5 * report["model_values"], method
    assert json.loads(write_manifest(tmp_path).read_text())["checkpoints"] == {}


@pytest.mark.skipif(not SHIPPED, reason="no shipped backbones (make pretrain)")
def test_demo_with_pretrained_starts_every_method_from_its_family_backbone():
    from wsss_fast.cli import build_parser
    from wsss_fast.demo import DEMO_METHODS, FULL, QUICK, extraction_plan, train_overrides
    for row in DEMO_METHODS:
        trained = "irn_cam" if row == "lpcam" else extraction_plan(row)[0]
        overrides = train_overrides(trained, FULL, pretrained=True)
        family = family_of_model(get_method(trained).model)
        assert overrides["init"] == str(PRETRAINED_DIR / f"{family}.pt")
        assert train_overrides(trained, FULL, pretrained=False) == {}
    assert train_overrides("transcam", FULL, pretrained=True)["epochs"] == 8
    assert train_overrides("bnr", FULL, pretrained=True)["epochs"] == 6
    assert train_overrides("transcam", QUICK, pretrained=True)["epochs"] == 2   # the scale wins
    assert train_overrides("mctformer_v1", FULL, pretrained=True)["weight_decay"] == 0.0
    assert "weight_decay" not in train_overrides("mctformer_v2", FULL, pretrained=True)
    parser, _ = build_parser(only="demo")
    assert parser.parse_args(["demo", "--pretrained"]).pretrained
    assert parser.parse_args(["demo"]).pretrained              # the shipped backbones by default
    assert not parser.parse_args(["demo", "--from-scratch"]).pretrained
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--pretrained", "--from-scratch"])
