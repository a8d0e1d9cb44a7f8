"""AffinityNet (wsss_fast.models.affinitynet): PSA's ``resnet38_aff.Net`` checkpoint layout,
parameter counts, taps and strides, the embedding head and the pair affinities against
restatements of PSA's computation (reference/affinity_networks.md §2.1, §5.3)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import randomize_batchnorm
from wsss_fast.models.affinitynet import (AffinityNet, affinitynet, affinitynet_tiny,
                                          pair_affinity)
from wsss_fast.models.registry import create_model, model_preset
from wsss_fast.train.affinity import psa_loss, psa_pairs, psa_targets

KEYS = Path(__file__).parent / "data" / "upstream_keys" / "psa_resnet38_aff.json"


def test_state_dict_is_psa_resnet38_aff_layout():
    """The expected keys and shapes were written by a scratch script (outside the repository)
    that built PSA's ``network/resnet38_aff.Net()`` from jiwoon-ahn/psa@9493e59 on CPU; see the
    file's ``source`` field."""
    layout = json.loads(KEYS.read_text())
    expected = {key: tuple(shape) for key, shape in layout["keys"]}
    assert "f9.weight" in expected and "b4_5.conv_branch2b1.weight" in expected
    with torch.device("meta"):
        model = affinitynet()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_parameter_counts_and_groups():
    with torch.device("meta"):
        model = affinitynet()
    backbone, head = model.trainable_parameters()
    assert sum(p.numel() for p in head["params"]) == 1_413_120          # §2.1
    assert sum(p.numel() for p in backbone["params"]) == 104_202_240   # b3…b7 conv weights
    assert (backbone["lr_scale"], head["lr_scale"]) == (1.0, 10.0)
    assert not model.conv1a.weight.requires_grad
    assert not model.b2_2.conv_branch2a.weight.requires_grad
    assert not model.bn7.weight.requires_grad and model.b3.conv_branch2a.weight.requires_grad
    assert model_preset("affinitynet") == "edam"


def test_finetune_regime_bn_eval_dropout_active():
    model = affinitynet_tiny(finetune=True).train()
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.b6.dropout_2b1.training and model.b7.dropout_2b2.training
    scratch = affinitynet_tiny().train()
    assert scratch.bn7.training and scratch.conv1a.weight.requires_grad


def test_taps_are_psa_forward_as_dict(gen):
    """conv4 / conv5: the BN-ReLU'd inputs of b5 / b6 (captured with hooks); conv6 = ReLU(bn7)."""
    model = randomize_batchnorm(affinitynet_tiny(), gen).eval()
    captured = {}
    model.b5.register_forward_pre_hook(lambda m, args: captured.update(b5=args[0]))
    model.b6.register_forward_pre_hook(lambda m, args: captured.update(b6=args[0]))
    model.b7.register_forward_hook(lambda m, args, out: captured.update(b7=out))
    x = torch.randn(2, 3, 48, 72, generator=gen)
    with torch.no_grad():
        conv4, conv5, conv6 = model.taps(x)
        assert torch.equal(conv4, F.relu(model.b5.bn_branch2a(captured["b5"])))
        assert torch.equal(conv5, F.relu(model.b6.bn_branch2a(captured["b6"])))
        assert torch.equal(conv6, F.relu(model.bn7(captured["b7"])))
    assert [tuple(t.shape[1:]) for t in (conv4, conv5, conv6)] == [(64, 6, 9), (128, 6, 9),
                                                                    (512, 6, 9)]
    with torch.no_grad():
        g = model(x)
        head = torch.cat([F.elu(model.f8_3(conv4)), F.elu(model.f8_4(conv5)),
                          F.elu(model.f8_5(conv6))], 1)
        assert torch.equal(g, F.elu(model.f9(head)))
    assert g.shape == (2, 112, 6, 9) and g.dtype == torch.float32


def test_published_size_stride_8(gen):
    model = affinitynet().eval()
    with torch.no_grad():
        g = model(torch.randn(1, 3, 40, 56, generator=gen))
    assert g.shape == (1, 448, 5, 7)


def restated_affinity(g, radius=5):
    """PSA resnet38_aff.forward: a = exp(−mean_c |g_from − g_to|) for the base-order offsets and
    the sources of rows [0, h − 4), columns [4, w − 4)."""
    _, _, h, w = g.shape
    rf = radius - 1
    offsets = [(0, x) for x in range(1, radius)]
    offsets += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius)
                if x * x + y * y < radius * radius]
    out = torch.empty(g.shape[0], len(offsets), (h - rf) * (w - 2 * rf), dtype=g.dtype)
    for o, (dy, dx) in enumerate(offsets):
        s = 0
        for y in range(h - rf):
            for x in range(rf, w - rf):
                out[:, o, s] = torch.exp(-(g[:, :, y, x] - g[:, :, y + dy, x + dx]).abs()
                                         .mean(dim=1))
                s += 1
    return out


def test_pair_affinity_equals_restatement(gen):
    g = torch.randn(2, 24, 10, 12, generator=gen)
    src, dst = psa_pairs(10, 12)
    ours = pair_affinity(g, src, dst)
    assert ours.shape == (2, 34, 6 * 4)
    assert torch.allclose(ours, restated_affinity(g), rtol=1e-6, atol=0)


def test_psa_training_step_trains_head_and_backbone(gen):
    model = affinitynet_tiny(finetune=True).train()
    images = torch.randn(2, 3, 96, 96, generator=gen)
    g = model(images)
    src, dst = psa_pairs(*g.shape[2:])
    label = torch.randint(0, 3, (2, 12, 12), generator=gen).to(torch.uint8)
    label[:, :, :2] = 255
    loss, terms = psa_loss(pair_affinity(g, src, dst), psa_targets(label))
    loss.backward()
    assert model.f9.weight.grad is not None and model.b3.conv_branch2a.weight.grad is not None
    assert model.conv1a.weight.grad is None and model.bn7.weight.grad is None
    assert torch.isfinite(loss) and set(terms) == {"bg", "fg", "neg"}


def test_registry_and_bad_input(gen):
    source = affinitynet_tiny()
    model = create_model("affinitynet_tiny", num_classes=20, checkpoint=source.state_dict())
    assert isinstance(model, AffinityNet) and torch.equal(model.f9.weight, source.f9.weight)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="head"):
        AffinityNet(head=(64, 128))
