"""IRN's ResNet-50 CAM classifier and EDAM: checkpoint layouts, strides, CAM definitions, the
"irn_cam" / "edam" presets against restatements of IRN ``step/make_cam.py`` and EDAM
``infer_cls.py``, the DA layer and CMA against upstream's code path, and the training losses
(reference/cnn_methods_postprocessing.md §1.1, §2)."""

import math

import PIL.Image
import pytest
import torch
import torch.nn.functional as F

import wsss_fast  # noqa: F401  (installs the torchvision shim first)
import torchvision
from wsss_fast.engine import CamEngine
from wsss_fast.models.edam import Edam, edam, edam_tiny
from wsss_fast.models.registry import create_model
from wsss_fast.models.resnet_cam import resnet50_cam, resnet_cam_tiny
from wsss_fast.train.cnn_methods import (edam_loss, edam_warm_loss, irn_cam_loss,
                                        pair_by_shared_class)

from tests.helpers import (assert_rel_close, random_image, randomize_batchnorm,
                           upstream_normalize, upstream_rescale)

SCALES = (1.0, 0.5, 1.5, 2.0)


# ---------------------------------------------------------------------------------------------
# resnet50_cam


def irn_key_aliases(torchvision_keys):
    """The extra keys of IRN's ``Net``: stage1 = (conv1, bn1, relu, maxpool, layer1),
    stage2..4 = (layer2..4,), backbone = [stage1..4], newly_added = [classifier]."""
    stage_of = {"conv1": "stage1.0", "bn1": "stage1.1", "layer1": "stage1.4",
                "layer2": "stage2.0", "layer3": "stage3.0", "layer4": "stage4.0"}
    keys = set()
    for key in torchvision_keys:
        head, rest = key.split(".", 1)
        stage = stage_of[head]
        keys.add(f"{stage}.{rest}")
        index = int(stage[5]) - 1
        keys.add(f"backbone.{index}.{stage.split('.', 1)[1]}.{rest}")
    return keys | {"newly_added.0.weight", "classifier.weight"}


def test_resnet50_cam_keys_are_torchvision_resnet50_plus_irn_layout():
    with torch.device("meta"):
        model = resnet50_cam(num_classes=20)
        reference = torchvision.models.resnet50()
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    state = model.state_dict()
    trunk = {k[len("resnet50."):]: v.shape for k, v in state.items() if k.startswith("resnet50.")}
    assert trunk == expected
    others = {k for k in state if not k.startswith("resnet50.")}
    assert others == irn_key_aliases(expected)
    assert state["classifier.weight"].shape == (20, 2048, 1, 1)
    assert state["stage1.4.0.conv1.weight"].shape == expected["layer1.0.conv1.weight"]


def test_torchvision_resnet50_weights_give_irn_features(gen):
    """A torchvision ResNet-50 state dict (minus fc) initializes the trunk; with layer4's stride
    set to 1 (IRN's strides 2, 2, 2, 1) torchvision's forward is the reference."""
    reference = randomize_batchnorm(torchvision.models.resnet50(), gen).eval()
    model = resnet50_cam(num_classes=3).eval()
    model.resnet50.load_state_dict({k: v for k, v in reference.state_dict().items()
                                    if not k.startswith("fc.")})
    reference.layer4[0].conv2.stride = (1, 1)
    reference.layer4[0].downsample[0].stride = (1, 1)
    trunk = torch.nn.Sequential(*list(reference.children())[:-2])
    x = torch.randn(1, 3, 67, 50, generator=gen)
    with torch.no_grad():
        assert_rel_close(model.features(x), trunk(x), rtol=1e-5, what="layer4 features")


def test_irn_state_dict_loads_through_the_registry(gen):
    source = randomize_batchnorm(resnet_cam_tiny(num_classes=7, layers=(1, 2, 1, 1)), gen).eval()
    loaded = create_model("resnet_cam_tiny", checkpoint=source.state_dict()).eval()
    assert loaded.num_classes == 7 and len(loaded.resnet50.layer2) == 2
    x = torch.randn(2, 3, 64, 48, generator=gen)
    torch.testing.assert_close(loaded.cam_maps(x), source.cam_maps(x), rtol=0, atol=0)


