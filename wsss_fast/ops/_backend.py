"""Which faces can run at all: extension loading and the device rules (DESIGN §3).

Faces: ``reference`` (PyTorch, the specification), ``cpu`` (C++ extension ``wsss_fast._C``),
``triton`` (``wsss_fast.kernels``; on CPU tensors only under ``TRITON_INTERPRET=1``) and ``cuda``
(``libwsss_fast_cuda.so`` through a C ABI). By default CUDA tensors go to triton, then cuda, and CPU
tensors to cpu; an op falls back past a face that cannot take its inputs, down to the reference
(see ``wsss_fast.ops._op``). ``WSSS_FAST_BACKEND=reference|cpu|triton|cuda`` forces a face.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Callable, Mapping

import torch

from wsss_fast.ops import _abi

FACES = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "WSSS_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """No face of an op (or not the forced one) can run the given inputs."""


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
    try:
        expected = _abi.value("CPU_ABI_VERSION")
    except (RuntimeError, KeyError) as exc:
        return f"the C++ extension wsss_fast._C cannot be checked ({exc})"
    if built != expected:
        return f"the C++ extension wsss_fast._C is stale (ABI {built}, expected {expected})"
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
    # Imported here so that importing wsss_fast.ops never touches the CUDA wrapper.
    from wsss_fast.ops import _cuda_lib

    return _cuda_lib.load_error()


def face_unavailable(face: str, device: torch.device) -> str | None:
    """None when ``face`` can run tensors on ``device`` at all, else the reason it cannot."""
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


def default_order(device: torch.device) -> tuple[str, ...]:
    """Faces tried, in order, for tensors on ``device``; the reference always comes last."""
    if device.type == "cuda":
        return ("triton", "cuda", "reference")
    return ("cpu", "reference")


def _warn_reference_fallback(device: torch.device, faces) -> None:
    """A missing or stale C++ build sends CPU tensors to the reference: say so, once."""
    if device.type == "cpu" and "cpu" in faces and cpu_extension_error() is not None:
        _warn_once(f"wsss_fast: {cpu_extension_error()}; ops run on the reference face "
                   "(rebuild with `pip install --no-build-isolation -e .`)")


def _listing(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{face}: {', '.join(why) if why else 'can run'}"
                     for face, why in reasons.items())


def select_face(op: str, declines: Mapping[str, Callable[[], list[str]]],
                device: torch.device) -> str:
    """The face that runs ``op``: the forced one (``WSSS_FAST_BACKEND``) or the first face of
    ``default_order(device)`` that does not decline. ``declines[face]()`` lists the reasons
    ``face`` cannot take the inputs (empty: it can). Raises ``BackendUnavailable`` listing every
    face's reasons when the forced face, or every face, declines."""
    forced = forced_face()
    if forced is not None:
        if forced in declines:
            reasons = declines[forced]()
            if not reasons:
                return forced
            others = {face: check() for face, check in declines.items() if face != forced}
            raise BackendUnavailable(f"{ENV_VAR}={forced} cannot run {op}: {', '.join(reasons)} "
                                     f"(other faces: {_listing(others) or 'none'})")
        _warn_once(f"wsss_fast: {op} has no {forced} face (it has {', '.join(declines)}); "
                   "using the default face")
    tried: dict[str, list[str]] = {}
    for face in default_order(device):
        if face not in declines:
            continue
        reasons = declines[face]()
        if not reasons:
            if face == "reference":
                _warn_reference_fallback(device, declines)
            return face
        tried[face] = reasons
    untried = {face: check() for face, check in declines.items() if face not in tried}
    raise BackendUnavailable(f"no face of {op} can run these inputs: "
                             f"{_listing({**tried, **untried})}")


def choose_face(op: str, faces: tuple[str, ...], device: torch.device) -> str:
    """The face of an op with ``faces`` that runs tensors on ``device``, by the device rules
    only (an op's own input limits are added by ``wsss_fast.ops._op.Op.choose``)."""
    return select_face(op, {face: functools.partial(device_declines, face, device)
                            for face in faces}, device)


def device_declines(face: str, device: torch.device) -> list[str]:
    """``face_unavailable`` as a list of reasons (empty: the face can run on ``device``)."""
    reason = face_unavailable(face, device)
    return [] if reason is None else [reason]
