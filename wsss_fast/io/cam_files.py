"""CAM files, one per image, in the formats the field's tools read.

- ``irn``: IRN's pickled dict ``{"keys", "cam", "high_res"}`` (also read by LPCAM, ReCAM, AMN):
  ``keys`` the 0-based present classes (int64), ``cam`` the stride-4 maps as a torch tensor (IRN's
  ``make_sem_seg_labels`` calls ``.cuda()`` on it), ``high_res`` the full-resolution maps (numpy),
  both ``(len(keys), ...)``.
- ``mctformer``: MCTformer / TransCAM ``{class_index: H×W}`` of the present classes.

``load_cam_file`` reads both (and CLIP-ES's ``{"keys", "attn_highres"}``) into a ``CamRecord``.
Maps with NaN or inf values (e.g. from a model with broken weights) are refused on writing and on
reading (``NonFiniteCams``): later steps would turn them into labels without a word.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from wsss_fast.io.atomic import atomic_write_bytes

CAM_FORMATS = ("irn", "mctformer")


class CamFileError(ValueError):
    """A CAM file that cannot be read (truncated, corrupt, or not a CAM dict)."""


class NonFiniteCams(CamFileError):
    """CAMs with NaN or inf values; the message names the maps and how many values."""


def _non_finite(array) -> tuple[int, int]:
    """(how many values are NaN or inf, how many values) of an array or tensor."""
    if isinstance(array, torch.Tensor):
        bad = int((~torch.isfinite(array)).sum()) if array.is_floating_point() else 0
        return bad, array.numel()
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact):
        return 0, array.size
    return int(array.size - np.count_nonzero(np.isfinite(array))), array.size


def check_finite_cams(where: str, **maps) -> None:
    """Raise ``NonFiniteCams`` ("WHERE: non-finite values in 'high_res' (N of M)") if one of the
    named arrays or tensors (``high_res=...``, ``low_res=...``; None is skipped) holds NaN or
    inf. Call it before writing an image's CAMs, to skip the image instead of saving them."""
    for name, array in maps.items():
        if array is None:
            continue
        bad, total = _non_finite(array)
        if bad:
            raise NonFiniteCams(f"{where}: non-finite values in {name!r} ({bad} of {total})")


@dataclass
class CamRecord:
    keys: np.ndarray                  # (n,) int64, 0-based foreground classes
    high_res: np.ndarray              # (n, H, W) float32
    low_res: Optional[np.ndarray] = None   # (n, ⌈H/4⌉, ⌈W/4⌉) float32 when stored


def _as_numpy(array, dtype) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    with np.errstate(over="ignore"):   # values beyond float16's range: refused as inf later
        return np.asarray(array, dtype=dtype)


def cam_file_bytes(keys, high_res, low_res=None, fmt: str = "irn", fp16: bool = False,
                   where: str = "CAMs") -> bytes:
    """The bytes of a CAM file (``np.save`` of a pickled dict). ``high_res``/``low_res`` hold the
    maps of the present classes ``keys`` only; NaN or inf values raise ``NonFiniteCams``
    (``where`` names them in the message)."""
    if fmt not in CAM_FORMATS:
        raise ValueError(f"unknown CAM format {fmt!r}; known: {', '.join(CAM_FORMATS)}")
    keys = _as_numpy(keys, np.int64).reshape(-1)
    dtype = np.float16 if fp16 else np.float32
    high_res = _as_numpy(high_res, dtype)
    if high_res.ndim != 3 or high_res.shape[0] != keys.size:
        raise ValueError(f"high_res must be (len(keys)={keys.size}, H, W), got {high_res.shape}")
    if fmt == "irn":
        if low_res is None:
            raise ValueError("the irn format needs the stride-4 maps (low_res)")
        low_res = _as_numpy(low_res, dtype)
        if low_res.shape[0] != keys.size:
            raise ValueError(f"low_res must have {keys.size} maps, got {low_res.shape}")
    # after the cast: values beyond float16's range turn into inf there
    check_finite_cams(where, high_res=high_res, low_res=low_res if fmt == "irn" else None)
    if fmt == "irn":
        payload = {"keys": keys, "cam": torch.from_numpy(low_res), "high_res": high_res}
    else:
        payload = {int(k): high_res[i] for i, k in enumerate(keys)}
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    return buffer.getvalue()


def save_cam_file(path, keys, high_res, low_res=None, fmt: str = "irn",
                  fp16: bool = False) -> int:
    """Write a CAM file atomically; returns its size in bytes."""
    data = cam_file_bytes(keys, high_res, low_res, fmt, fp16, where=os.fspath(path))
    atomic_write_bytes(path, data)
    return len(data)


def load_cam_file(path) -> CamRecord:
    """Read a CAM file of any supported format; ``CamFileError`` names the path and the problem."""
    try:
        loaded = np.load(path, allow_pickle=True)
        payload = loaded.item() if isinstance(loaded, np.ndarray) and loaded.dtype == object \
            else loaded
    except (OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            RuntimeError) as error:
        raise CamFileError(f"{os.fspath(path)}: unreadable CAM file "
                           f"({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict):
        raise CamFileError(f"{os.fspath(path)}: expected a pickled dict, got "
                           f"{type(payload).__name__}")
    try:
        record = _record(payload)
    except (KeyError, ValueError, TypeError) as error:
        raise CamFileError(f"{os.fspath(path)}: not a CAM dict ({error})") from None
    check_finite_cams(os.fspath(path), high_res=record.high_res, low_res=record.low_res)
    return record


def _record(payload: dict) -> CamRecord:
    if "keys" in payload:
        keys = _as_numpy(payload["keys"], np.int64).reshape(-1)
        maps = payload["high_res"] if "high_res" in payload else payload["attn_highres"]
        high_res = _as_numpy(maps, np.float32)
        low_res = payload.get("cam")
        low_res = None if low_res is None else _as_numpy(low_res, np.float32)
    else:
        keys = np.array(sorted(int(k) for k in payload), dtype=np.int64)
        if keys.size == 0:   # an image without positive labels: no maps, size unknown
            return CamRecord(keys=keys, high_res=np.zeros((0, 0, 0), np.float32))
        high_res = np.stack([_as_numpy(payload[k], np.float32) for k in sorted(payload)])
        low_res = None
    if high_res.ndim == 2 and keys.size == 1:
        high_res = high_res[None]
    if high_res.ndim != 3 or high_res.shape[0] != keys.size:
        raise ValueError(f"maps of shape {high_res.shape} for {keys.size} keys")
    return CamRecord(keys=keys, high_res=high_res, low_res=low_res)
