"""IRNet (wsss_fast.models.irnet): IRN's checkpoint layout, parameter counts, strides and shapes,
the frozen backbone, MeanShift, the EdgeDisplacement inference helper and backbone loading
(reference/affinity_networks.md §1.1, §1.6, §1.7, §5.3)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import randomize_batchnorm
from wsss_fast.models.checkpoint import CheckpointMismatch, load_checkpoint
from wsss_fast.models.irnet import IrNet, drop_irn_loss_buffers, irn_tiny, resnet50_irn
from wsss_fast.models.registry import create_model, model_preset
from wsss_fast.models.resnet_cam import resnet50_cam, resnet_cam_tiny
from wsss_fast.train.affinity import irn_loss, irn_targets

KEYS = Path(__file__).parent / "data" / "upstream_keys" / "irn_affinity_displacement_loss.json"


def randomize(model, gen):
    """Non-trivial weights everywhere (GroupNorm affine included), running stats in the BNs."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return randomize_batchnorm(model, gen)


def test_state_dict_is_irn_affinity_displacement_loss_layout():
    """The expected keys and shapes were written by a scratch script (outside the repository)
    that built IRN's ``AffinityDisplacementLoss(PathIndex(10, (128, 128)))`` from
    jiwoon-ahn/irn@a2ece00 on CPU (``resnet50(pretrained=False)``) and dropped its path-index
    buffers ``path_indices*`` / ``disp_target``; see the file's ``source`` field."""
    layout = json.loads(KEYS.read_text())
    expected = {key: tuple(shape) for key, shape in layout["keys"]}
    assert len(expected) == 1035 and "fc_dp7.4.running_mean" in expected
    with torch.device("meta"):
        model = resnet50_irn()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_irn_checkpoint_with_path_buffers_loads_strictly(gen):
    source = randomize(irn_tiny(), gen)
    state = dict(source.state_dict())
    state["path_indices0"] = torch.zeros(2, 2, 13090, dtype=torch.int64)   # IRN's loss module
    state["disp_target"] = torch.zeros(1, 2, 152, 1)
    model = irn_tiny()
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.fc_edge6.weight, source.fc_edge6.weight)
    model = load_checkpoint(irn_tiny(), {"model": state}, remap=drop_irn_loss_buffers)
    assert torch.equal(model.fc_dp7[3].weight, source.fc_dp7[3].weight)
    state = drop_irn_loss_buffers(state)
    model = create_model("irn_tiny", checkpoint=state)       # architecture read from the weights
    assert torch.equal(model.mean_shift.running_mean, source.mean_shift.running_mean)
    with pytest.raises(CheckpointMismatch, match="shape conflicts"):   # architecture from weights
        create_model("irn_tiny", checkpoint=state, edge_channels=16)
    assert model_preset("resnet50_irn") == model_preset("irn_tiny") == "irn_cam"


def test_parameter_counts_of_the_published_size():
    with torch.device("meta"):
        model = resnet50_irn()
    groups = model.trainable_parameters()
    counts = [sum(p.numel() for p in g["params"]) for g in groups]
    assert counts == [125_409, 1_269_120]                      # boundary, displacement
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 1_394_529
    frozen = sum(p.numel() for p in model.resnet50.parameters())
    assert frozen == 23_508_032 and not any(p.requires_grad for p in model.resnet50.parameters())


