"""The Conformer's inference path (BatchNorm folded into cached conv weights, channels_last, ReLU
and adds in place, FCUDown pooling before its 1×1 projection) against the module-by-module
formulation it replaces, with the same eval-mode BatchNorm statistics."""

import pytest
import torch
from torch import nn

from wsss_fast.models.conformer import Conformer


def _model(gen) -> Conformer:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = Conformer(patch_size=16, num_classes=21, base_channel=16, channel_ratio=1,
                      embed_dim=32, depth=6, num_heads=2, mlp_ratio=2, qkv_bias=True).eval()
    with torch.no_grad():
        for m in model.modules():       # non-trivial statistics and affine parameters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
    return model


def _reference(model: Conformer, x: torch.Tensor) -> torch.Tensor:
    """cam_maps through the unfused modules: every module but BatchNorm flagged as training
    (which selects the plain path), BatchNorm kept on its running statistics."""
    flags = {m: m.training for m in model.modules()}
    try:
        for m in model.modules():
            m.training = not isinstance(m, nn.BatchNorm2d)
        return model.cam_maps(x)
    finally:
        for m, flag in flags.items():
            m.training = flag


def _close(a, b):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-5 * scale + 1e-6, (a - b).abs().max().item()


@pytest.mark.parametrize("grad", [False, True])
def test_eval_path_equals_module_by_module(gen, grad):
    model = _model(gen)
    x = torch.randn(2, 3, 94, 157, generator=gen)       # non-square, a 6×10 token grid
    with torch.set_grad_enabled(grad):
        fast = model.cam_maps(x)
        reference = _reference(model, x)
    _close(fast, reference)
    assert fast.shape == (2, 21, 6, 10)


def test_folded_weights_follow_changed_statistics(gen):
    model = _model(gen)
    x = torch.randn(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        before = model.cam_maps(x)                      # fills the folded-weight caches
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.mul_(2.0)
        after = model.cam_maps(x)
        reference = _reference(model, x)
    _close(after, reference)
    assert (after - before).abs().max() > 1e-3 * before.abs().max()


def test_eval_path_keeps_gradients_to_the_input(gen):
    model = _model(gen)
    x = torch.randn(1, 3, 64, 64, generator=gen, requires_grad=True)
    model.cam_maps(x)[:, 1:].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
