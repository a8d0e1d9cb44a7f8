"""The Conformer's ``output_stride`` option: at 8 (patch 8) the CNN map and the token grid are
twice as fine as upstream's 16, TransCAM's A*·M still lines them up, checkpoints name their own
geometry, and a patch-16 backbone loads into a patch-8 model with the patch conv reported; and
``trunk_lr_scale``, the fine-tuning lr of the trunk relative to the heads."""

import pytest
import torch

from wsss_fast.models.checkpoint import load_matching
from wsss_fast.models.conformer import Conformer, config_from_state
from wsss_fast.models.registry import MODELS, create_model

SMALL = dict(num_classes=5, base_channel=16, channel_ratio=1, embed_dim=32, depth=3, num_heads=2)


def _model(**kwargs) -> Conformer:
    torch.manual_seed(0)
    return Conformer(**SMALL, **kwargs).eval()


@pytest.mark.parametrize("patch, stride, side", [(16, 16, 4), (8, 8, 8)])
def test_cam_and_logit_shapes_follow_the_output_stride(patch, stride, side):
    model = _model(patch_size=patch, output_stride=stride)
    x = torch.randn(2, 3, 64, 64)
    assert model.token_grid(64, 64) == (side, side)
    with torch.no_grad():
        cnn, tokens = model.forward_features(x)
        conv_logits, trans_logits, cam = model.forward_cam(x)
        m = model.cam_maps(x, refine=False)
    assert cnn.shape == (2, 4 * 16, side, side)         # c3 channels at the output stride
    assert tokens.shape == (2, 1 + side * side, 32)
    assert conv_logits.shape == trans_logits.shape == (2, 5)
    assert cam.shape == m.shape == (2, 5, side, side)
    assert not torch.allclose(cam, m)                   # A* is applied, not skipped


def test_output_stride_8_differs_from_16_only_in_the_patch_conv_shape():
    coarse, fine = _model().state_dict(), _model(patch_size=8, output_stride=8).state_dict()
    assert list(coarse) == list(fine)
    differing = [k for k in coarse if coarse[k].shape != fine[k].shape]
    assert differing == ["trans_patch_conv.weight"]
    assert fine["trans_patch_conv.weight"].shape[-2:] == (2, 2)


def test_stage_three_is_unstrided_and_its_fcus_do_not_resample_at_output_stride_8():
    model = _model(patch_size=8, output_stride=8)
    last = getattr(model, f"conv_trans_{model.depth}")
    assert last.cnn_block.conv2.stride == (1, 1) and last.dw_stride == 1
    assert model.trans_patch_conv.stride == (2, 2)      # the stride-4 stem map -> patch 8
    assert model.conv_trans_2.dw_stride == 1            # stage 2 (depth 3) at stride 8


def test_config_from_state_reads_the_geometry_back():
    model = _model(patch_size=8, output_stride=8)
    config = config_from_state(model.state_dict())
    assert config["patch_size"] == 8 and config["output_stride"] == 8
    assert config_from_state(_model().state_dict())["output_stride"] == 16
    geometry = {k: config[k] for k in ("patch_size", "output_stride")}
    rebuilt = Conformer(**SMALL, **geometry).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt.cam_maps(x), model.cam_maps(x))


def test_a_patch16_backbone_loads_into_a_patch8_model_with_the_patch_conv_reported():
    source = _model().state_dict()
    target = _model(patch_size=8, output_stride=8)
    before = target.trans_patch_conv.weight.detach().clone()
    report = load_matching(target, source)
    assert [entry.split(":")[0] for entry in report["shape_mismatched"]] == [
        "trans_patch_conv.weight"]
    assert torch.equal(target.trans_patch_conv.weight.detach(), before)
    assert torch.equal(target.conv_trans_3.fusion_block.conv2.weight.detach(),
                       source["conv_trans_3.fusion_block.conv2.weight"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(output_stride=4), "output_stride must be one of"),
    (dict(patch_size=8), "patch_size must be a positive multiple of the output stride 16"),
    (dict(patch_size=12, output_stride=8), "patch_size must be a positive multiple"),
])
def test_bad_geometry_is_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Conformer(**SMALL, **kwargs)


def test_input_sizes_off_the_patch8_grid_are_refused_naming_the_rule():
    model = _model(patch_size=8, output_stride=8)
    model.token_grid(61, 64)                            # ceil(61/4) = 16: a multiple of 2
    with pytest.raises(ValueError, match=r"patch 8: a size in \{8k-3, …, 8k\}"):
        model.token_grid(60, 64)                        # ceil(60/4) = 15


def test_the_tiny_registry_model_builds_at_its_registered_geometry():
    entry = MODELS.get("transcam_tiny")
    model = create_model("transcam_tiny", num_classes=9)
    assert model.patch_size == entry.defaults["patch_size"]
    assert model.output_stride == entry.defaults.get("output_stride", 16)
    assert (model.patch_size, model.output_stride) == (8, 8)   # the demo's 16×16 grid at 128 px
    assert model.token_grid(128, 128) == (16, 16)


def test_trunk_lr_scale_groups_the_heads_apart_and_a_step_moves_the_trunk_that_much_less():
    """``trunk_lr_scale``: the heads at the training lr, the rest at the scale; the default keeps
    one group, so the trainer's optimizer is the one it built before the option existed."""
    from wsss_fast.train.losses import transcam_loss
    from wsss_fast.train.trainer import parameter_groups
    default = _model()
    (only,) = default.trainable_parameters()
    assert only["lr_scale"] == 1.0 and len(only["params"]) == len(list(default.parameters()))
    assert [len(g["params"]) for g in parameter_groups(default, 0.05, scaled=True)] == [
        len(g["params"]) for g in parameter_groups(default, 0.05)]

    model = _model(trunk_lr_scale=0.2)
    trunk, heads = model.trainable_parameters()
    head_names = {n for n, p in model.named_parameters() if any(p is q for q in heads["params"])}
    assert head_names == {"conv_cls_head.weight", "conv_cls_head.bias", "trans_cls_head.weight",
                          "trans_cls_head.bias"}
    assert (trunk["lr_scale"], heads["lr_scale"]) == (0.2, 1.0)
    assert len(trunk["params"]) + len(heads["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="trunk_lr_scale must be positive"):
        _model(trunk_lr_scale=0)

    # One SGD step at lr × lr_scale, as the trainer sets it: the trunk moves 0.2× its gradient.
    model.train()
    optimizer = torch.optim.SGD([{**g, "lr": 1e-2 * g["lr_scale"]}
                                 for g in parameter_groups(model, 0.0, scaled=True)], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 0, 1], [0, 1.0, 0, 0]])
    transcam_loss(model, images, labels)[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, lr in (("conv1.weight", 2e-3), ("conv_cls_head.weight", 1e-2)):
        step = dict(model.named_parameters())[name].detach() - before[name]
        assert torch.allclose(step, -lr * grads[name], atol=1e-7)
