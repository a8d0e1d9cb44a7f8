"""Public ops. Each has a reference face (the specification) and fused faces, declared once with
``wsss_fast.ops._op.define_op`` and chosen per call by device, build and the faces' own input
limits (``wsss_fast.ops._backend``, DESIGN §3). ABI numbers and limits: ``csrc/common/abi.h``."""

from wsss_fast.ops._backend import (BackendUnavailable, choose_face, cpu_extension_available,
                                    cpu_extension_error)
from wsss_fast.ops.attention_stats import (AttentionStats, attention_stats,
                                           attention_stats_reference, block_weights)
from wsss_fast.ops.class_patch_reweight import class_patch_reweight, class_patch_reweight_reference
from wsss_fast.ops.irn_paths import IrnPathSet, SourceWindow, irn_path, irn_path_set
from wsss_fast.ops.kmeans import KMeansResult, kmeans, kmeans_reference
from wsss_fast.ops.multiscale_merge import multiscale_merge, multiscale_merge_reference
from wsss_fast.ops.path_affinity import path_affinity, path_affinity_reference
from wsss_fast.ops.propagate import (propagate, propagate_reference, propagate_streaming,
                                     propagate_streaming_reference)
from wsss_fast.ops.prototype_cam import prototype_cam, prototype_weight
from wsss_fast.ops.random_walk import half_disk_offsets, random_walk, random_walk_reference

__all__ = [
    "AttentionStats", "BackendUnavailable", "IrnPathSet", "KMeansResult", "SourceWindow",
    "attention_stats", "attention_stats_reference", "block_weights", "choose_face",
    "class_patch_reweight", "class_patch_reweight_reference", "cpu_extension_available",
    "cpu_extension_error", "half_disk_offsets", "irn_path", "irn_path_set", "kmeans",
    "kmeans_reference", "multiscale_merge", "multiscale_merge_reference", "path_affinity",
    "path_affinity_reference", "propagate", "propagate_reference", "propagate_streaming",
    "propagate_streaming_reference", "prototype_cam", "prototype_weight", "random_walk",
    "random_walk_reference",
]
