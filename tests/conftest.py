"""Test setup: the Triton interpreter must be chosen before triton is first imported, and no test
may reach a model hub."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests pick faces explicitly; an exported WSSS_FAST_BACKEND must not leak in."""
    monkeypatch.delenv("WSSS_FAST_BACKEND", raising=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
