"""MCTformer-V1/V2: the engine against (a) the official generators' saved outputs in
tests/data/golden and (b) an eager re-implementation of the upstream forward and generator with the
same random weights; checkpoint loading by upstream key names."""


import numpy as np
import PIL.Image
import pytest
import torch

from tests.golden import golden_path
from tests.oracles import upstream_mctformer
from wsss_fast import ops
from wsss_fast.engine import CamEngine
from wsss_fast.models import CheckpointMismatch, load_checkpoint
from wsss_fast.models.mctformer import (global_ranking_pool, mctformer_plus, mctformer_v1,
                                        mctformer_v2)

FACTORIES = {"v1": mctformer_v1, "v2": mctformer_v2, "plus": mctformer_plus}
PRESET = {"v1": "mctformer_v1", "v2": "mctformer_v2", "plus": "mctformer_plus"}
UPSTREAM_LAYERS = {"v1": 3, "v2": 3, "plus": 12}  # --layer-index of each generator
TINY = dict(embed_dim=64, depth=4, num_heads=2)


def golden_model(version):
    model = FACTORIES[version](**TINY).eval()
    return load_checkpoint(model, golden_path("mctformer", f"weights_{version}_tiny.pth"))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_engine_reproduces_the_official_generator_outputs(version):
    labels = np.load(golden_path("images", "labels.npy"), allow_pickle=True).item()
    engine = CamEngine(golden_model(version), f"mctformer_{version}", scales=(1.0, 0.75, 1.25))
    for name, label in sorted(labels.items()):
        ours = engine(golden_path("images", "JPEGImages", f"{name}.jpg"), label).as_dict()
        official = np.load(golden_path("mctformer", f"official_{version}", f"{name}.npy"),
                           allow_pickle=True).item()
        assert sorted(ours) == sorted(official) == list(np.nonzero(label)[0])
        for k, expected in official.items():
            assert ours[k].shape == expected.shape
            np.testing.assert_allclose(ours[k], expected, atol=1e-4, rtol=0,
                                       err_msg=f"{version} {name} class {k}")


