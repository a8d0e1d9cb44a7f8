"""Reading torch files, and loading upstream checkpoints by their own key names.

``read_torch_file`` is the one reader of torch files (checkpoints, training states, prototypes):
an empty, truncated, corrupt or non-torch file, or one that needs unsafe unpickling, raises
``CheckpointError`` with one line naming the file and the problem.

``read_state_dict`` accepts ``{'model': state_dict}`` (MCTformer, DeiT), ``{'state_dict': ...}``,
or a plain state dict (TransCAM); strips DataParallel/DDP ``module.`` prefixes, and refuses
weights with NaN or inf values. A mismatch with the model raises ``CheckpointMismatch`` listing
every missing key, unexpected key and shape conflict at once.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_START = b"\x80"   # files of torch < 1.6 (_use_new_zipfile_serialization=False) are pickles


class CheckpointError(ValueError):
    """A torch file that cannot be used; the one-line message names the file and the problem."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint does not fit the model; the message lists every difference."""


def _unsafe_detail(error: Exception) -> str:
    """What torch's weights_only refusal refused, without its advice to load the file unsafely."""
    text = str(error)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return f"it holds a pickled {match.group(1)} object"
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return match.group(1).strip().rstrip(".") if match else "unknown pickle content"


def read_torch_file(path, what: str = "checkpoint", required: Sequence[str] = ()) -> Any:
    """Load a torch file on the CPU, unpickling only tensors and plain containers.

    ``what`` names the file's role in messages; ``required`` lists top-level keys the file must
    hold (it must then be a dict). Raises ``FileNotFoundError`` for a missing file and
    ``CheckpointError`` for anything else wrong with it.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"{what} not found: {name}")
    if os.path.isdir(name):
        raise CheckpointError(f"{name}: is a directory, not a {what} file")
    size = os.path.getsize(name)
    if size == 0:
        raise CheckpointError(f"{name}: empty file (0 bytes), not a {what}")
    with open(name, "rb") as handle:
        head = handle.read(8)
    if not head.startswith((_ZIP_MAGIC, _PICKLE_START)):
        raise CheckpointError(f"{name}: not a torch file (first bytes {head[:8]!r}), so not a "
                              f"{what}")
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(name):
        raise CheckpointError(f"{name}: truncated {what} ({size} bytes; the zip archive's end "
                              f"record is missing: the file was cut short)")
    try:
        payload = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(f"{name}: cannot be read safely as a {what} "
                                  f"({_unsafe_detail(error)}; only tensors and plain containers "
                                  f"are unpickled)") from None
        detail = str(error).splitlines()[0] if str(error) else "no detail"
        raise CheckpointError(f"{name}: corrupt {what} (unpickling failed: {detail})") from None
    except (OSError, EOFError, RuntimeError, zipfile.BadZipFile, KeyError, ValueError,
            IndexError, TypeError, AttributeError) as error:
        # torch reports a torn zip archive as "[Errno 22] Invalid argument", a torn legacy file
        # as a bare EOFError: the size says what happened.
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{name}: truncated or corrupt {what} ({size} bytes; torch "
                              f"could not read it: {detail})") from None
    if required:
        if not isinstance(payload, Mapping):
            raise CheckpointError(f"{name}: not a {what} (a dict was expected, the file holds "
                                  f"{type(payload).__name__})")
        missing = [key for key in required if key not in payload]
        if missing:
            raise CheckpointError(f"{name}: not a {what} (missing {', '.join(map(repr, missing))};"
                                  f" it holds {', '.join(map(repr, list(payload)[:8]))})")
    return payload


def torch_file_bytes(obj) -> bytes:
    """The bytes ``torch.save`` writes for ``obj`` (for ``atomic_write_group`` and checksums)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def check_finite_weights(state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` if a floating tensor holds NaN or inf, naming the first such key,
    how many of its values, and how many tensors are affected."""
    broken = []
    for key, value in state.items():
        if value.device.type == "meta":
            continue   # no data to check (a state dict built for its layout only)
        if (value.is_floating_point() or value.is_complex()) and value.numel():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                broken.append((key, bad, value.numel()))
    if broken:
        key, bad, total = broken[0]
        others = f" and {len(broken) - 1} more tensor(s)" if len(broken) > 1 else ""
        raise CheckpointError(f"{where}: non-finite weights: {key!r} has {bad} NaN/inf values "
                              f"of {total}{others}; the CAMs would be NaN")


def read_state_dict(source, *, check_finite: bool = True) -> dict:
    """A plain ``{name: tensor}`` dict from a path, a wrapper dict or a state dict; refuses
    non-finite weights unless ``check_finite=False``."""
    where = "checkpoint"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        source = read_torch_file(source, "checkpoint")
    if not isinstance(source, Mapping):
        raise CheckpointError(f"{where}: a checkpoint must be a dict, got {type(source).__name__}")
    for wrapper in ("model", "state_dict", "model_state"):
        if wrapper in source and isinstance(source[wrapper], Mapping):
            source = source[wrapper]
            break
    state = {}
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            continue
        state[key[len("module."):] if key.startswith("module.") else key] = value
    if not state and source:
        raise CheckpointError(f"{where}: no tensors in the checkpoint (its keys: "
                              f"{', '.join(map(repr, list(source)[:8]))})")
    if check_finite:
        check_finite_weights(state, where)
    return state


def _natural_key(name: str):
    """blocks.2 before blocks.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _summarize(title: str, items: Iterable[str]) -> str:
    items = sorted(items, key=_natural_key)
    return f"{title} ({len(items)}): {', '.join(items)}"


def load_checkpoint(model: nn.Module, source, *, strict: bool = True,
                    ignore: Iterable[str] = (),
                    remap: Optional[Callable[[dict], dict]] = None) -> nn.Module:
    """Load ``source`` into ``model``.

    Args:
        source: a path, ``{'model': sd}``, ``{'state_dict': sd}`` or a plain state dict.
        strict: raise on missing or unexpected keys (shape conflicts always raise).
        ignore: model keys allowed to be absent from the checkpoint (e.g. unused heads).
        remap: optional function applied to the state dict first (checkpoint filters).
    """
    state = read_state_dict(source)
    if remap is not None:
        state = remap(state)
    expected = model.state_dict()
    ignore = set(ignore)
    missing = [k for k in expected if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in expected]
    conflicts = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in state if k in expected and state[k].shape != expected[k].shape]
    problems = []
    if conflicts:
        problems.append(_summarize("shape conflicts", conflicts))
    if strict and missing:
        problems.append(_summarize("missing keys", missing))
    if strict and unexpected:
        problems.append(_summarize("unexpected keys", unexpected))
    if problems:
        raise CheckpointMismatch(f"checkpoint does not fit {type(model).__name__}: "
                                 + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model


def _adapted_prefix_tokens(key: str, saved: torch.Tensor, current: torch.Tensor,
                           patches: Optional[int], from_backbone: bool) -> Optional[torch.Tensor]:
    """A ViT's class tokens or positional embedding ``(1, T, D)`` from a model with another
    number of class tokens. The patch position rows (the last ``patches``) are copied. With
    ``from_backbone``, every class token gets the checkpoint's first (class) row added to its
    own initialization and every class position row is the checkpoint's class row; without it
    the class tokens are not adaptable (None) and the class position rows keep ``current``'s
    initialization. None: not adaptable."""
    if saved.dim() != 3 or current.dim() != 3 or saved.shape[::2] != current.shape[::2]:
        return None
    saved, adapted = saved.to(current.dtype), current.clone()
    if key.split(".")[-1] == "cls_token":
        return adapted + saved[:, :1] if from_backbone else None
    if key.split(".")[-1] != "pos_embed" or not patches:
        return None
    saved_prefix, prefix = saved.shape[1] - patches, current.shape[1] - patches
    if saved_prefix < 1 or prefix < 1:
        return None
    adapted[:, prefix:] = saved[:, saved_prefix:]
    if from_backbone:
        adapted[:, :prefix] = saved[:, :1]
    return adapted


def load_matching(model: nn.Module, source) -> dict:
    """Load every tensor of ``source`` (a path or state dict) that fits ``model`` by name and
    shape, and report the rest, for starting a method from a pretrained backbone.

    ViT class tokens and positional embeddings whose class-token count differs (a one-token
    backbone into MCTformer's C tokens) are adapted (``_adapted_prefix_tokens``), the class rows
    from the backbone's unless the model's ``class_tokens_from_backbone`` is False (then the
    class tokens are shape-mismatched and, with the class position rows, keep their init;
    the report's ``class_tokens`` says which). Returns lists
    of keys: ``loaded``, ``adapted``, ``missing`` (in the model, not in the checkpoint),
    ``unexpected`` (in the checkpoint only) and ``shape_mismatched`` (in both, shapes differ:
    ``"key: checkpoint (...) vs model (...)"``), plus the counts of loaded values. Missing and
    shape-mismatched keys keep the model's initialization.
    """
    state = read_state_dict(source)
    expected = model.state_dict()
    patches = getattr(model, "train_grid", None)
    patches = patches ** 2 if isinstance(patches, int) else None
    from_backbone = getattr(model, "class_tokens_from_backbone", True)
    load, adapted, mismatched = {}, [], []
    values = 0      # loaded from the checkpoint (an adapted tensor: its patch rows)
    for key, value in state.items():
        if key not in expected:
            continue
        if value.shape == expected[key].shape:
            load[key] = value
            values += value.numel()
            continue
        fitted = _adapted_prefix_tokens(key, value, expected[key], patches, from_backbone)
        if fitted is None:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model "
                              f"{tuple(expected[key].shape)}")
        else:
            load[key] = fitted
            adapted.append(key)
            values += value.numel() if key.split(".")[-1] == "cls_token" else \
                (patches + (1 if from_backbone else 0)) * value.shape[-1]
    model.load_state_dict(load, strict=False)
    order = sorted(load, key=_natural_key)
    return {"loaded": [k for k in order if k not in adapted], "adapted": sorted(adapted),
            "missing": sorted((k for k in expected if k not in state), key=_natural_key),
            "unexpected": sorted((k for k in state if k not in expected), key=_natural_key),
            "shape_mismatched": sorted(mismatched, key=_natural_key),
            "class_tokens": (None if not adapted else "from the backbone's class token"
                             if from_backbone else "kept initialized"),
            "loaded_values": int(values),
            "model_values": int(sum(v.numel() for v in expected.values()))}


def describe_load(report: dict, source) -> str:
    """A few lines summarizing a ``load_matching`` report (every non-loaded key named)."""
    lines = [f"init {source}: loaded {len(report['loaded'])} tensors "
             f"({report['loaded_values']:,} of the model's {report['model_values']:,} values)"
             + (f", adapted {len(report['adapted'])} ({', '.join(report['adapted'])}: patch "
                f"rows loaded, class tokens {report.get('class_tokens')})"
                if report["adapted"] else "")]
    for title in ("missing", "unexpected", "shape_mismatched"):
        if report[title]:
            lines.append("  " + _summarize(title.replace("_", "-") + " (kept initialized)"
                                           if title != "unexpected" else "unexpected (ignored)",
                                           report[title]))
    return "\n".join(lines)
