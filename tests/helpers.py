"""Comparison and poisoning helpers shared by the op tests; random images and IRN-style
preprocessing shared by the CNN-method tests."""

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD


def assert_rel_close(actual, expected, rtol=1e-5, *, what=""):
    """Max abs error relative to the expected output's scale (never compared on zeros)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    expected64, actual64 = expected.double(), actual.double()
    scale = expected64.abs().max().item()
    assert scale > 0, f"{what}: refusing to compare against an all-zero expectation"
    assert torch.isfinite(actual64).all(), f"{what}: non-finite values in the output"
    err = (actual64 - expected64).abs().max().item() / scale
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol:.3g}"
    return err


def poison_heap(numel, count=4):
    """Free NaN-filled buffers of the output's size first, so that an allocation the op fails to
    fill completely is likely to hand back NaNs (which assert_rel_close rejects)."""
    buffers = [torch.full((numel,), float("nan")) for _ in range(count)]
    del buffers


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def poisoned_accumulators(gen, *shapes):
    """Accumulators pre-filled with random values: ops must add to them, not overwrite."""
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def random_image(gen, height, width):
    """A smooth random RGB image (uint8 H×W×3): bicubic-upsampled noise, so CAMs have structure."""
    coarse = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=gen)
    image = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    image = image + 0.1 * torch.rand(1, 3, height, width, generator=gen)
    return (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def upstream_normalize(image: PIL.Image.Image) -> torch.Tensor:
    """IRN's TorchvisionNormalize / PSA's Normalize: float64 arithmetic, stored as float32, CHW."""
    array = np.asarray(image).astype(np.float64) / 255.0
    array = (array - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)


def upstream_rescale(image: PIL.Image.Image, scale: float) -> PIL.Image.Image:
    """IRN pil_rescale(order=3) / EDAM's MSF dataset: bicubic to (round(H·s), round(W·s))."""
    width, height = image.size
    if scale == 1.0:
        return image
    return image.resize((round(width * scale), round(height * scale)), PIL.Image.BICUBIC)


def randomize_batchnorm(model, gen):
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not identity."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.weight.copy_(0.8 + 0.4 * torch.rand(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model