def random_model(version, seed):
    torch.manual_seed(seed)
    model = FACTORIES[version](**TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # peaky attention, as in the golden weights
    return model


def random_image(height, width, seed):
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return PIL.Image.fromarray(smooth).resize((width, height), PIL.Image.BILINEAR)


@pytest.mark.parametrize("version", ["v1", "v2", "plus"])
@pytest.mark.parametrize("size, scales", [((375, 500), (1.0,)), ((224, 224), (1.0,)),
                                          ((375, 500), (1.0, 0.75, 1.25))])
def test_engine_matches_eager_upstream_generator(version, size, scales):
    model = random_model(version, seed=sum(size) + len(scales))
    image = random_image(*size, seed=len(scales))
    label = np.zeros(20, dtype=np.float32)
    label[[2, 7, 19]] = 1
    expected, expected_sum = upstream_mctformer.generate(model, image, label, scales,
                                                         n_layers=UPSTREAM_LAYERS[version])
    ours = CamEngine(model, PRESET[version], scales=scales)(image, label).as_dict()
    ours_sum = CamEngine(model, PRESET[version], scales=scales, norm="none")(image, label)
    assert sorted(ours) == sorted(expected)
    for k in expected:
        raw, raw_expected = ours_sum.high_res[k].numpy(), expected_sum[k]
        scale = np.abs(raw_expected).max()
        np.testing.assert_allclose(raw, raw_expected, atol=1e-5 * scale, rtol=0,
                                   err_msg=f"class {k} before normalization")
        # Min-max divides absolute error by the map's range: random weights can give maps that
        # vary by <1% (V1's affinity-smoothed CAMs), where fp32 rounding is amplified ~100x.
        conditioning = scale / (raw_expected.max() - raw_expected.min())
        np.testing.assert_allclose(ours[k], expected[k], atol=max(1e-4, 2e-6 * conditioning),
                                   rtol=0, err_msg=f"class {k} (max/range {conditioning:.0f})")


@pytest.mark.parametrize("version", ["v1", "v2", "plus"])
def test_cam_maps_options_match_upstream_forward(version):
    model = random_model(version, seed=3)
    if version == "plus":
        with torch.no_grad():
            model.head.weight.abs_()  # sqrt of the fused product needs a non-empty support
    x = torch.randn(2, 3, 160, 208)
    for n_layers in (1, 3, 4):
        expected, patch_attn = upstream_mctformer.forward_return_att(model, x, n_layers)
        ours = model.cam_maps(x, cls_layers=n_layers, refine=False)
        # atol relative to the map's scale: + takes a sqrt, which magnifies rounding near 0.
        torch.testing.assert_close(ours, expected.reshape(ours.shape), rtol=1e-4,
                                   atol=1e-5 * expected.abs().max().item())
    refined = model.cam_maps(x, cls_layers=3)
    cams, patch_attn = upstream_mctformer.forward_return_att(model, x, 3)
    expected = torch.bmm(patch_attn.sum(0), cams.reshape(2, 20, -1).transpose(1, 2))
    torch.testing.assert_close(refined.flatten(2).transpose(1, 2), expected, rtol=1e-4, atol=1e-6)


def test_pos_embed_resize_uses_upstream_scale_factor_semantics():
    model = random_model("v2", seed=1)
    tokens = torch.zeros(1, 20 + 23 * 31, 64)
    expected = upstream_mctformer.pos_embed(model, tokens, 375, 500)
    torch.testing.assert_close(model.interpolate_pos_encoding(375, 500), expected, rtol=0, atol=0)
    # A non-square image with the training grid still goes through the resize (as upstream).
    tokens = torch.zeros(1, 20 + 14 * 14, 64)
    resized = model.interpolate_pos_encoding(224, 239)
    assert not torch.equal(resized, model.pos_embed)
    torch.testing.assert_close(resized, upstream_mctformer.pos_embed(model, tokens, 224, 239))


def test_checkpoint_formats_and_mismatch_errors(tmp_path):
    model = random_model("v2", seed=0)
    state = model.state_dict()
    for wrapped in ({"model": state}, {"state_dict": state},
                    {f"module.{k}": v for k, v in state.items()}):
        path = tmp_path / "ckpt.pth"
        torch.save(wrapped, path)
        fresh = mctformer_v2(**TINY)
        load_checkpoint(fresh, path)
        assert torch.equal(fresh.pos_embed, model.pos_embed)
    broken = dict(state)
    del broken["blocks.0.attn.qkv.weight"]
    broken["head.weight"] = torch.zeros(21, 64, 3, 3)
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as info:
        load_checkpoint(mctformer_v2(**TINY), broken)
    message = str(info.value)
    assert "blocks.0.attn.qkv.weight" in message and "extra.weight" in message
    assert "head.weight: checkpoint (21, 64, 3, 3) vs model (20, 64, 3, 3)" in message
    with pytest.raises(FileNotFoundError):
        load_checkpoint(mctformer_v2(**TINY), tmp_path / "missing.pth")


def test_engine_rejects_bad_labels_and_images():
    engine = CamEngine(random_model("v1", seed=0), "mctformer_v1")
    with pytest.raises(ValueError, match="20 entries"):
        engine(random_image(64, 64, 0), np.ones(21))
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        engine(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="image 40×12 is too small for the model: the pass at "
                                         "1.0 is 40×12, less than one patch"):
        engine(random_image(12, 40, 0))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_streaming_affinity_equals_dense(version):
    model = random_model(version, seed=5)
    x = torch.randn(2, 3, 112, 144)
    dense = model.cam_maps(x)
    streaming = model.cam_maps(x, affinity="streaming")
    torch.testing.assert_close(streaming, dense, rtol=1e-4, atol=1e-6)


def test_engine_memory_cap_switches_to_streaming_with_the_same_cams():
    model = random_model("v2", seed=6)
    image, label = random_image(200, 260, 0), np.eye(20, dtype=np.float32)[4]
    uncapped = CamEngine(model, "mctformer_v2", scales=(1.0, 0.5))(image, label)
    calls = []
    original = model.cam_maps
    model.cam_maps = lambda x, **kw: calls.append(kw["affinity"]) or original(x, **kw)
    capped = CamEngine(model, "mctformer_v2", scales=(1.0, 0.5), max_affinity_mib=0.1)(image, label)
    assert calls == ["streaming", "dense"]  # 2×192² fp32 > 0.1 MiB; 2×48² fp32 is not
    torch.testing.assert_close(capped.high_res, uncapped.high_res, rtol=0, atol=1e-4)


def test_engine_bf16_autocast_stays_close_to_fp32():
    model = random_model("v2", seed=7)
    image, label = random_image(160, 224, 0), np.eye(20, dtype=np.float32)[[1, 9]].sum(0)
    fp32 = CamEngine(model, "mctformer_v2")(image, label).high_res
    bf16 = CamEngine(model, "mctformer_v2", dtype=torch.bfloat16)(image, label).high_res
    assert bf16.dtype == torch.float32
    for k in (1, 9):
        diff = (bf16[k] - fp32[k]).abs()
        correlation = np.corrcoef(bf16[k].flatten(), fp32[k].flatten())[0, 1]
        # bf16 matmuls (3 significant digits) on deliberately peaky random weights: different
        # (so autocast did run), but the same maps (seen: mean 0.02-0.03, correlation 0.98-0.99).
        assert 0 < diff.mean() < 0.05 and correlation > 0.95, (diff.mean(), correlation)


@pytest.mark.parametrize("max_affinity_mib", [None, 1e-6])   # dense, then streaming affinity
def test_engine_bf16_runs_the_attention_ops_on_bf16_blocks(monkeypatch, max_affinity_mib):
    """Autocast hands the ops bf16 q, k, v (the cpu face then picks bf16 GEMMs where the CPU
    has them): no block is widened to fp32 before attention."""
    seen = {"attention_stats": [], "propagate_streaming": []}

    def spy(name):
        real = getattr(ops, name)

        def wrapper(q, k, *args, **kwargs):
            seen[name].append((q.dtype, k.dtype))
            return real(q, k, *args, **kwargs)
        return wrapper

    for name in seen:
        monkeypatch.setattr(ops, name, spy(name))
    model = random_model("v2", seed=7)
    image, label = random_image(64, 96, 0), np.eye(20, dtype=np.float32)[[1, 9]].sum(0)
    CamEngine(model, "mctformer_v2", scales=(1.0,), dtype=torch.bfloat16,
              max_affinity_mib=max_affinity_mib)(image, label)
    # Dense: every block feeds the affinity; streaming: only the class-attention blocks do (the
    # others run plain SDPA, on bf16 too).
    calls = len(seen["attention_stats"])
    assert calls == model.depth if max_affinity_mib is None else 0 < calls < model.depth
    assert set(seen["attention_stats"]) == {(torch.bfloat16, torch.bfloat16)}
    assert set(seen["propagate_streaming"]) == (set() if max_affinity_mib is None
                                                else {(torch.bfloat16, torch.bfloat16)})


def test_global_ranking_pool_by_hand():
    logits = torch.tensor([[[1.0, 3.0, 2.0]]])
    w = [1.0, 0.996, 0.996 ** 2]
    expected = (3.0 * w[0] + 2.0 * w[1] + 1.0 * w[2]) / sum(w)
    assert global_ranking_pool(logits).item() == pytest.approx(expected, rel=1e-6)


def test_plus_checkpoint_keys_and_unresizable_sizes():
    model = mctformer_plus(**TINY)
    state = model.state_dict()
    assert state["pos_embed"].shape == (1, 197, 64)         # DeiT's, unused
    assert state["pos_embed_cls"].shape == (1, 20, 64)
    assert state["pos_embed_pat"].shape == (1, 784, 64)     # 448 training input
    assert state["head.weight"].shape == (20, 64, 3, 3)
    sizes = [(h, w) for h in range(16, 600, 16) for w in range(16, 600, 16)]
    failing = []
    for h, w in sizes:
        try:
            model.interpolate_pos_encoding(h, w)
        except ValueError as error:
            failing.append((h, w))
            assert "cannot resize" in str(error)
    expected_failing = []
    for h, w in sizes:
        out = torch.nn.functional.interpolate(torch.zeros(1, 1, 28, 28), mode="bicubic",
                                              scale_factor=(h // 16 / 28, w // 16 / 28))
        if out.shape[-2:] != (h // 16, w // 16):
            expected_failing.append((h, w))
    assert failing == expected_failing


def test_engine_batches_images_of_one_size_with_the_same_results():
    model = random_model("v2", seed=8)
    images = [random_image(120, 176, 0), random_image(96, 96, 1), random_image(120, 176, 2)]
    labels = [np.eye(20, dtype=np.float32)[i] for i in (1, 5, 9)]
    engine = CamEngine(model, "mctformer_v2", scales=(1.0, 0.5))
    calls = []
    original = model.cam_maps
    model.cam_maps = lambda x, **kw: calls.append(x.shape[0]) or original(x, **kw)
    batched = engine.extract(images, labels)
    assert calls == [4, 4, 2, 2]  # two 120x176 images (+ flips) share each forward
    model.cam_maps = original
    for image, label, result in zip(images, labels, batched):
        single = engine(image, label)
        assert list(result.keys) == list(single.keys)
        torch.testing.assert_close(result.high_res, single.high_res, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.low_res, single.low_res, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="2 label vectors for 3 images"):
        engine.extract(images, labels[:2])
