"""LPCAM (DESIGN §5.4; reference/cnn_methods_postprocessing.md §1, §7 item 3).

* ``prototype_cam`` (normalize + one 1×1 conv) against upstream's per-prototype cosine loop
  (mean cos to class prototypes minus mean cos to context ones, ReLU only with context).
* Prototype choice on a hand-built classifier: softmax > 0.9 (strict), the context band (VOC and
  COCO), the argmax fallback and the empty cases.
* Pixel selection (nearest resize, ``>`` / ``<`` the threshold, equal pixels dropped) and COCO's
  per-class draws with replacement against a restatement of ``split_100``.
* The multi-scale aggregation against upstream's loop (bilinear to ⌈H/4⌉ and to 16⌈H/16⌉ then
  crop, mean — or COCO's sum — divided by the max without epsilon).
* ``LpcamEngine`` against a direct restatement of ``make_lpcam`` (PIL bicubic rescales, feature
  sum with the flip, the cosine loop, the aggregation) on a tiny random model.
* The CLI end to end on a tiny synthetic set: ``prototypes`` (in-process CAMs and ``--cams``
  files agree), ``extract --method lpcam`` (files, manifest, resume, checkpoint mismatch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import (assert_rel_close, random_image, randomize_batchnorm,
                           upstream_normalize, upstream_rescale)
from wsss_fast.engine.lpcam import (LPCAM_SETTINGS, LpcamEngine, LpcamSettings, Prototypes,
                                  aggregate_scales, class_members, select_pixels,
                                  select_prototypes)
from wsss_fast.ops import prototype_cam, prototype_weight



def naive_lpcam_map(features: torch.Tensor, class_protos: torch.Tensor,
                    context_protos: torch.Tensor) -> torch.Tensor:
    """``make_lpcam.py:181-204`` restated: ``features (D, h, w)`` → ``(h, w)``."""
    d, h, w = features.shape
    feature_here = features.permute(1, 2, 0).reshape(h, w, d)
    att = torch.stack([F.cosine_similarity(feature_here, u.repeat(h, w, 1), 2)
                       for u in class_protos]).mean(0)
    if context_protos.shape[0] > 0:
        context = torch.stack([F.cosine_similarity(feature_here, v.repeat(h, w, 1), 2)
                               for v in context_protos]).mean(0)
        att = F.relu(att - context)
    return att


def naive_aggregate(maps, height, width, reduce="mean"):
    """``make_lpcam.py:206-213`` restated for one class: per-scale ``(h_s, w_s)`` maps."""
    strided_size = ((height - 1) // 4 + 1, (width - 1) // 4 + 1)
    up_size = (((height - 1) // 16 + 1) * 16, ((width - 1) // 16 + 1) * 16)
    strided, highres = [], []
    for att in maps:
        att = att[None, None].float()
        strided.append(F.interpolate(att, strided_size, mode="bilinear", align_corners=False)[:, 0])
        highres.append(F.interpolate(att, up_size, mode="bilinear",
                                     align_corners=False)[:, 0, :height, :width])
    op = torch.mean if reduce == "mean" else torch.sum
    strided, highres = op(torch.cat(strided), 0), op(torch.cat(highres), 0)
    return highres / torch.max(highres), strided / torch.max(strided)


# ------------------------------------------------------------------ the heatmap

def test_gemm_form_equals_the_per_prototype_cosine_loop(gen):
    features = torch.randn(64, 5, 7, generator=gen).relu()
    features[:, 2, 3] = 0.0                       # a dead pixel: cosine 0 in both forms
    class_protos = torch.rand(3, 64, generator=gen)
    context_protos = torch.rand(2, 64, generator=gen) * 3
    weight, relu = prototype_weight(class_protos, context_protos)
    assert relu
    got = prototype_cam(features, weight[None], torch.tensor([relu]))[0]
    expected = naive_lpcam_map(features, class_protos, context_protos)
    assert (expected == 0).any() and (expected > 0).any()     # the ReLU acted
    assert_rel_close(got, expected, 1e-5)


def test_no_relu_without_context_prototypes(gen):
    features = torch.randn(32, 6, 4, generator=gen)            # signed: negative cosines exist
    class_protos = torch.randn(4, 32, generator=gen)
    weight, relu = prototype_weight(class_protos, torch.zeros(0, 32))
    assert not relu
    got = prototype_cam(features, weight[None], torch.tensor([relu]))[0]
    expected = naive_lpcam_map(features, class_protos, torch.zeros(0, 32))
    assert (expected < 0).any()
    assert_rel_close(got, expected, 1e-5)


def test_prototypes_weights_stack_classes_and_batch(gen):
    d = 16
    features = torch.rand(2, d, 3, 5, generator=gen)
    sets = [(torch.rand(2, d, generator=gen), torch.rand(1, d, generator=gen)),
            (torch.rand(1, d, generator=gen), torch.zeros(0, d)),
            (torch.zeros(0, d), torch.rand(2, d, generator=gen))]     # no class prototype
    prototypes = Prototypes(("a", "b", "c"), [p for p, _ in sets], [q for _, q in sets], {})
    weight, relu = prototypes.weights()
    assert relu.tolist() == [True, False, False]
    got = prototype_cam(features, weight, relu)
    for b in range(2):
        for k in range(2):
            assert_rel_close(got[b, k], naive_lpcam_map(features[b], *sets[k]), 1e-5)
        assert torch.equal(got[b, 2], torch.zeros(3, 5))


def test_prototype_cam_rejects_bad_input():
    with pytest.raises(ValueError, match="one D"):
        prototype_cam(torch.rand(1, 8, 2, 2), torch.rand(3, 7), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one flag per class"):
        prototype_cam(torch.rand(1, 8, 2, 2), torch.rand(3, 8), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        prototype_cam(torch.rand(1, 8, 2, 2), torch.rand(3, 8), torch.ones(3))
    with pytest.raises(ValueError, match="share D"):
        prototype_weight(torch.rand(2, 8), torch.rand(2, 9))


# ------------------------------------------------------------------ prototype choice

# Classifier w (3 classes, D = 2) and centres whose class-0 softmax scores are known:
# [1, 0] → logits [10, 0, -10] → 0.99995; [0.5, 0.4] → [5, 4, -9] → 0.731;
# [0, 1] → [0, 10, -10] → 4.5e-5; [0.3, 0] → [3, 0, -3] → 0.950.
W = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
CENTRES = torch.tensor([[1.0, 0.0], [0.5, 0.4], [0.0, 1.0], [0.3, 0.0]])
VOC = dict(class_thres=0.9, context_thres=0.9, context_thres_low=0.05)
COCO = dict(class_thres=0.9, context_thres=0.5, context_thres_low=0.0)


def test_class_and_context_prototypes_by_softmax_score():
    choice = select_prototypes(CENTRES, CENTRES, W, 0, **VOC)
    scores = torch.softmax(CENTRES @ W.t(), dim=1)[:, 0]
    torch.testing.assert_close(choice.class_scores, scores)
    assert torch.equal(choice.class_prototypes, CENTRES[[0, 3]])       # > 0.9
    assert torch.equal(choice.context_prototypes, CENTRES[[1]])        # 0.05 < q < 0.9
    assert not choice.fallback
    coco = select_prototypes(CENTRES, CENTRES, W, 0, **COCO)
    assert torch.equal(coco.context_prototypes, CENTRES[[2]])          # 0 < q < 0.5
    # Thresholds are strict: a centre scoring exactly the threshold is left out.
    strict = select_prototypes(CENTRES, CENTRES, W, 0, class_thres=scores[3].item(),
                               context_thres=0.9, context_thres_low=scores[1].item())
    assert torch.equal(strict.class_prototypes, CENTRES[[0]])
    assert strict.context_prototypes.shape == (0, 2)


def test_empty_class_set_falls_back_to_the_best_centre_or_stays_empty():
    weak = CENTRES[1:]                            # class-0 scores 0.731, 4.5e-5, 0.950
    choice = select_prototypes(weak, weak, W, 0, class_thres=0.99, context_thres=0.9,
                               context_thres_low=0.05)
    assert choice.fallback and torch.equal(choice.class_prototypes, CENTRES[[3]])   # COCO
    none = select_prototypes(weak, weak, W, 0, class_thres=0.99, context_thres=0.9,
                             context_thres_low=0.05, class_fallback="none")
    assert not none.fallback and none.class_prototypes.shape == (0, 2)
    empty = select_prototypes(torch.zeros(0, 2), torch.zeros(0, 2), W, 0, **VOC)
    assert not empty.fallback
    assert empty.class_prototypes.shape == empty.context_prototypes.shape == (0, 2)
    with pytest.raises(ValueError, match="class_fallback"):
        select_prototypes(weak, weak, W, 0, class_fallback="mean", **VOC)


# ------------------------------------------------------------------ feature bank

def test_pixel_selection_is_nearest_resize_and_strict_threshold():
    cams = torch.zeros(2, 4, 6)
    cams[0, ::2, ::2] = torch.tensor([[0.5, 0.1, 0.0], [0.05, 0.9, 0.1]])
    cams[0, 1::2] = 1.0                           # never sampled by nearest at half size
    cams[1] = 0.2
    selected, not_selected = select_pixels(cams, (2, 3), 0.1)
    assert selected.tolist() == [[True, False, False, False, True, False], [True] * 6]
    assert not_selected.tolist() == [[False, False, True, True, False, False], [False] * 6]


def _fake_dataset(labels: dict, num_classes: int):
    ids = sorted(labels)
    return SimpleNamespace(ids=ids, num_classes=num_classes,
                           sample=lambda id: SimpleNamespace(labels=labels[id]))


def test_class_members_all_images_or_coco_draws_with_replacement():
    labels = {f"im{i}": np.array([i % 2 == 0, True, False, i % 3 == 0], np.float32)
              for i in range(7)}
    labels["nolabel"] = None
    dataset = _fake_dataset(labels, 4)
    members = class_members(dataset, dataset.ids, LpcamSettings())
    assert members[0] == ["im0", "im2", "im4", "im6"]
    assert members[1] == [f"im{i}" for i in range(7)] and members[2] == []
    drawn = class_members(dataset, dataset.ids, LPCAM_SETTINGS["coco"])
    # split_100: one seeded RNG, classes in order, np.random.choice(images of c, 100).
    rng = np.random.RandomState(666)
    for c in (0, 1, 3):                           # class 2 has no image and draws nothing
        having = np.array(members[c])
        assert drawn[c] == list(rng.choice(having, 100))
    assert drawn[2] == [] and len(set(drawn[0])) < 100


def test_settings_validation():
    with pytest.raises(ValueError, match="clusters"):
        LpcamSettings(clusters=0)
    with pytest.raises(ValueError, match="class_fallback"):
        LpcamSettings(class_fallback="mean")
    with pytest.raises(ValueError, match="select_thres"):
        LpcamSettings(select_thres=float("nan"))


# ------------------------------------------------------------------ aggregation

@pytest.mark.parametrize("height, width", [(37, 50), (64, 48), (1, 17)])
def test_multiscale_aggregation_matches_upstream(height, width, gen):
    sizes = [(math.ceil(round(height * s) / 16), math.ceil(round(width * s) / 16))
             for s in (1.0, 0.5, 1.5, 2.0)]
    maps = [torch.rand(3, max(h, 1), max(w, 1), generator=gen) for h, w in sizes]
    high, low = aggregate_scales(maps, height, width)
    assert high.shape == (3, height, width)
    assert low.shape == (3, math.ceil(height / 4), math.ceil(width / 4))
    for k in range(3):
        expected_high, expected_low = naive_aggregate([m[k] for m in maps], height, width)
        assert_rel_close(high[k], expected_high, 1e-5)
        assert_rel_close(low[k], expected_low, 1e-5)
        summed_high, _ = naive_aggregate([m[k] for m in maps], height, width, "sum")  # COCO
        assert_rel_close(high[k], summed_high, 1e-5)


def test_aggregation_keeps_an_all_zero_map_at_zero(gen):
    maps = [torch.rand(2, 3, 4, generator=gen), torch.rand(2, 2, 2, generator=gen)]
    for m in maps:
        m[1] = 0.0
    high, low = aggregate_scales(maps, 40, 60)
    assert torch.equal(high[1], torch.zeros(40, 60)) and torch.equal(low[1], torch.zeros(10, 15))
    assert high[0].max().item() == pytest.approx(1.0)


# ------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def tiny_model():
    from wsss_fast.models.resnet_cam import resnet_cam_tiny
    gen = torch.Generator().manual_seed(7)
    model = resnet_cam_tiny(num_classes=5)
    randomize_batchnorm(model, gen)
    return model.eval()


def test_engine_matches_make_lpcam_restated(tiny_model, gen):
    height, width = 45, 61
    image = PIL.Image.fromarray(random_image(gen, height, width))
    features = []
    with torch.no_grad():
        for s in (1.0, 0.5, 1.5, 2.0):
            x = upstream_normalize(upstream_rescale(image, s))
            f = tiny_model.features(torch.stack([x, x.flip(-1)]))
            features.append(f[0] + f[1].flip(-1))
    # Class prototypes: features of random pixels (so the maps peak there); context: random.
    pixels = features[0].flatten(1).t()
    d = pixels.shape[1]
    class_sets = [pixels[torch.randint(0, pixels.shape[0], (n,), generator=gen)]
                  for n in (2, 1, 3, 1, 2)]
    context_sets = [torch.rand(n, d, generator=gen) for n in (1, 0, 2, 0, 3)]
    prototypes = Prototypes(tuple("abcde"), class_sets, context_sets, {})
    labels = [0, 1, 1, 0, 1]
    result = LpcamEngine(tiny_model, prototypes)(image, labels)
    assert result.keys.tolist() == [1, 2, 4]
    for k in (1, 2, 4):
        maps = [naive_lpcam_map(f, class_sets[k], context_sets[k]) for f in features]
        expected_high, expected_low = naive_aggregate(maps, height, width)
        assert_rel_close(result.high_res[k], expected_high, 1e-5, what=f"high_res {k}")
        assert_rel_close(result.low_res[k], expected_low, 1e-5, what=f"low_res {k}")
    for k in (0, 3):
        assert not result.high_res[k].any() and not result.low_res[k].any()


def test_engine_batches_images_and_handles_no_labels(tiny_model, gen):
    d = tiny_model.classifier.weight.shape[1]
    prototypes = Prototypes(tuple("abcde"), [torch.rand(2, d, generator=gen)] * 5,
                            [torch.zeros(0, d)] * 5, {})
    engine = LpcamEngine(tiny_model, prototypes, scales=(1.0, 0.5))
    images = [random_image(gen, 33, 40), random_image(gen, 33, 40), random_image(gen, 20, 30)]
    labels = [[1, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]
    together = engine.extract(images, labels)
    for image, lab, result in zip(images, labels, together):
        alone = engine(image, lab)
        assert result.keys.tolist() == alone.keys.tolist()
        torch.testing.assert_close(result.high_res, alone.high_res, rtol=1e-5, atol=1e-6)
    assert together[1].keys.size == 0 and not together[1].high_res.any()
    assert together[1].low_res.shape == (5, 9, 10)


def test_engine_rejects_prototypes_of_another_model(tiny_model):
    prototypes = Prototypes(tuple("abc"), [torch.rand(1, 512)] * 3, [torch.zeros(0, 512)] * 3,
                            {})
    with pytest.raises(ValueError, match="do not fit the model"):
        LpcamEngine(tiny_model, prototypes)


def test_prototypes_file_round_trip_and_errors(tmp_path):
    prototypes = Prototypes(("a", "b"), [torch.rand(2, 4), torch.rand(1, 4)],
                            [torch.rand(1, 4), torch.zeros(0, 4)], {"clusters": 3},
                            model="m", checkpoint_sha256="ab" * 32,
                            diagnostics=[{"class": "a"}, {"class": "b"}])
    prototypes.save(tmp_path / "p.pt")
    loaded = Prototypes.load(tmp_path / "p.pt")
    assert loaded.class_names == ("a", "b") and loaded.settings == {"clusters": 3}
    assert loaded.checkpoint_sha256 == "ab" * 32 and loaded.model == "m"
    for got, expected in zip(loaded.class_prototypes + loaded.context_prototypes,
                             prototypes.class_prototypes + prototypes.context_prototypes):
        assert torch.equal(got, expected)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a wsss-fast LPCAM prototypes file"):
        Prototypes.load(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a torch file"):
        Prototypes.load(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not found"):
        Prototypes.load(tmp_path / "missing.pt")


# ------------------------------------------------------------------ CLI end to end

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from wsss_fast.data.synthetic import generate_synthetic
    from wsss_fast.models.registry import create_model, save_model
    root = tmp_path_factory.mktemp("lpcam")
    data = generate_synthetic(root / "data", num_train=8, num_val=4, image_size=(64, 64))
    torch.manual_seed(0)
    save_model(create_model("resnet_cam_tiny", num_classes=8), root / "ckpt.pth")
    torch.manual_seed(1)
    save_model(create_model("resnet_cam_tiny", num_classes=8), root / "other.pth")
    return SimpleNamespace(root=root, data=str(data), checkpoint=str(root / "ckpt.pth"),
                           other=str(root / "other.pth"))


def _cli(*argv):
    from wsss_fast.cli import main
    return main([str(a) for a in argv])


def _model_args(synthetic, checkpoint=None):
    return ["--data", synthetic.data, "--model", "resnet_cam_tiny", "--checkpoint",
            checkpoint or synthetic.checkpoint, "--device", "cpu", "--workers", "0", "--quiet"]


PROTOTYPE_OPTIONS = ("--split", "train", "--clusters", "3", "--seed", "4")


@pytest.fixture(scope="module")
def built(synthetic):
    """``wsss-fast prototypes`` run once (CAMs computed in-process)."""
    path = synthetic.root / "prototypes.pt"
    assert _cli("prototypes", "--out", path, *PROTOTYPE_OPTIONS, *_model_args(synthetic)) == 0
    return path


def test_cli_prototypes_file(synthetic, built):
    from wsss_fast.io.run_state import file_digest
    prototypes = Prototypes.load(built)
    assert prototypes.checkpoint_sha256 == file_digest(synthetic.checkpoint)
    assert prototypes.model == "resnet_cam_tiny"
    settings = prototypes.settings
    assert settings["clusters"] == 3 and settings["seed"] == 4 and settings["bank_images"] == 8
    assert settings["select_thres"] == 0.1 and settings["images_per_class"] is None   # VOC
    assert len(prototypes.class_names) == 8 and prototypes.feature_dim == 512
    assert sum(e["selected_pixels"] for e in prototypes.diagnostics) > 0
    for entry, class_protos in zip(prototypes.diagnostics, prototypes.class_prototypes):
        assert len(entry["class_scores"]) == min(3, entry["selected_pixels"])
        assert class_protos.shape[0] == entry["class_prototypes"]
    # An existing file is not silently replaced.
    assert _cli("prototypes", "--out", built, *PROTOTYPE_OPTIONS, *_model_args(synthetic)) == 2


def test_cli_lpcam_extraction(synthetic, built):
    from wsss_fast.data.factory import open_dataset
    from wsss_fast.data.images import read_image
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.io.run_state import file_digest
    from wsss_fast.models.registry import create_model
    out = synthetic.root / "extract"
    args = ["extract", "--method", "lpcam", "--prototypes", built, "--split", "val", "--out",
            out, *_model_args(synthetic)]
    assert _cli(*args) == 0
    manifest = json.loads((out / "manifest-extract.json").read_text())
    assert manifest["counts"]["done"] == 4 and manifest["config"]["method"] == "lpcam"
    assert manifest["config"]["prototypes_sha256"] == file_digest(built)
    dataset = open_dataset("auto", synthetic.data, split="val")
    engine = LpcamEngine(create_model("resnet_cam_tiny", checkpoint=synthetic.checkpoint),
                         Prototypes.load(built))
    for id in dataset.ids[:2]:
        record = load_cam_file(out / "cams" / f"{id}.npy")
        sample = dataset.sample(id)
        expected = engine(read_image(sample.image_path), sample.labels)
        assert record.keys.tolist() == expected.keys.tolist() and record.keys.size > 0
        assert record.low_res.shape == (len(expected.keys), 16, 16)
        np.testing.assert_allclose(record.high_res, expected.high_res[expected.keys].numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert _cli(*args) == 0                       # resumed: nothing left to do
    assert json.loads((out / "manifest-extract.json").read_text())["counts"]["already_done"] == 4
    # Prototypes of another checkpoint, or none at all, are refused.
    assert _cli("extract", "--method", "lpcam", "--prototypes", built, "--split", "val",
                "--out", synthetic.root / "bad", *_model_args(synthetic, synthetic.other)) == 2
    assert _cli("extract", "--method", "lpcam", "--split", "val", "--out",
                synthetic.root / "bad", *_model_args(synthetic)) == 2


def test_cli_prototypes_from_cam_files_equal_in_process_cams(synthetic, built):
    root = synthetic.root
    assert _cli("extract", "--split", "train", "--out", root / "irn", *_model_args(synthetic)) == 0
    from_files = root / "from_files.pt"
    assert _cli("prototypes", "--out", from_files, "--cams", root / "irn" / "cams",
                *PROTOTYPE_OPTIONS, *_model_args(synthetic)) == 0
    a, b = Prototypes.load(built), Prototypes.load(from_files)
    assert [e["selected_pixels"] for e in a.diagnostics] == \
        [e["selected_pixels"] for e in b.diagnostics]
    for x, y in zip(a.class_prototypes + a.context_prototypes,
                    b.class_prototypes + b.context_prototypes):
        assert torch.equal(x, y)
    assert _cli("prototypes", "--out", root / "c.pt", "--cams", root / "missing",
                *PROTOTYPE_OPTIONS, *_model_args(synthetic)) == 2


@pytest.mark.slow
def test_demo_helper_trains_builds_and_extracts(synthetic, tmp_path):
    from wsss_fast.demo import demo_lpcam_cams
    work = tmp_path / "lpcam"
    cams = demo_lpcam_cams(Path(synthetic.data), work, {"epochs": 1, "batch_size": 4}, seed=0,
                           workers=0, device="cpu")
    assert cams == work / "extract" / "cams" and len(list(cams.glob("*.npy"))) == 4
    assert (work / "train" / "checkpoint.pth").exists() and (work / "prototypes.pt").exists()
    manifest = json.loads((work / "extract" / "manifest-extract.json").read_text())
    assert manifest["counts"]["done"] == 4 and manifest["config"]["method"] == "lpcam"
    stamp = (work / "prototypes.pt").stat().st_mtime_ns
    demo_lpcam_cams(Path(synthetic.data), work, {"epochs": 1, "batch_size": 4}, seed=0,
                    workers=0, device="cpu")   # every step is skipped
    assert (work / "prototypes.pt").stat().st_mtime_ns == stamp
    manifest = json.loads((work / "extract" / "manifest-extract.json").read_text())
    assert manifest["counts"]["already_done"] == 4
