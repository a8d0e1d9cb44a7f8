"""Comparison and poisoning helpers shared by the op tests."""

import torch


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
