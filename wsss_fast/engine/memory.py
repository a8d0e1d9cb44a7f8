"""The engine's memory budget: what one forward pass needs, estimated before it runs.

A pass of ``b`` images (with flips: 2 per image) at ``h × w`` needs about

- activations: transformers ``b · T · D · 4 B · VIT_ACTIVATION_FACTOR`` (T tokens of width D:
  the block's input, its q/k/v, the MLP's hidden layer and the residual are alive together),
  convolutional trunks ``b · 3·h·w · 4 B · CNN_ACTIVATION_FACTOR`` (ResNet-style stages at
  strides 2–16 keep a few maps of 64–2048 channels);
- dense affinity: ``b · P² · 4 B`` per (B, P, P) map alive: the fp32 ``patch2patch``
  accumulator of models that refine with the patch affinity (one buffer, whatever the number of
  blocks summed into it) and DOEI's three hybrid-attention maps in its blocks;
- streaming affinity instead of the accumulator: every block's q and k, twice (the list the
  forward fills and its stacked copy), ``4 · L · b · T · D · 4 B``. That is less than the dense
  map only for large grids (P ≳ 4·L·D patches: ~18k for DeiT-S, a 2200² image at 1×).

``plan_pass`` picks dense affinity when it fits the budget, else streaming where the model
offers it (``cam_maps(affinity=...)``) and it fits, else refuses the pass with
``ImageTooLarge`` naming the smaller need. The
estimate is deliberately coarse (an upper bound of the live tensors, not allocator overhead);
the budget defaults to half the available RAM on a CPU and 90% of the free memory on a GPU.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

MIB = 2**20
VIT_ACTIVATION_FACTOR = 16
CNN_ACTIVATION_FACTOR = 64
DOEI_DENSE_MAPS = 3
FALLBACK_BUDGET_MIB = 8192.0


class ImageTooLarge(ValueError):
    """A pass of this image needs more memory than the budget, even with streaming affinity."""


def default_memory_budget_mib(device: torch.device) -> float:
    """Half the available RAM (CPU) or 90% of the free memory of the GPU; 8 GiB if unknown."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return 0.9 * free / MIB
        except (RuntimeError, AssertionError):
            return FALLBACK_BUDGET_MIB
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return 0.5 * int(line.split()[1]) * 1024 / MIB
    except (OSError, ValueError, IndexError):
        pass
    return FALLBACK_BUDGET_MIB


def _parameter(function, name: str):
    """The parameter ``name`` of ``function`` (None if absent)."""
    try:
        return inspect.signature(function).parameters.get(name)
    except (TypeError, ValueError):
        return None


def _cam_model(model):
    """The model whose ``cam_maps`` does the work (DOEI wraps an MCTformer and forwards its
    keyword arguments)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) and hasattr(inner, "cam_maps") else model


def _cam_maps(model):
    """The class's ``cam_maps`` (an instance attribute may wrap it with ``**kwargs``)."""
    return getattr(type(_cam_model(model)), "cam_maps", None)


def accepts_affinity(model) -> bool:
    """Whether ``model.cam_maps`` takes ``affinity="dense"|"streaming"``."""
    return _parameter(_cam_maps(model), "affinity") is not None


def refines(model, cam_kwargs: dict) -> bool:
    """Whether the passes accumulate a dense patch affinity (``refine``, its default else)."""
    if "refine" in cam_kwargs:
        return bool(cam_kwargs["refine"])
    parameter = _parameter(_cam_maps(model), "refine")
    return parameter is not None and parameter.default is True


def _token_grid(model, height: int, width: int) -> Optional[tuple[int, int]]:
    for name in ("token_grid", "grid"):
        grid = getattr(model, name, None)
        if grid is not None and getattr(_cam_model(model), "embed_dim", None) is not None:
            return grid(height, width)
    return None


@dataclass(frozen=True)
class PassPlan:
    """How one pass runs: ``affinity`` ("dense", "streaming" or None where the model has no
    choice) and the estimated bytes it needs."""

    affinity: Optional[str]
    bytes: int


def pass_bytes(model, batch: int, height: int, width: int, cam_kwargs: dict,
               streaming: bool) -> int:
    """The estimated peak bytes of one pass (see the module's notes)."""
    inner = _cam_model(model)
    total = 0
    if not hasattr(inner, "patch_embed"):   # a convolutional trunk (ResNet, Conformer's CNN)
        total += batch * 3 * height * width * 4 * CNN_ACTIVATION_FACTOR
    grid = _token_grid(model, height, width)
    if grid is not None:
        width_d = int(inner.embed_dim)
        patches = grid[0] * grid[1]
        class_tokens = getattr(inner, "cls_token", None)   # MCTformer: one per class
        tokens = patches + (1 if class_tokens is None else int(class_tokens.shape[1]))
        blocks = getattr(inner, "blocks", None)   # (Conformer's `blocks` is a method)
        depth = (len(blocks) if isinstance(blocks, torch.nn.ModuleList)
                 else int(getattr(inner, "depth", 1)))
        total += batch * tokens * width_d * 4 * VIT_ACTIVATION_FACTOR
        dense_maps = DOEI_DENSE_MAPS if inner is not model else 0
        if refines(model, cam_kwargs):
            if streaming:
                total += 4 * depth * batch * tokens * width_d * 4
            else:
                dense_maps += 1
        total += dense_maps * batch * patches * patches * 4
    return total


def plan_pass(model, batch: int, height: int, width: int, cam_kwargs: dict, *,
              budget_mib: float, max_affinity_mib: Optional[float] = None,
              image_size: Optional[tuple[int, int]] = None) -> PassPlan:
    """The plan of one pass of ``batch`` inputs of ``height × width`` under ``budget_mib``;
    ``max_affinity_mib`` also sends passes whose dense affinity alone exceeds it to streaming.
    Raises ``ImageTooLarge`` naming the image (``image_size``: its width and height) when no
    plan fits."""
    budget = budget_mib * MIB
    plans = [PassPlan(None, pass_bytes(model, batch, height, width, cam_kwargs,
                                       streaming=False))]
    if accepts_affinity(model) and refines(model, cam_kwargs):
        grid = _token_grid(model, height, width) or (0, 0)
        affinity_mib = batch * (grid[0] * grid[1]) ** 2 * 4 / MIB
        streaming = PassPlan("streaming", pass_bytes(model, batch, height, width, cam_kwargs,
                                                     streaming=True))
        dense = PassPlan("dense", plans[0].bytes)
        over_cap = max_affinity_mib is not None and affinity_mib > max_affinity_mib
        plans = [streaming, dense] if over_cap else [dense, streaming]
    for plan in plans:
        if plan.bytes <= budget:
            return plan
    image_width, image_height = image_size or (width, height)
    raise ImageTooLarge(
        f"image {image_width}×{image_height} is too large "
        f"({image_width * image_height / 1e6:.1f} MP, needs ~"
        f"{_gb(min(plan.bytes for plan in plans))} GB of a {_gb(budget)} GB budget; raise "
        f"--max-memory-mib or downscale)")


def _gb(size: float) -> str:
    return f"{size / 1e9:.2g}"