def test_output_stride_is_16_and_the_tiny_models_8():
    with torch.device("meta"):
        full = resnet50_cam()
        assert full.features(torch.empty(1, 3, 513, 385)).shape == (1, 2048, 33, 25)
    assert full.grid(513, 385) == (33, 25)
    tiny = resnet_cam_tiny(num_classes=3).eval()
    assert tiny.features(torch.zeros(1, 3, 97, 80)).shape[-2:] == (13, 10) == tiny.grid(97, 80)
    irn_strides = resnet_cam_tiny(num_classes=3, strides=(2, 2, 2, 1)).eval()
    assert irn_strides.features(torch.zeros(1, 3, 97, 80)).shape[-2:] == (7, 5) == \
        irn_strides.grid(97, 80)


def test_cam_is_relu_of_classifier_on_features_and_logits_are_gap(gen):
    model = randomize_batchnorm(resnet_cam_tiny(num_classes=5), gen).eval()
    x = torch.randn(2, 3, 80, 64, generator=gen)
    with torch.no_grad():
        features = model.features(x)
        raw = torch.einsum("kc,bchw->bkhw", model.classifier.weight[:, :, 0, 0], features)
        logits = model(x)
    assert (raw < 0).any() and (raw > 0).any()
    torch.testing.assert_close(model.cam_maps(x), raw.clamp_min(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, raw.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_finetune_regime_fixes_batchnorm_and_stops_gradients_before_layer3(gen):
    model = randomize_batchnorm(resnet_cam_tiny(num_classes=4, finetune=True), gen).train()
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not model.resnet50.conv1.weight.requires_grad
    x = torch.randn(2, 3, 64, 64, generator=gen)
    model(x).sum().backward()
    assert model.resnet50.layer2[0].conv1.weight.grad is None
    assert model.resnet50.layer3[0].conv1.weight.grad.abs().sum() > 0
    assert all(m.training for m in resnet_cam_tiny().train().modules())


def irn_make_cam(model, image: PIL.Image.Image, labels):
    """IRN step/make_cam.py for one image: CAM.forward per scale (ReLU, then image + flipped
    image at feature resolution), 'cam' = Σ bilinear to ⌈H/4⌉×⌈W/4⌉, 'high_res' = Σ bilinear to
    16⌈H/16⌉×16⌈W/16⌉ cropped to H×W, valid classes divided by their max + 1e-5."""
    width, height = image.size
    strided_size = ((height - 1) // 4 + 1, (width - 1) // 4 + 1)
    strided_up_size = (((height - 1) // 16 + 1) * 16, ((width - 1) // 16 + 1) * 16)
    outputs = []
    with torch.no_grad():
        for scale in SCALES:
            x = upstream_normalize(upstream_rescale(image, scale))
            cam = F.relu(F.conv2d(model.features(torch.stack([x, x.flip(-1)])),
                                  model.classifier.weight))
            outputs.append(cam[0] + cam[1].flip(-1))
    strided = torch.sum(torch.stack([F.interpolate(o[None], strided_size, mode="bilinear",
                                                   align_corners=False)[0] for o in outputs]), 0)
    high_res = torch.sum(torch.stack([F.interpolate(o[:, None], strided_up_size, mode="bilinear",
                                                    align_corners=False) for o in outputs]), 0)
    high_res = high_res[:, 0, :height, :width]
    valid = torch.nonzero(torch.as_tensor(labels))[:, 0]
    strided = strided[valid] / (F.adaptive_max_pool2d(strided[valid], (1, 1)) + 1e-5)
    high_res = high_res[valid] / (F.adaptive_max_pool2d(high_res[valid], (1, 1)) + 1e-5)
    return valid, strided, high_res


@pytest.fixture(scope="module")
def irn_model():
    gen = torch.Generator().manual_seed(5)
    model = randomize_batchnorm(resnet_cam_tiny(num_classes=6), gen).eval()
    with torch.no_grad():  # mostly positive weights: non-negative features give non-zero CAMs
        model.classifier.weight.copy_(0.04 * torch.rand(model.classifier.weight.shape,
                                                        generator=gen) - 0.015)
        model.classifier.weight[2] *= 1e-5  # a faint class, whose maximum is near IRN's 1e-5
    return model


@pytest.mark.parametrize("size", [(112, 80), (101, 75)])
def test_irn_cam_preset_stride4_cam_matches_irn_make_cam(irn_model, gen, size):
    image = PIL.Image.fromarray(random_image(gen, size[1], size[0]))
    labels = [1, 0, 1, 0, 0, 1]
    valid, expected_cam, expected_high = irn_make_cam(irn_model, image, labels)
    result = CamEngine(irn_model, "irn_cam")(image, labels)
    assert result.keys.tolist() == valid.tolist()
    assert_rel_close(result.low_res[valid], expected_cam, rtol=1e-5, what="cam")
    if size[0] % 16 == 0 and size[1] % 16 == 0:  # no crop: the two resize orders coincide
        assert_rel_close(result.high_res[valid], expected_high, rtol=1e-5, what="high_res")


def test_irn_cam_preset_high_res_matches_irn_make_cam_at_any_size(irn_model, gen):
    image = PIL.Image.fromarray(random_image(gen, 75, 101))
    labels = [1, 0, 1, 0, 0, 1]
    valid, _, expected_high = irn_make_cam(irn_model, image, labels)
    result = CamEngine(irn_model, "irn_cam")(image, labels)
    assert_rel_close(result.high_res[valid], expected_high, rtol=1e-5, what="high_res")


# ---------------------------------------------------------------------------------------------
# EDAM


def resnet38_keys(blocks=(3, 3, 6, 3)):
    """PSA's resnet38d.Net key names (as written by its MXNet converter)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1a.weight"} | {f"bn7.{p}" for p in bn}
    for stage, count in zip(range(2, 6), blocks):
        for index in range(count):
            name = f"b{stage}" if index == 0 else f"b{stage}_{index}"
            keys |= {f"{name}.{layer}.{p}" for layer in ("bn_branch2a", "bn_branch2b1") for p in bn}
            keys |= {f"{name}.conv_branch2a.weight", f"{name}.conv_branch2b1.weight"}
            if index == 0:
                keys.add(f"{name}.conv_branch1.weight")
    for name in ("b6", "b7"):
        keys |= {f"{name}.{layer}.{p}" for layer in ("bn_branch2a", "bn_branch2b1", "bn_branch2b2")
                 for p in bn}
        keys |= {f"{name}.conv_branch{b}.weight" for b in ("1", "2a", "2b1", "2b2")}
    return keys


def test_edam_keys_are_resnet38_plus_edam_heads():
    with torch.device("meta"):
        model = edam(num_classes=20)
    state = model.state_dict()
    block = {f"attention.linear_layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    block |= {f"attention.output_linear.{p}" for p in ("weight", "bias")}
    block |= {f"feed_forward.w_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    block |= {f"{s}_sublayer.norm.{p}" for s in ("input", "output") for p in ("a_2", "b_2")}
    heads = {"mask_layer.weight", "d_d.weight", "embedding.position.pe", "embedding.segment.weight"}
    heads |= {f"trans_list.{c}.0.{k}" for c in range(20) for k in block}
    heads |= {f"fc_list.{c}.weight" for c in range(20)}
    assert set(state) == resnet38_keys() | heads
    shapes = {"conv1a.weight": (64, 3, 3, 3), "b5.conv_branch1.weight": (1024, 512, 1, 1),
              "b7.conv_branch2b2.weight": (4096, 2048, 1, 1), "bn7.weight": (4096,),
              "mask_layer.weight": (21, 4096, 3, 3), "d_d.weight": (128, 4096, 1, 1),
              "embedding.position.pe": (1, 46 * 46, 128), "embedding.segment.weight": (5, 128),
              "trans_list.3.0.feed_forward.w_1.weight": (512, 128), "fc_list.19.weight":
              (1, 128, 1, 1)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert model.features(torch.empty(1, 3, 368, 368, device="meta")).shape == (1, 4096, 46, 46)


def resnet38_conv6(state, x, dilations=(2, 4, 4)):
    """PSA resnet38d.forward (EDAM: no final ReLU), eval mode, from the state dict alone; the
    dilations of b5, b6, b7 (PSA: 2, 4, 4)."""
    def bn(name, t):
        return F.batch_norm(t, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    def conv(name, t, stride=1, dilation=1):
        weight = state[f"{name}.weight"]
        padding = dilation * (weight.shape[-1] // 2)
        return F.conv2d(t, weight, stride=stride, padding=padding, dilation=dilation)

    x = conv("conv1a", x)
    names = sorted({k.split(".")[0] for k in state if k[:2] in ("b2", "b3", "b4", "b5")},
                   key=lambda n: (int(n[1]), int(n[3:] or 0)))
    for name in names:
        stage, first = int(name[1]), "_" not in name
        stride = 2 if first and stage < 5 else 1
        dilation = dilations[0] if stage == 5 else 1
        branch2 = F.relu(bn(f"{name}.bn_branch2a", x))
        branch1 = conv(f"{name}.conv_branch1", branch2, stride) if first else x
        branch2 = conv(f"{name}.conv_branch2a", branch2, stride, 1 if first else dilation)
        branch2 = conv(f"{name}.conv_branch2b1", F.relu(bn(f"{name}.bn_branch2b1", branch2)),
                       dilation=dilation)
        x = branch1 + branch2
    for name, dilation in zip(("b6", "b7"), dilations[1:]):
        branch2 = F.relu(bn(f"{name}.bn_branch2a", x))
        branch1 = conv(f"{name}.conv_branch1", branch2)
        branch2 = conv(f"{name}.conv_branch2a", branch2)
        branch2 = conv(f"{name}.conv_branch2b1", F.relu(bn(f"{name}.bn_branch2b1", branch2)),
                       dilation=dilation)
        branch2 = conv(f"{name}.conv_branch2b2", F.relu(bn(f"{name}.bn_branch2b2", branch2)))
        x = branch1 + branch2
    return bn("bn7", x)


@pytest.mark.parametrize("dilations", [(2, 4, 4), (1, 1, 1), (1, 2, 3)])
def test_resnet38_backbone_matches_psa_forward(gen, dilations):
    model = randomize_batchnorm(edam_tiny(num_classes=2, blocks=(2, 1, 2, 2),
                                          dilations=dilations), gen).eval()
    x = torch.randn(2, 3, 45, 38, generator=gen)
    with torch.no_grad():
        assert_rel_close(model.features(x), resnet38_conv6(model.state_dict(), x, dilations),
                         rtol=1e-5, what="conv6")


def test_published_edam_keeps_resnet38_dilations():
    model = edam(num_classes=2)
    assert (model.b5.conv_branch2b1.dilation, model.b6.conv_branch2b1.dilation,
            model.b7.conv_branch2b1.dilation) == ((2, 2), (4, 4), (4, 4))
    assert model.b5.conv_branch2a.dilation == (1, 1)     # resnet38d: first_dilation=1


def receptive_field(model, size: int = 256) -> int:
    """Side of the input region one central conv6 pixel depends on (nonzero input gradient)."""
    x = torch.randn(1, 3, size, size, requires_grad=True)
    centre = model.grid(size, size)[0] // 2
    model.eval().features(x)[0, :, centre, centre].sum().backward()
    rows = x.grad[0].abs().sum(0).sum(1).nonzero()
    return int(rows.max() - rows.min() + 1)


def test_edam_tiny_receptive_field_fits_the_synthetic_images():
    """The tiny model's undilated b5-b7 (TINY_DILATIONS) see 109 px of a 96-160 px image; with
    ResNet-38's dilations 2, 4, 4 a conv6 pixel sees 221 px, the whole image."""
    torch.manual_seed(0)
    assert receptive_field(edam_tiny(num_classes=2)) == 109
    assert receptive_field(edam_tiny(num_classes=2, dilations=(2, 4, 4))) == 221


@pytest.mark.parametrize("dilations", [(0, 1, 1), (1, 2)])
def test_edam_rejects_bad_dilations(dilations):
    with pytest.raises(ValueError, match="dilations"):
        edam_tiny(num_classes=2, dilations=dilations)


def test_edam_finetune_regime_freezes_stem_b2_and_batchnorm():
    model = edam_tiny(num_classes=2, blocks=(2, 1, 1, 1), finetune=True).train()
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not any(m.training for m in batchnorms)
    assert not any(p.requires_grad for m in batchnorms for p in m.parameters())
    frozen_convs = {name.split(".")[0] for name, p in model.named_parameters()
                    if not p.requires_grad and ".conv" in f".{name}"}
    assert frozen_convs == {"conv1a", "b2", "b2_1"}
    assert model.b7.dropout_2b1.training and model.trans_list[0][0].dropout.training


def test_edam_new_layers_train_at_ten_times_the_lr_as_upstream():
    """train_EDAM_cls.py's groups: mask_layer, d_d and the class heads at 10× the base lr, the
    trunk, CMA transformers and embedding at 1×; the trainer's AdamW groups keep those scales
    and split weight decay inside each; a step moves the new layers 10× as far."""
    from wsss_fast.train.trainer import parameter_groups
    model = edam_tiny(num_classes=2, finetune=True)
    rest, new = model.trainable_parameters()
    new_names = {n.split(".")[0] for n, p in model.named_parameters()
                 if any(p is q for q in new["params"])}
    assert new_names == {"mask_layer", "d_d", "fc_list"} and new["lr_scale"] == 10.0
    assert rest["lr_scale"] == 1.0 and len(rest["params"]) + len(new["params"]) == len(
        [p for p in model.parameters() if p.requires_grad])
    assert not any(p is q for p in rest["params"] for q in model.conv1a.parameters())
    groups = parameter_groups(model, 0.05, scaled=True)
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [
        (1.0, 0.05), (1.0, 0.0), (10.0, 0.05)]          # the new layers have no bias or norm
    assert sum(len(g["params"]) for g in groups) == len(rest["params"]) + len(new["params"])
    assert len(parameter_groups(model, 0.05)) == 2      # unscaled (pretraining): as before
    assert edam_tiny(num_classes=2, new_layer_lr_scale=1).trainable_parameters()[1][
        "lr_scale"] == 1.0
    with pytest.raises(ValueError, match="new_layer_lr_scale"):
        edam_tiny(num_classes=2, new_layer_lr_scale=0)

    # One SGD step with the group scales as the trainer sets them (lr × lr_scale): the same
    # gradient moves the DA layer 10× as far as it would at the base lr.
    torch.manual_seed(0)
    model = edam_tiny(num_classes=2)
    before = model.mask_layer.weight.detach().clone()
    optimizer = torch.optim.SGD([{**g, "lr": 1e-3 * g["lr_scale"]}
                                 for g in parameter_groups(model, 0.0, scaled=True)], lr=1e-3)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    edam_loss(model, images, labels)[0].backward()
    grad = model.mask_layer.weight.grad.clone()
    optimizer.step()
    assert torch.allclose(model.mask_layer.weight - before, -1e-2 * grad, atol=1e-8)


def test_edam_warm_loss_is_the_plain_cam_loss_of_the_raw_class_maps(gen):
    model = randomize_batchnorm(edam_tiny(num_classes=3), gen).eval()
    images = torch.randn(2, 3, 32, 32, generator=gen)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    raw = model.mask_layer(model.features(images))                 # (B, K+1, h, w)
    logits = raw[:, :3].mean(dim=(2, 3))                            # the extra channel dropped
    expected = -(labels * F.logsigmoid(logits)
                 + (1 - labels) * F.logsigmoid(-logits)).mean(dim=1).mean()
    loss, terms = edam_warm_loss(model, images, labels)
    assert torch.allclose(loss, expected, atol=1e-6) and terms == {"warm_cls": loss.item()}
    loss.backward()
    assert model.mask_layer.weight.grad is not None and model.conv1a.weight.grad is not None
    # No pairs and no CMA: its layers get no gradient in the warm phase.
    assert all(p.grad is None for p in (*model.d_d.parameters(), *model.trans_list.parameters(),
                                        *model.fc_list.parameters()))


def test_edam_position_table_is_the_sinusoid():
    pe = edam_tiny(num_classes=2).embedding.position.pe[0]
    p, i = 37, 5
    frequency = 10000.0 ** (-2 * i / pe.shape[1])
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p * frequency), abs=1e-5)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p * frequency), abs=1e-5)


def test_edam_state_dict_loads_through_the_registry(gen):
    source = randomize_batchnorm(edam_tiny(num_classes=3, blocks=(1, 2, 1, 1)), gen).eval()
    loaded = create_model("edam_tiny", checkpoint=source.state_dict()).eval()
    assert loaded.num_classes == 3 and loaded.stage_blocks[:3] == ("b2", "b3", "b3_1")
    x = torch.randn(2, 3, 48, 40, generator=gen)
    torch.testing.assert_close(loaded.cam_maps(x), source.cam_maps(x), rtol=0, atol=0)
    pairs = torch.tensor([[0, 1]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, pairs), source(x, pairs), rtol=0, atol=0)


def test_da_layer_hand_computed():
    model = edam_tiny(num_classes=2).eval()
    channels = model.mask_layer.in_channels
    with torch.no_grad():  # only the centre tap, identity on the first 3 feature channels
        model.mask_layer.weight.zero_()
        model.mask_layer.weight[:, :3, 1, 1] = torch.eye(3)
    features = torch.zeros(1, channels, 1, 3)
    features[0, :3, 0, 0] = torch.tensor([3.0, -4.0, 0.0])
    features[0, :3, 0, 1] = torch.tensor([1.0, 2.0, -2.0])
    expected = torch.tensor([[0.6, 0.8, 0.0], [1 / 3, 2 / 3, 2 / 3], [0.0, 0.0, 0.0]])
    with torch.no_grad():
        got = model.da_masks(features)
    torch.testing.assert_close(got[0, :, 0].T, expected, rtol=1e-6, atol=1e-7)


def test_edam_output_stride_8_and_cam_maps_are_class_da_masks(gen):
    model = randomize_batchnorm(edam_tiny(num_classes=4), gen).eval()
    x = torch.randn(2, 3, 61, 50, generator=gen)
    with torch.no_grad():
        masks = model.da_masks(model.features(x))
    assert masks.shape == (2, 5, 8, 7) and model.grid(61, 50) == (8, 7)
    torch.testing.assert_close(masks.square().sum(1), torch.ones(2, 8, 7))
    torch.testing.assert_close(model.cam_maps(x), masks[:, :4])


def upstream_cma_logits(model: Edam, features, masks):
    """EDAM Net.forward after the backbone, for one pair (eval mode: no dropout), in upstream's
    order of operations, with the position table cut to h·w (upstream needs h·w = 46²)."""
    n, _, h, w = features.shape
    sample = model.num_classes
    label_idx = list(range(sample))
    x = model.d_d(features).permute(1, 0, 2, 3)
    mask = masks.permute(1, 0, 2, 3)
    x = torch.stack([torch.mul(x, mask[i]).permute(1, 0, 2, 3) for i in label_idx], 1)
    hidden = x.shape[2]
    x = x.view(n, sample, hidden, h, w).permute(0, 1, 3, 4, 2).reshape(1, n * sample * h * w,
                                                                       hidden)
    pe = model.embedding.position.pe[:, :h * w]
    segment = torch.zeros(1, n * sample * h * w, dtype=torch.int64)
    for i in range(n):
        segment[:, i * sample * h * w:(i + 1) * sample * h * w] = i
    x = x + torch.stack([pe] * (n * sample), 0).view(1, -1, hidden) \
        + model.embedding.segment.weight[segment]

    def layer_norm(norm, t):
        mean = t.mean(-1, keepdim=True)
        return norm.a_2 * (t - mean) / (t.std(-1, keepdim=True) + 1e-6) + norm.b_2

    def attention(att, t):
        heads = att.heads
        q, k, v = [lin(t).view(1, -1, heads, hidden // heads).transpose(1, 2)
                   for lin in att.linear_layers]
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        out = torch.matmul(F.softmax(scores, dim=-1), v)
        return att.output_linear(out.transpose(1, 2).contiguous().view(1, -1, hidden))

    def gelu(t):
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t.pow(3))))

    output = []
    for i in range(sample):
        tokens = torch.stack([x[:, i * h * w + j * sample * h * w:(i + 1) * h * w
                                + j * sample * h * w, :] for j in range(n)], 1)
        tokens = tokens.view(1, -1, hidden)
        block = model.trans_list[label_idx[i]][0]
        tokens = tokens + attention(block.attention, layer_norm(block.input_sublayer.norm, tokens))
        ff = block.feed_forward
        tokens = tokens + ff.w_2(gelu(ff.w_1(layer_norm(block.output_sublayer.norm, tokens))))
        pooled = tokens.view(n, h, w, hidden).permute(0, 3, 1, 2).mean(dim=(2, 3), keepdim=True)
        output.append(model.fc_list[label_idx[i]](pooled).view(-1))
    return torch.stack(output, dim=1)                     # (2, K): rows = the pair's images


