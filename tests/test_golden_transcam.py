"""TransCAM (Conformer) against the official generator's golden outputs, and the fused CAM path
against an eager, attention-materializing computation.

Golden: tests/data/golden/transcam (liruiwen/TransCAM @4ffe693, ``infer_TransCAM.py --method
transcam`` with a tiny random-weight ``network.conformer.Net``); see its README.
"""


import numpy as np
import pytest
import torch

from tests.golden import golden_path
from tests.helpers import assert_rel_close
from wsss_fast.engine import CamEngine
from wsss_fast.models import CheckpointMismatch, load_checkpoint
from wsss_fast.models.conformer import Conformer, transcam_golden_tiny, transcam_small
from wsss_fast.ops import cpu_extension_available, multiscale_merge

NAMES = ("2008_000101", "2008_000102", "2008_000103")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def golden_weights() -> str:
    return golden_path("transcam", "weights_tiny.pth")


FACES = ["reference"] + (["cpu"] if cpu_extension_available() else [])


@pytest.fixture(scope="module")
def golden_model():
    model = transcam_golden_tiny()
    load_checkpoint(model, golden_weights(), strict=True)
    return model.eval()


def _normalize(img):
    """tool/imutils.py ``Normalize``: per channel ``(uint8 / 255. - mean) / std`` in float64,
    stored into a float32 HWC array."""
    arr = np.asarray(img)
    out = np.empty_like(arr, np.float32)
    for c in range(3):
        out[..., c] = (arr[..., c] / 255. - MEAN[c]) / STD[c]
    return out


def _generate_transcam(model, path, label):
    """infer_TransCAM.py (method transcam) with voc12/data.py ``VOC12ClsDatasetMSF``: square
    256/512/768 bicubic resizes, each followed by its horizontal flip; per pass ``cam[:, 1:]``;
    upsample to the original size, label mask, flip back, sum, TransCAM normalization."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    width, height = img.size
    maps, flips = [], []
    for size in (256, 512, 768):
        chw = _normalize(img.resize((size, size), resample=Image.BICUBIC)).transpose(2, 0, 1)
        batch = torch.from_numpy(np.stack([chw, chw[:, :, ::-1]]).copy())   # pass, flipped pass
        with torch.no_grad():
            cam = model.cam_maps(batch)[:, 1:]
        maps += [cam[0:1], cam[1:2]]
        flips += [False, True]
    labels = torch.from_numpy(label)[None]
    merged = multiscale_merge(maps, (height, width), flips=flips, labels=labels, merge="sum",
                              norm="transcam")[0]
    return {int(i): merged[i].numpy() for i in np.nonzero(label > 1e-5)[0]}


def test_state_dict_matches_official_keys():
    official = torch.load(golden_weights(), map_location="cpu", weights_only=True)
    ours = transcam_golden_tiny().state_dict()
    assert len(official) == 364
    assert list(ours) == list(official)
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
           {k: tuple(v.shape) for k, v in official.items()}
    small = transcam_small().state_dict()
    assert small["conv_cls_head.weight"].shape == (21, 1024, 3, 3)
    assert small["trans_cls_head.weight"].shape == (21, 384)
    assert "conv_trans_12.fusion_block.residual_conv.weight" in small


@pytest.mark.parametrize("name", NAMES)
def test_golden_transcam_cams(golden_model, name):
    labels = np.load(golden_path("images", "labels.npy"), allow_pickle=True).item()
    label = labels[name].astype(np.float32)
    official = np.load(golden_path("transcam", "official_cam", name + ".npy"),
                       allow_pickle=True).item()
    ours = _generate_transcam(golden_model,
                              golden_path("images", "JPEGImages", name + ".jpg"), label)
    assert set(official) == set(int(i) for i in np.nonzero(label)[0]) == set(ours)
    for cls, expected in official.items():
        assert ours[cls].shape == expected.shape, (name, cls)
        err = float(np.abs(ours[cls].astype(np.float64) - expected.astype(np.float64)).max())
        assert err <= 1e-4, f"{name} class {cls}: max abs error {err:.3g}"
    if name == "2008_000101":       # the all-≤0 class: upstream's quirks give a constant −1
        assert np.all(official[12] == -1.0)
        np.testing.assert_allclose(ours[12], -1.0, rtol=0, atol=1e-6)


def _eager_cam(model, x, layers=None):
    """A*·M with each block's attention materialized from its own qkv weights (hooks capture the
    block inputs and the conv head output of a stats-free forward); ``layers``: the block indices
    summed into A* (None: all)."""
    inputs, head = [], []
    handles = [blk.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
               for blk in model.blocks()]
    handles.append(model.conv_cls_head.register_forward_hook(
        lambda mod, args, out: head.append(out)))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    assert len(inputs) == model.depth and len(head) == 1
    affinity = 0
    for index, (blk, tokens) in enumerate(zip(model.blocks(), inputs)):
        if layers is not None and index not in layers:
            continue
        b, t, dim = tokens.shape
        heads = blk.attn.num_heads
        qkv = torch.nn.functional.linear(blk.norm1(tokens).double(), blk.attn.qkv.weight.double(),
                                         blk.attn.qkv.bias.double())
        q, k, _ = qkv.reshape(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1)
        affinity = affinity + attn.mean(dim=1)[:, 1:, 1:]
    m = head[0].double()
    n, c, h, w = m.shape
    cam = torch.einsum("npq,ncq->ncp", affinity, m.flatten(2)).reshape(n, c, h, w)
    return logits, cam.float()


@pytest.mark.parametrize("face", FACES)
def test_fused_cam_equals_materialized(face, gen, monkeypatch):
    monkeypatch.setenv("WSSS_FAST_BACKEND", face)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = Conformer(patch_size=16, num_classes=21, base_channel=16, channel_ratio=1,
                      embed_dim=32, depth=6, num_heads=2, mlp_ratio=2, qkv_bias=True).eval()
    with torch.no_grad():
        for blk in model.blocks():      # peaky attention, so that A* is far from uniform
            blk.attn.qkv.weight.normal_(0, 0.3, generator=gen)
        model.cls_token.normal_(0, 0.3, generator=gen)
        for m in model.modules():       # non-trivial BatchNorm statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
        model.conv_cls_head.bias.normal_(0.5, 0.2, generator=gen)
    # non-square, not a multiple of 16 (ceil(94/4) = 24, ceil(157/4) = 40): a 6×10 token grid
    x = torch.randn(2, 3, 94, 157, generator=gen)
    with torch.no_grad():
        (conv_ref, trans_ref), cam_ref = _eager_cam(model, x)
        conv_logits, trans_logits, cam = model.forward_cam(x)
        cam_only = model.cam_maps(x)
    assert cam.shape == (2, 21, 6, 10) and cam.dtype == torch.float32
    assert_rel_close(cam, cam_ref, 1e-5, what="A*·M")
    assert torch.equal(cam_only, cam)
    assert_rel_close(conv_logits, conv_ref, 1e-5, what="conv logits with/without stats")
    assert_rel_close(trans_logits, trans_ref, 1e-5, what="trans logits with/without stats")
    # Ablations: A* of chosen blocks only (last 2 = blocks 4, 5), and M alone.
    with torch.no_grad():
        _, cam_some_ref = _eager_cam(model, x, layers={0, 2})
        assert_rel_close(model.cam_maps(x, layers=[0, 2]), cam_some_ref, 1e-5, what="A*[0,2]·M")
        _, cam_last_ref = _eager_cam(model, x, layers={4, 5})
        assert_rel_close(model.cam_maps(x, layers=2), cam_last_ref, 1e-5, what="A*[-2:]·M")
        head = []
        handle = model.conv_cls_head.register_forward_hook(lambda mod, a, out: head.append(out))
        try:
            m_alone = model.cam_maps(x, refine=False)
        finally:
            handle.remove()
    assert torch.equal(m_alone, head[0].float()) and not torch.allclose(m_alone, cam)


def test_cam_is_differentiable(gen):
    """Under autograd (BNR training) the CAM carries gradients to the conv head and the qkv
    weights, and equals the no-grad value."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = Conformer(patch_size=16, num_classes=21, base_channel=16, channel_ratio=1,
                      embed_dim=32, depth=3, num_heads=2, mlp_ratio=2).eval()
    x = torch.randn(1, 3, 64, 48, generator=gen)
    cam = model.cam_maps(x)
    cam.square().sum().backward()
    assert model.conv_cls_head.weight.grad.abs().sum() > 0
    assert model.trans_1.attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert_rel_close(model.cam_maps(x), cam.detach(), 1e-5, what="grad vs no-grad CAM")


