"""Make the pinned CUDA build of torchvision importable on a CPU-only torch.

torchvision 0.28 registers fake kernels for ``torchvision::nms``/``qnms`` at import time; on a
CPU torch those operators were never defined by its (CUDA-only) C extension, so the import fails
with "operator torchvision::nms does not exist" — and timm imports torchvision. Defining the two
schemas first (with no kernels) lets the import succeed; calling them still raises.
"""

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _define_missing_torchvision_schemas() -> None:
    missing = [name for name in _SCHEMAS if not _has_schema(name)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _LIBS.append(lib)  # a Library object unregisters its definitions when collected


def _has_schema(name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


_LIBS: list = []
_define_missing_torchvision_schemas()