@pytest.fixture(scope="module")
def cma_case():
    gen = torch.Generator().manual_seed(11)
    model = randomize_batchnorm(edam_tiny(num_classes=5), gen).eval()
    with torch.no_grad():
        for p in model.trans_list.parameters():  # LayerNorm affine and biases away from 1 / 0
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        features = torch.randn(3, model.d_d.in_channels, 3, 4, generator=gen)
        masks = model.da_masks(features)
    return model, features, masks


def test_cma_logits_match_upstream_forward(cma_case):
    model, features, masks = cma_case
    pairs = torch.tensor([[0, 1], [2, 0], [1, 1]])
    with torch.no_grad():
        got = model.collaborative_attention(features, masks, pairs)
        expected = torch.stack([upstream_cma_logits(model, features[pair], masks[pair])
                                for pair in pairs])
    assert got.shape == (3, 2, 5)
    assert_rel_close(got, expected, rtol=1e-5, what="CMA logits")
    # The pair's images really attend to each other: changing one changes the other's logits.
    other = features.clone()
    other[1] += 1.0
    with torch.no_grad():
        changed = model.collaborative_attention(other, model.da_masks(other), pairs[:1])
    assert (changed[0, 0] - got[0, 0]).abs().max() > 1e-4


def test_cma_rejects_bad_pairs_and_too_many_positions(cma_case):
    model, features, masks = cma_case
    with pytest.raises(ValueError, match="indices"):
        model.collaborative_attention(features, masks, torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="int64"):
        model.collaborative_attention(features, masks, torch.tensor([0, 1]))
    big = torch.zeros(2, features.shape[1], 47, 46)
    with pytest.raises(ValueError, match="positions"):
        model.collaborative_attention(big, model.da_masks(big), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.cam_maps(torch.zeros(1, 1, 32, 32))


def test_pairs_prefer_shared_classes():
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0]])
    assert pair_by_shared_class(labels).tolist() == [[0, 2], [1, 3], [4, 0]]
    labels = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 0]])
    assert pair_by_shared_class(labels).tolist() == [[0, 3], [1, 4], [2, 3]]
    assert pair_by_shared_class(torch.eye(2)).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="B >= 2"):
        pair_by_shared_class(torch.ones(1, 3))


