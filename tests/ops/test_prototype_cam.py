"""``prototype_cam`` (one PyTorch face: a normalized 1×1 convolution) against LPCAM's definition
as mean cosines to prototypes, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from wsss_fast.ops import prototype_cam, prototype_weight


def _lpcam_definition(features, class_prototypes, context_prototypes):
    """Per class: mean cos(F, P_c) − mean cos(F, Q_c), ReLU'd when Q_c is non-empty."""
    maps = []
    for protos, context in zip(class_prototypes, context_prototypes):
        score = torch.stack([F.cosine_similarity(features, u[None, :, None, None], dim=1)
                             for u in protos]).mean(0)
        if context.shape[0]:
            score = score - torch.stack([F.cosine_similarity(features, v[None, :, None, None],
                                                             dim=1) for v in context]).mean(0)
            score = score.clamp_min(0)
        maps.append(score)
    return torch.stack(maps, dim=1)


@pytest.fixture
def prototypes(gen):
    d = 6
    classes = [torch.randn(3, d, generator=gen), torch.randn(1, d, generator=gen)]
    contexts = [torch.randn(2, d, generator=gen), torch.zeros(0, d)]
    return classes, contexts


def test_prototype_cam_values_and_gradients_equal_the_definition(gen, prototypes):
    classes, contexts = prototypes
    pairs = [prototype_weight(p, q) for p, q in zip(classes, contexts)]
    weights = torch.stack([w for w, _ in pairs])
    relu = torch.tensor([r for _, r in pairs])
    assert relu.tolist() == [True, False]
    features = torch.randn(2, 6, 4, 5, generator=gen)
    got_in, want_in = features.clone().requires_grad_(), features.clone().requires_grad_()
    got = prototype_cam(got_in, weights, relu)
    want = _lpcam_definition(want_in, classes, contexts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(got.shape, generator=gen)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(got_in.grad, want_in.grad, rtol=1e-4, atol=1e-6)


def test_prototype_cam_gradient_reaches_the_weights(gen):
    features = torch.randn(1, 4, 3, 3, generator=gen)
    weights = torch.randn(2, 4, generator=gen, requires_grad=True)
    prototype_cam(features, weights, torch.tensor([False, False])).sum().backward()
    unit = features / features.norm(dim=1, keepdim=True)
    torch.testing.assert_close(weights.grad, unit.sum(dim=(0, 2, 3)).expand(2, 4))
