"""ctypes wrapper of the C-ABI CUDA library ``libwsss_fast_cuda.so`` (csrc/cuda, DESIGN §3).

The library is loaded lazily (never at ``wsss_fast`` import time). It is looked up next to the
package (``wsss_fast/libwsss_fast_cuda.so``, where ``setup.py`` builds it) unless the environment
variable ``WSSS_FAST_CUDA_LIB`` names another file. ``load_error()`` says why the cuda face cannot
run (``None`` when it can); the op functions take validated CUDA tensors (see the ``_run_cuda``
runners of the ops), allocate the output on the input's device and enqueue the kernels on the
current stream of that device.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Optional, Sequence

import torch

from wsss_fast.ops import _abi

ENV_VAR = "WSSS_FAST_CUDA_LIB"
LIBRARY_NAME = "libwsss_fast_cuda.so"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MERGES = ("sum", "max_flip")
NORMS = ("none", "minmax", "max", "transcam")

_c_int64_p = ctypes.POINTER(ctypes.c_int64)
_c_int_p = ctypes.POINTER(ctypes.c_int)
_c_void_p_p = ctypes.POINTER(ctypes.c_void_p)

# name -> (restype, argtypes) of every exported function.
SIGNATURES = {
    "wsss_fast_cuda_abi_version": (ctypes.c_int, []),
    "wsss_fast_cuda_max_passes": (ctypes.c_int, []),
    "wsss_fast_cuda_last_error": (ctypes.c_char_p, []),
    "wsss_fast_cuda_probe": (ctypes.c_int, []),
    "wsss_fast_class_patch_reweight": (ctypes.c_int, [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # attn, patchcam_or_null, out
        ctypes.c_int64, ctypes.c_int64,  # rows, cols
        ctypes.c_int, ctypes.c_float, ctypes.c_int,  # dtype, gamma, take_sqrt
        ctypes.c_void_p,  # stream
    ]),
    "wsss_fast_propagate": (ctypes.c_int, [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # affinity, cam, out
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # batch, p, k
        ctypes.c_int, ctypes.c_void_p,  # dtype, stream
    ]),
    "wsss_fast_multiscale_merge": (ctypes.c_int, [
        _c_void_p_p, _c_int64_p, _c_int64_p, _c_int_p, ctypes.c_int,  # host per-pass arrays, n
        ctypes.c_int64, ctypes.c_int64,  # batch, classes
        ctypes.c_void_p, ctypes.c_void_p,  # labels_or_null, out
        ctypes.c_int64, ctypes.c_int64,  # out_h, out_w
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,  # relu, merge, norm, eps
        ctypes.c_void_p,  # stream
    ]),
    "wsss_fast_random_walk": (ctypes.c_int, [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,  # x0, weights, out
        ctypes.c_void_p, ctypes.c_int64,  # workspace, workspace_size
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # batch, classes, h, w
        ctypes.c_int, ctypes.c_int64, ctypes.c_int,  # radius, steps, dtype
        ctypes.c_void_p,  # stream
    ]),
    "wsss_fast_random_walk_workspace_bytes": (ctypes.c_int64, [
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # batch, classes, h, w
        ctypes.c_int,  # radius
    ]),
}

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None


def library_path() -> str:
    """Where the library is looked up: ``$WSSS_FAST_CUDA_LIB`` or next to the package."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        return os.path.abspath(os.path.expanduser(override))
    import wsss_fast

    return os.path.join(os.path.dirname(os.path.abspath(wsss_fast.__file__)), LIBRARY_NAME)