def test_unsupported_size_raises():
    model = transcam_golden_tiny().eval()
    with pytest.raises(ValueError, match="not supported"):
        model.cam_maps(torch.zeros(1, 3, 100, 64))      # ceil(100/4) = 25, not a multiple of 4
    assert model.token_grid(253, 256) == (16, 16)


def test_checkpoint_mismatch_names_the_key():
    state = torch.load(golden_weights(), map_location="cpu", weights_only=True)
    missing = dict(state)
    del missing["conv_trans_4.squeeze_block.ln.weight"]
    with pytest.raises(CheckpointMismatch, match=r"conv_trans_4\.squeeze_block\.ln\.weight"):
        load_checkpoint(transcam_golden_tiny(), missing)
    wrong = dict(state)
    wrong["conv_cls_head.weight"] = torch.zeros(20, 256, 3, 3)
    with pytest.raises(CheckpointMismatch, match=r"conv_cls_head\.weight"):
        load_checkpoint(transcam_golden_tiny(), wrong)
    extra = dict(state)
    extra["pos_embed"] = torch.zeros(1, 197, 64)
    with pytest.raises(CheckpointMismatch, match="pos_embed"):
        load_checkpoint(transcam_golden_tiny(), extra)
    # the Conformer-S checkpoint does not fit the tiny model
    with pytest.raises(CheckpointMismatch, match=r"cls_token: checkpoint \(1, 1, 384\)"):
        load_checkpoint(transcam_golden_tiny(), transcam_small().state_dict())


def test_engine_transcam_preset_reproduces_golden(golden_model):
    """The same generator through CamEngine's "transcam" preset (square 256/512/768 + flips)."""
    labels = np.load(golden_path("images", "labels.npy"), allow_pickle=True).item()
    engine = CamEngine(golden_model, "transcam")
    for name in NAMES:
        ours = engine(golden_path("images", "JPEGImages", name + ".jpg"),
                      labels[name]).as_dict()
        official = np.load(golden_path("transcam", "official_cam", name + ".npy"),
                           allow_pickle=True).item()
        assert sorted(ours) == sorted(official)
        for cls, expected in official.items():
            np.testing.assert_allclose(ours[cls], expected, rtol=0, atol=1e-4,
                                       err_msg=f"{name} class {cls}")