@pytest.mark.parametrize("size", [(64, 96), (60, 70), (33, 50)])
def test_output_strides_and_shapes(gen, size):
    model = randomize(irn_tiny(), gen).eval()
    x = torch.randn(2, 3, *size, generator=gen)
    taps = model.taps(x)
    grid = [-(-s // 4) for s in size]
    s8 = [-(-g // 2) for g in grid]
    s16 = [-(-g // 2) for g in s8]
    assert [tuple(t.shape[1:]) for t in taps] == [
        (16, *grid), (64, *grid), (128, *s8), (256, *s16), (512, *s16)]
    edge, disp = model(x)
    assert edge.shape == (2, 1, *grid) and disp.shape == (2, 2, *grid)
    assert edge.dtype == disp.dtype == torch.float32


def test_published_size_strides(gen):
    model = resnet50_irn().eval()
    taps = model.taps(torch.randn(1, 3, 64, 64, generator=gen))
    assert [tuple(t.shape[1:]) for t in taps] == [
        (64, 16, 16), (256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 4, 4)]


def restated_forward(model, x):
    """IRN Net.forward from §1.1, written out with the functional ops and the model's weights."""
    r = model.resnet50
    x1 = r.maxpool(r.relu(r.bn1(r.conv1(x))))
    x2 = r.layer1(x1)
    x3 = r.layer2(x2)
    x4 = r.layer3(x3)
    x5 = r.layer4(x4)

    def unit(seq, t, scale=1):
        t = F.group_norm(seq[0](t), seq[1].num_groups, seq[1].weight, seq[1].bias, seq[1].eps)
        if scale > 1:   # GN before the upsample, ReLU after
            t = F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)
        return F.relu(t)
    h, w = x2.shape[2:]
    edges = [unit(model.fc_edge1, x1), unit(model.fc_edge2, x2),
             unit(model.fc_edge3, x3, 2)[..., :h, :w], unit(model.fc_edge4, x4, 4)[..., :h, :w],
             unit(model.fc_edge5, x5, 4)[..., :h, :w]]
    edge = model.fc_edge6(torch.cat(edges, 1))
    h8, w8 = x3.shape[2:]
    s8 = torch.cat([unit(model.fc_dp3, x3), unit(model.fc_dp4, x4, 2)[..., :h8, :w8],
                    unit(model.fc_dp5, x5, 2)[..., :h8, :w8]], 1)
    up = unit(model.fc_dp6, s8, 2)[..., :h, :w]
    t = torch.cat([unit(model.fc_dp1, x1), unit(model.fc_dp2, x2), up], 1)
    t = unit(model.fc_dp7, t)
    disp = model.fc_dp7[3](t)
    if not model.training:
        disp = disp - model.mean_shift.running_mean.view(1, 2, 1, 1)
    return edge, disp


def test_forward_equals_restatement(gen):
    model = randomize(irn_tiny(), gen).eval()
    model.mean_shift.running_mean.copy_(torch.tensor([0.3, -0.2]))
    x = torch.randn(2, 3, 52, 68, generator=gen)
    with torch.no_grad():
        for ours, ref in zip(model(x), restated_forward(model, x)):
            assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)


def test_meanshift_train_vs_eval(gen):
    model = randomize(irn_tiny(), gen)
    model.mean_shift.running_mean.copy_(torch.tensor([1.5, -0.5]))
    x = torch.randn(1, 3, 48, 48, generator=gen)
    with torch.no_grad():
        edge_train, disp_train = model.train()(x)
        edge_eval, disp_eval = model.eval()(x)
    assert torch.equal(edge_train, edge_eval)     # frozen backbone: same features in both modes
    shifted = disp_train - torch.tensor([1.5, -0.5]).view(1, 2, 1, 1)
    assert torch.allclose(disp_eval, shifted, atol=1e-6)
    assert "fc_dp7.4.running_mean" in model.state_dict()
    assert model.fc_dp7[4] is model.mean_shift


def test_frozen_backbone_gets_no_gradient_and_keeps_running_stats(gen):
    model = randomize(irn_tiny(), gen).train()
    assert not any(m.training for m in model.backbone.modules())
    assert all(m.training for m in model.edge_layers.modules())
    before = model.resnet50.bn1.running_mean.clone()
    images = torch.randn(2, 3, 96, 96, generator=gen)
    edge, disp = model(images)
    label = torch.randint(0, 3, (2, 96, 96), generator=gen)
    loss, _ = irn_loss(edge, disp, irn_targets(label))
    loss.backward()
    assert all(p.grad is None for p in model.resnet50.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for g in model.trainable_parameters() for p in g["params"])
    assert torch.equal(model.resnet50.bn1.running_mean, before)


def test_unfrozen_backbone_trains_with_the_heads(gen):
    model = irn_tiny(freeze_backbone=False).train()
    assert model.resnet50.bn1.training
    groups = model.trainable_parameters()
    assert len(groups) == 3 and groups[2]["lr_scale"] == 1.0
    edge, disp = model(torch.randn(2, 3, 64, 64, generator=gen))
    (edge.sum() + disp.sum()).backward()
    assert model.resnet50.conv1.weight.grad is not None


def restated_edge_displacement(model, image, size):
    """IRN EdgeDisplacement.forward (§1.7) on the stacked image and flip."""
    h, w = image.shape[1:]
    pair = F.pad(torch.stack([image, image.flip(-1)]), [0, size - w, 0, size - h])
    edge, disp = model(pair)
    fh, fw = (h - 1) // 4 + 1, (w - 1) // 4 + 1
    edge, disp = edge[..., :fh, :fw], disp[..., :fh, :fw]
    return torch.sigmoid(edge[0] / 2 + edge[1].flip(-1) / 2), disp[0]


@pytest.mark.parametrize("size", [(45, 70), (64, 64), (33, 50)])
def test_edge_and_displacement_equals_restatement(gen, size):
    model = randomize(irn_tiny(), gen)
    model.mean_shift.running_mean.copy_(torch.tensor([0.25, 0.5]))
    image = torch.randn(3, *size, generator=gen)
    model.train()
    edge, disp = model.edge_and_displacement(image, size=80)
    assert model.training                                   # mode restored
    with torch.no_grad():
        ref_edge, ref_disp = restated_edge_displacement(model.eval(), image, 80)
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    assert edge.shape == (1, h, w) and disp.shape == (2, h, w)
    assert torch.equal(edge, ref_edge) and torch.equal(disp, ref_disp)


def test_edge_and_displacement_shapes_at_the_published_padding(gen):
    """§5.3: a 333×500 image → (1, 84, 125) and (2, 84, 125); size=None pads to 16."""
    model = irn_tiny()
    image = torch.randn(1, 3, 333, 500, generator=gen)
    edge, disp = model.edge_and_displacement(image)
    assert edge.shape == (1, 84, 125) and disp.shape == (2, 84, 125)
    assert ((edge > 0) & (edge < 1)).all()
    edge, disp = model.edge_and_displacement(image[0, :, :40, :50], size=None)
    assert edge.shape == (1, 10, 13)
    with pytest.raises(ValueError, match="exceeds the padded size"):
        model.edge_and_displacement(torch.zeros(3, 600, 100))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model.edge_and_displacement(torch.zeros(2, 3, 40, 40))


def test_load_backbone_from_a_cam_classifier(gen):
    # IRN's strides: resnet_cam_tiny's default output stride is 8, IRNet's trunk keeps IRN's 16
    # (the same weights then give features at another stride; only the copy is tested here).
    classifier = randomize(resnet_cam_tiny(num_classes=5, strides=(2, 2, 2, 1)), gen)
    model = irn_tiny()
    report = model.load_backbone({"model": classifier.state_dict()})
    assert report.loaded == len(model.resnet50.state_dict())
    assert report.skipped == ("classifier.weight", "newly_added.0.weight")
    for key, value in classifier.resnet50.state_dict().items():
        assert torch.equal(model.resnet50.state_dict()[key], value), key
    x = torch.randn(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        assert torch.allclose(model.eval().taps(x)[-1], classifier.eval().features(x))


def test_load_backbone_is_strict_about_what_it_maps():
    with torch.device("meta"):
        big = resnet50_cam(num_classes=20).state_dict()
    with pytest.raises(CheckpointMismatch, match="shape conflicts|unexpected"):
        irn_tiny().load_backbone(big)
    with pytest.raises(CheckpointMismatch, match="missing"):
        irn_tiny().load_backbone({"classifier.weight": torch.zeros(20, 512, 1, 1)})


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        irn_tiny()(torch.zeros(1, 4, 32, 32))
    assert isinstance(create_model("irn_tiny", num_classes=20), IrNet)