def load_library(path: str) -> ctypes.CDLL:
    """Load the library at ``path`` and declare every exported signature. Needs no GPU (cudart is
    linked statically). Raises OSError when it cannot be loaded, AttributeError when a symbol is
    missing."""
    lib = ctypes.CDLL(path)
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when the cuda face can run (a CUDA device, the library loads, reports
    ``WSSS_FAST_CUDA_ABI_VERSION`` of csrc/common/abi.h and its runtime finds a kernel image for the current device);
    otherwise why not. Cached; ``reset()`` clears it."""
    global _library
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch build ({torch.__version__}) has no CUDA support"
        else:
            why = "no CUDA device or driver was found"
        return f"CUDA is not available (torch.cuda.is_available() is False: {why})"
    path = library_path()
    where = f"${ENV_VAR}={path}" if os.environ.get(ENV_VAR, "").strip() else path
    if not os.path.isfile(path):
        return (f"the CUDA library {where} is not built (build it with nvcc: "
                "`pip install --no-build-isolation -e .`)")
    try:
        lib = load_library(path)
    except OSError as exc:
        return f"the CUDA library {where} cannot be loaded ({exc})"
    except AttributeError as exc:
        return f"the CUDA library {where} lacks a symbol ({exc}); rebuild it"
    built, expected = lib.wsss_fast_cuda_abi_version(), _abi.value("CUDA_ABI_VERSION")
    if built != expected:
        return (f"the CUDA library {where} is stale (ABI {built}, expected {expected}); "
                "rebuild it")
    if lib.wsss_fast_cuda_probe() != 0:
        return f"the CUDA library {where} cannot run here: {last_error(lib)}"
    with _lock:
        _library = lib
    return None


def reset() -> None:
    """Forget the cached library and load result (tests; after ``WSSS_FAST_CUDA_LIB`` changes).
    The previously loaded shared object stays mapped in the process."""
    global _library
    with _lock:
        _library = None
    load_error.cache_clear()


def available() -> bool:
    return load_error() is None


def library() -> ctypes.CDLL:
    """The loaded, checked library; RuntimeError with the reason when the cuda face cannot run."""
    reason = load_error()
    if reason is not None:
        raise RuntimeError(f"wsss_fast cuda face unavailable: {reason}")
    assert _library is not None
    return _library


def max_passes() -> int:
    """The most passes one ``multiscale_merge`` call of the loaded library takes."""
    return library().wsss_fast_cuda_max_passes()


def last_error(lib: Optional[ctypes.CDLL] = None) -> str:
    message = (lib or library()).wsss_fast_cuda_last_error()
    return message.decode("utf-8", "replace") if message else ""


def _check(lib: ctypes.CDLL, status: int, op: str) -> None:
    if status != 0:
        raise RuntimeError(f"wsss_fast cuda {op} failed (status {status}): "
                           f"{last_error(lib) or 'no message'}")


def _dtype_code(op: str, tensor: torch.Tensor) -> int:
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"{op}: the cuda face supports float32/float16/bfloat16, got "
                         f"{tensor.dtype}")
    return _abi.value(f"DTYPE_{DTYPE_NAMES[tensor.dtype].upper()}")


def _require_cuda(op: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    device = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device.type != "cuda":
            raise ValueError(f"{op}: {name} must be a CUDA tensor, got device {tensor.device}")
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device}, expected {device}")
    assert device is not None
    return device


def _check_out(op: str, out: torch.Tensor, shape, dtype, device) -> None:
    if (tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device
            or not out.is_contiguous()):
        raise ValueError(f"{op}: out must be a contiguous {dtype} tensor of shape {tuple(shape)} "
                         f"on {device}, got {out.dtype} {tuple(out.shape)} on {out.device}")


def _stream(device: torch.device) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)


def class_patch_reweight(attn: torch.Tensor, gamma: float, patchcam: Optional[torch.Tensor],
                         sqrt: bool, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``φ_γ`` over the last dimension of ``attn`` (optionally ⊙ ReLU(patchcam), then sqrt)."""
    op = "class_patch_reweight"
    device = _require_cuda(op, attn=attn, patchcam=patchcam)
    dtype = _dtype_code(op, attn)
    attn = attn.contiguous()
    if patchcam is not None:
        if patchcam.numel() != attn.numel():
            raise ValueError(f"{op}: patchcam of shape {tuple(patchcam.shape)} does not match "
                             f"attn of shape {tuple(attn.shape)}")
        patchcam = patchcam.to(attn.dtype).contiguous()
    if out is None:
        out = torch.empty_like(attn, memory_format=torch.contiguous_format)
    else:
        _check_out(op, out, attn.shape, attn.dtype, device)
    cols = attn.shape[-1] if attn.dim() > 0 else 1
    rows = attn.numel() // cols if cols else 0
    if attn.numel() == 0:
        return out
    lib = library()
    with torch.cuda.device(device):
        status = lib.wsss_fast_class_patch_reweight(
            attn.data_ptr(), None if patchcam is None else patchcam.data_ptr(), out.data_ptr(),
            rows, cols, dtype, float(gamma), int(bool(sqrt)), _stream(device))
    _check(lib, status, op)
    return out


