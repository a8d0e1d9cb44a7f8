"""Plain ViT CAMs: timm checkpoint compatibility, class-token attention against materialized
attention, and the token-cam preset against an eager re-implementation of ToCo's multi-scale CAM
(reference/vit_methods.md §5.2)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import PIL.Image

import wsss_fast._compat  # noqa: F401
import timm
from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from tests.oracles.upstream_mctformer import block_forward
from wsss_fast.engine import CamEngine, to_normalized_tensor
from wsss_fast.models.vit import ViTCam


@pytest.fixture(scope="module")
def timm_and_ours():
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = ViTCam.from_timm("deit_tiny_patch16_224", num_classes=5,
                            checkpoint=reference.state_dict()).eval()
    torch.nn.init.normal_(ours.classifier.weight, std=0.1)
    return reference, ours


def test_timm_weights_give_timm_features(timm_and_ours):
    reference, ours = timm_and_ours
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(x)[:, 1:]
        got = ours.forward_features(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_class_token_attention_matches_materialized_attention(timm_and_ours):
    _, ours = timm_and_ours
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        tokens = torch.cat([ours.cls_token.expand(2, -1, -1), ours.patch_embed(x)], dim=1)
        tokens = tokens + ours.interpolate_pos_encoding(96, 128)
        expected = 0
        for block in ours.blocks:
            tokens, attn = block_forward(block, tokens)
            expected = expected + attn.mean(dim=1)[:, 0, 1:]
    got = ours.cam_maps(x, kind="cls_attention")
    torch.testing.assert_close(got.flatten(1), expected, rtol=1e-5, atol=1e-7)


def toco_multi_scale_cam(model, image_tensor, scales):
    """ToCo's multi_scale_cam2 in its order of operations (for one image, all classes)."""
    _, _, h, w = image_tensor.shape
    inputs = torch.cat([image_tensor, image_tensor.flip(-1)], dim=0)
    cam_list = []
    for s in scales:
        x = F.interpolate(inputs, size=(int(h * s), int(w * s)), mode="bilinear",
                          align_corners=False) if s != 1.0 else inputs
        cam = model.cam_maps(x, kind="token")
        cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
        cam = torch.max(cam[:1], cam[1:].flip(-1))
        cam_list.append(F.relu(cam))
    cam = torch.sum(torch.stack(cam_list, dim=0), dim=0)
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + 1e-5)


def test_token_cam_preset_matches_toco(timm_and_ours):
    _, ours = timm_and_ours
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 168, 3), dtype=np.uint8)
    scales = (1.0, 0.5, 1.5)
    normalized = to_normalized_tensor(PIL.Image.fromarray(image), IMAGENET_MEAN, IMAGENET_STD)
    expected = toco_multi_scale_cam(ours, normalized[None], scales)[0]
    got = CamEngine(ours, "token-cam", scales=scales)(image).high_res
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_from_timm_rejects_models_without_one_class_token():
    with pytest.raises(ValueError, match="one class token"):
        ViTCam.from_timm("vit_medium_patch16_reg4_gap_256", num_classes=3)
