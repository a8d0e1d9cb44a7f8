"""Loading upstream checkpoints by their own key names.

Accepts ``{'model': state_dict}`` (MCTformer, DeiT), ``{'state_dict': ...}``, or a plain state
dict (TransCAM); strips DataParallel/DDP ``module.`` prefixes. A mismatch raises
``CheckpointMismatch`` listing every missing key, unexpected key and shape conflict at once.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model; the message lists every difference."""


def read_state_dict(source) -> dict:
    """A plain ``{name: tensor}`` dict from a path, a wrapper dict or a state dict."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise FileNotFoundError(f"checkpoint not found: {source}")
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise CheckpointMismatch(f"a checkpoint must be a dict, got {type(source).__name__}")
    for wrapper in ("model", "state_dict", "model_state"):
        if wrapper in source and isinstance(source[wrapper], Mapping):
            source = source[wrapper]
            break
    state = {}
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            continue
        state[key[len("module."):] if key.startswith("module.") else key] = value
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