def propagate(affinity: torch.Tensor, cam: torch.Tensor, *,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``affinity @ cam`` per batch item: ``(B, P, P) @ (B, P, K) -> (B, P, K)``, fp32 sums."""
    op = "propagate"
    device = _require_cuda(op, affinity=affinity, cam=cam)
    dtype = _dtype_code(op, cam)
    if cam.dim() != 3 or affinity.dim() != 3:
        raise ValueError(f"{op}: expected affinity (B, P, P) and cam (B, P, K), got "
                         f"{tuple(affinity.shape)} and {tuple(cam.shape)}")
    b, p, k = cam.shape
    if tuple(affinity.shape) != (b, p, p) or affinity.dtype != cam.dtype:
        raise ValueError(f"{op}: affinity must be {cam.dtype} of shape {(b, p, p)}, got "
                         f"{affinity.dtype} {tuple(affinity.shape)}")
    affinity, cam = affinity.contiguous(), cam.contiguous()
    if out is None:
        out = torch.empty((b, p, k), dtype=cam.dtype, device=device)
    else:
        _check_out(op, out, (b, p, k), cam.dtype, device)
    if out.numel() == 0:
        return out
    lib = library()
    with torch.cuda.device(device):
        status = lib.wsss_fast_propagate(affinity.data_ptr(), cam.data_ptr(), out.data_ptr(),
                                         b, p, k, dtype, _stream(device))
    _check(lib, status, op)
    return out


def multiscale_merge(maps: Sequence[torch.Tensor], flips: Sequence[bool], out_h: int, out_w: int,
                     relu: bool, labels: Optional[torch.Tensor], merge: str, norm: str,
                     eps: float, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Resize every pass to ``(out_h, out_w)``, flip back, merge and normalize; fp32
    ``(B, K, out_h, out_w)``. Semantics: ``multiscale_merge_reference``."""
    op = "multiscale_merge"
    maps = list(maps)
    if not maps:
        raise ValueError(f"{op}: maps must be a non-empty sequence")
    if len(maps) > max_passes():
        raise ValueError(f"{op}: the cuda face merges at most {max_passes()} passes, got "
                         f"{len(maps)}")
    if len(flips) != len(maps):
        raise ValueError(f"{op}: got {len(flips)} flips for {len(maps)} maps")
    if merge not in MERGES or norm not in NORMS:
        raise ValueError(f"{op}: merge must be one of {MERGES} and norm one of {NORMS}, got "
                         f"{merge!r}, {norm!r}")
    device = _require_cuda(op, labels=labels, **{f"maps[{i}]": m for i, m in enumerate(maps)})
    for i, cam in enumerate(maps):
        if cam.dim() != 4 or cam.shape[:2] != maps[0].shape[:2]:
            raise ValueError(f"{op}: maps[{i}] must be (B, K, h, w) sharing (B, K) with maps[0] "
                             f"{tuple(maps[0].shape)}, got {tuple(cam.shape)}")
    maps = [cam.float().contiguous() for cam in maps]  # kept alive until the kernels are enqueued
    b, k = maps[0].shape[:2]
    if labels is not None:
        if tuple(labels.shape) != (b, k):
            raise ValueError(f"{op}: labels must have shape {(b, k)}, got {tuple(labels.shape)}")
        labels = labels.float().contiguous()
    shape = (b, k, int(out_h), int(out_w))
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    else:
        _check_out(op, out, shape, torch.float32, device)
    n = len(maps)
    ptrs = (ctypes.c_void_p * n)(*[cam.data_ptr() for cam in maps])
    heights = (ctypes.c_int64 * n)(*[cam.shape[2] for cam in maps])
    widths = (ctypes.c_int64 * n)(*[cam.shape[3] for cam in maps])
    flip_codes = (ctypes.c_int * n)(*[int(bool(f)) for f in flips])
    if out.numel() == 0:
        return out
    lib = library()
    with torch.cuda.device(device):
        status = lib.wsss_fast_multiscale_merge(
            ptrs, heights, widths, flip_codes, n, b, k,
            None if labels is None else labels.data_ptr(), out.data_ptr(), shape[2], shape[3],
            int(bool(relu)), _abi.value(f"MERGE_{merge.upper()}"),
            _abi.value(f"NORM_{norm.upper()}"), float(eps), _stream(device))
    _check(lib, status, op)
    return out


def random_walk(x0: torch.Tensor, weights: torch.Tensor, steps: int, radius: int, *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x0 @ T^steps`` of the affinity random walk for ``x0 (B, K, h, w)`` and pair weights
    ``(B, O, h, w)``; output in ``x0``'s dtype. Semantics: ``random_walk_reference``."""
    op = "random_walk"
    device = _require_cuda(op, x0=x0, weights=weights)
    dtype = _dtype_code(op, x0)
    if x0.dim() != 4 or weights.dim() != 4 or weights.shape[0] != x0.shape[0] or \
            weights.shape[2:] != x0.shape[2:]:
        raise ValueError(f"{op}: expected x0 (B, K, h, w) and weights (B, O, h, w), got "
                         f"{tuple(x0.shape)} and {tuple(weights.shape)}")
    b, k, h, w = x0.shape
    x0, weights = x0.contiguous(), weights.float().contiguous()
    if out is None:
        out = torch.empty_like(x0)
    else:
        _check_out(op, out, x0.shape, x0.dtype, device)
    if out.numel() == 0:
        return out
    lib = library()
    size = lib.wsss_fast_random_walk_workspace_bytes(b, k, h, w, int(radius))
    if size < 0:
        raise ValueError(f"{op}: {last_error(lib)}")
    # From torch's caching allocator, in the current stream's order.
    workspace = torch.empty(size, dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        status = lib.wsss_fast_random_walk(x0.data_ptr(), weights.data_ptr(), out.data_ptr(),
                                           workspace.data_ptr(), size, b, k, h, w, int(radius),
                                           int(steps), dtype, _stream(device))
    _check(lib, status, op)
    return out