def test_edam_loss_is_upstream_bce_over_pairs(cma_case, gen):
    model = cma_case[0]
    images = torch.randn(3, 3, 24, 32, generator=gen)
    labels = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0]], dtype=torch.float32)
    pairs = pair_by_shared_class(labels)
    assert pairs.tolist() == [[0, 2], [1, 0]]
    with torch.no_grad():
        loss, logs = edam_loss(model, images, labels)
        features = model.features(images)
        masks = model.da_masks(features)
        terms = []
        for pair in pairs:
            logits = upstream_cma_logits(model, features[pair], masks[pair]).reshape(-1)
            # upstream's target list3: image 1's classes, then image 2's, in label_idx order
            target = torch.cat([labels[pair[0]], labels[pair[1]]])
            terms.append(F.binary_cross_entropy_with_logits(logits, target, reduction="none"))
        expected = torch.cat(terms).mean()
    assert_rel_close(loss, expected, rtol=1e-5, what="EDAM loss")
    assert logs["bce"] == pytest.approx(loss.item())


def edam_infer_cls(model, image: PIL.Image.Image, labels):
    """EDAM infer_cls.py: 4 scales × flip, forward_cam, bilinear to H×W, un-flip, sum, per-channel
    division by the max (no epsilon), labelled classes kept."""
    width, height = image.size
    cams = []
    with torch.no_grad():
        for scale in SCALES:
            x = upstream_normalize(upstream_rescale(image, scale))
            for flipped, inp in ((False, x), (True, x.flip(-1))):
                cam = F.normalize(model.mask_layer(model.features(inp[None])), dim=1).abs()
                cam = F.interpolate(cam, (height, width), mode="bilinear", align_corners=False)[0]
                cams.append(cam.flip(-1) if flipped else cam)
    total = torch.stack(cams).sum(0)
    norm = total / total.amax(dim=(1, 2), keepdim=True)
    keys = [i for i in range(model.num_classes) if labels[i] > 1e-5]
    return keys, norm[keys]


