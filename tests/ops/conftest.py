"""The ``face`` fixture of the per-op tests: forces one face (``WSSS_FAST_BACKEND``) after
checking it can run here. A missing C++ build fails (it is part of the package); a missing triton
or GPU skips with the reason."""

import pytest

from wsss_fast.ops import _backend


@pytest.fixture
def face(request, monkeypatch):
    """Parametrize a test with ``@pytest.mark.parametrize("face", face_params(...),
    indirect=True)``; the test receives the ``FaceCase`` with ``WSSS_FAST_BACKEND`` set."""
    case = request.param
    if case.name == "cpu":
        assert _backend.cpu_extension_error() is None, _backend.cpu_extension_error()
    if case.name == "triton" and _backend.triton_error() is not None:
        pytest.skip(_backend.triton_error())
    if case.device == "cuda":
        request.getfixturevalue("gpu_lib")  # skips without a GPU; builds for its arch
    monkeypatch.setenv("WSSS_FAST_BACKEND", case.name)
    return case


@pytest.fixture
def cpu_face(monkeypatch):
    """Every call in the test must run the C++ face (a missing build is a failure here)."""
    assert _backend.cpu_extension_error() is None, _backend.cpu_extension_error()
    monkeypatch.setenv("WSSS_FAST_BACKEND", "cpu")
