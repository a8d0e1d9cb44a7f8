"""wsss-fast: kernel-accelerated Class Activation Maps for weakly supervised segmentation."""

from wsss_fast import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