def test_edam_preset_matches_infer_cls(gen):
    model = randomize_batchnorm(edam_tiny(num_classes=4), gen).eval()
    with torch.no_grad():  # a faint class: an epsilon in the normalization would show
        model.mask_layer.weight[1] *= 1e-3
    image = PIL.Image.fromarray(random_image(gen, 53, 75))
    labels = [0, 1, 1, 0]
    keys, expected = edam_infer_cls(model, image, labels)
    result = CamEngine(model, "edam")(image, labels)
    assert result.keys.tolist() == keys
    assert_rel_close(result.high_res[keys], expected, rtol=1e-5, what="EDAM CAM")


# ---------------------------------------------------------------------------------------------
# Training losses


@pytest.mark.parametrize("build, loss_fn", [(resnet_cam_tiny, irn_cam_loss),
                                            (edam_tiny, edam_loss)], ids=["irn_cam", "edam"])
def test_loss_decreases_on_a_fixed_batch(build, loss_fn):
    torch.manual_seed(0)
    model = build(num_classes=4).train()
    images = torch.randn(4, 3, 48, 48)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]],
                          dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_with_fixed_dropout():
        torch.manual_seed(1)
        return loss_fn(model, images, labels)[0]

    before = loss_with_fixed_dropout().item()
    for _ in range(6):
        optimizer.zero_grad()
        loss, _ = loss_fn(model, images, labels)
        loss.backward()
        optimizer.step()
    assert loss_with_fixed_dropout().item() < 0.8 * before


@pytest.mark.parametrize("build, loss_fn", [(resnet_cam_tiny, irn_cam_loss),
                                            (edam_tiny, edam_loss)], ids=["irn_cam", "edam"])
def test_losses_reject_mismatched_batches(build, loss_fn):
    with pytest.raises(ValueError, match="labels"):
        loss_fn(build(num_classes=4), torch.zeros(2, 3, 32, 32), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one output per dataset class"):
        loss_fn(build(num_classes=4), torch.zeros(2, 3, 32, 32), torch.ones(2, 5))


def test_methods_are_registered_with_their_models_and_presets():
    from wsss_fast.models.registry import model_preset
    from wsss_fast.registry import canonical_name
    from wsss_fast.train import get_method

    for name, model, preset in (("irn_cam", "resnet_cam_tiny", "irn_cam"),
                                ("edam", "edam_tiny", "edam")):
        method = get_method(name)
        assert (method.model, canonical_name(method.preset), method.checkpoint_format) == (
            model, preset, "plain")
        assert model_preset(model) == preset
