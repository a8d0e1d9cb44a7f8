"""Which face of an op runs: extension loading and dispatch (DESIGN §3).

Faces: ``reference`` (PyTorch, the specification), ``cpu`` (C++ extension ``wsss_fast._C``),
``triton`` (``wsss_fast.kernels``; on CPU tensors only under ``TRITON_INTERPRET=1``) and ``cuda``
(``libwsss_fast_cuda.so`` through a C ABI). By default CUDA tensors go to triton (or cuda where the
op has no triton face) and CPU tensors to cpu when the extension is built, else to the reference.
``WSSS_FAST_BACKEND=reference|cpu|triton|cuda`` forces a face.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

FACES = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "WSSS_FAST_BACKEND"

# Bumped whenever the C++ op schemas change; a built extension reporting another number is stale.
CPU_ABI_VERSION = 3
CUDA_ABI_VERSION = 2


class BackendUnavailable(RuntimeError):
    """A forced face cannot run the given tensors."""


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def cpu_extension_error() -> str | None:
    """None when ``wsss_fast._C`` is loaded and current, else why it is not usable."""
    try:
        importlib.import_module("wsss_fast._C")
    except ImportError as exc:
        return f"the C++ extension wsss_fast._C is not built ({exc})"
    try:
        built = torch.ops.wsss_fast_C.abi_version()
    except (AttributeError, RuntimeError) as exc:
        return f"the C++ extension wsss_fast._C does not register its ops ({exc})"
    if built != CPU_ABI_VERSION:
        return (f"the C++ extension wsss_fast._C is stale (ABI {built}, expected {CPU_ABI_VERSION})")
    return None


def cpu_extension_available() -> bool:
    return cpu_extension_error() is None


@functools.lru_cache(maxsize=None)
def triton_error() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("wsss_fast.kernels")
    except ImportError as exc:
        return f"triton kernels cannot be imported ({exc})"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_library_error() -> str | None:
    from wsss_fast.ops import _cuda_lib

    return _cuda_lib.load_error()


def _can_run(face: str, device: torch.device) -> str | None:
    """None when ``face`` can run tensors on ``device``, else the reason it cannot."""
    if face == "reference":
        return None
    if face == "cpu":
        if device.type != "cpu":
            return f"the cpu face needs CPU tensors, got {device}"
        return cpu_extension_error()
    if face == "triton":
        if device.type == "cpu" and not triton_interpreting():
            return "the triton face needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        if device.type not in ("cpu", "cuda"):
            return f"the triton face cannot run on {device}"
        return triton_error()
    if face == "cuda":
        if device.type != "cuda":
            return f"the cuda face needs CUDA tensors, got {device}"
        return cuda_library_error()
    raise ValueError(f"unknown face {face!r}; expected one of {FACES}")


def forced_face() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in FACES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(FACES)}")
    return value


def choose_face(op: str, faces: tuple[str, ...], device: torch.device) -> str:
    """The face of ``op`` (which has ``faces``) that runs tensors on ``device``."""
    forced = forced_face()
    if forced is not None:
        if forced in faces:
            reason = _can_run(forced, device)
            if reason is None:
                return forced
            if forced in ("cpu", "cuda") and device.type == forced:
                # Built library missing or stale: fall back loudly, never crash.
                _warn_once(f"wsss_fast: {reason}; {op} falls back to the reference face")
                return "reference"
            raise BackendUnavailable(f"{ENV_VAR}={forced} cannot run {op}: {reason}")
        _warn_once(f"wsss_fast: {op} has no {forced} face (it has {', '.join(faces)}); "
                   "using the default face")
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for face in order:
        if face in faces and _can_run(face, device) is None:
            return face
    if device.type == "cpu" and "cpu" in faces:
        _warn_once(f"wsss_fast: {cpu_extension_error()}; ops run on the reference face "
                   "(rebuild with `pip install --no-build-isolation -e .`)")
    return "reference"
