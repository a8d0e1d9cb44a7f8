"""Benchmark cases and the variants compared on them, shared by the pytest-benchmark suites and
the report. Every variant is a zero-argument callable built by a ``make_*`` function, so inputs
are created outside the timed region."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsss_fast import ops
from wsss_fast.postprocess import upstream_random_walk
from wsss_fast.postprocess.random_walk import irn_affinity


@dataclass(frozen=True)
class AttentionCase:
    """ViT-S at 768²: 12 blocks, 6 heads of 64, 20 class tokens and 48×48 patches."""

    batch: int = 1
    blocks: int = 12
    heads: int = 6
    head_dim: int = 64
    num_cls: int = 20
    patches: int = 2304
    cls_layers: int = 3          # MCTformer: class attention of the last 3 blocks, summed
    dtype: torch.dtype = torch.float32

    @property
    def tokens(self) -> int:
        return self.num_cls + self.patches

    def qkv(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        shape = (self.batch, self.heads, self.tokens, self.head_dim)
        return [[torch.randn(*shape, generator=g).to(self.dtype) for _ in range(3)]
                for _ in range(self.blocks)]


def make_sdpa(case: AttentionCase):
    """The floor: one fused attention per block and nothing else."""
    blocks = case.qkv()

    def run():
        for q, k, v in blocks:
            F.scaled_dot_product_attention(q, k, v)

    return run


def make_attention_stats(case: AttentionCase):
    """Attention once per block plus the accumulated class→patch and patch→patch statistics."""
    blocks, scale = case.qkv(), case.head_dim ** -0.5

    def run():
        stats = ops.AttentionStats.allocate(case.batch, case.num_cls, case.patches, case.blocks,
                                            cls2patch_layers=case.cls_layers,
                                            patch2patch_layers="all")
        for i, (q, k, v) in enumerate(blocks):
            ops.attention_stats(q, k, v, scale, case.num_cls, **stats.block_kwargs(i))
        return stats

    return run


def make_materializing(case: AttentionCase):
    """The upstream pipeline: softmax per block kept, all blocks stacked, head mean, slice, sum."""
    blocks, scale, c = case.qkv(), case.head_dim ** -0.5, case.num_cls

    def run():
        maps = []
        for q, k, v in blocks:
            attn = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
            attn @ v
            maps.append(attn)
        stacked = torch.stack(maps).mean(dim=2)          # (L, B, T, T)
        cls2patch = stacked[-case.cls_layers:, :, :c, c:].sum(dim=0)
        patch2patch = stacked[:, :, c:, c:].sum(dim=0)
        return cls2patch, patch2patch

    return run


@dataclass(frozen=True)
class MergeCase:
    """MCTformer-style merge of a 640×480 image: 4 scales × flip of stride-16 maps, 20 classes."""

    classes: int = 20
    height: int = 480
    width: int = 640
    scales: tuple = (1.0, 0.5, 1.5, 2.0)

    def passes(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        maps, flips = [], []
        for s in self.scales:
            h, w = int(self.height * s) // 16, int(self.width * s) // 16
            for flipped in (False, True):
                maps.append(torch.randn(1, self.classes, h, w, generator=g))
                flips.append(flipped)
        return maps, flips


def make_merge(case: MergeCase, face: str):
    maps, flips = case.passes()
    labels = (torch.arange(case.classes) % 3 == 0).float()[None]
    size = (case.height, case.width)
    if face == "reference":
        return lambda: ops.multiscale_merge_reference(maps, flips, *size, False, labels, "sum",
                                                      "minmax", 1e-8)
    return lambda: ops.multiscale_merge(maps, size, flips=flips, labels=labels, norm="minmax")


def make_reweight(face: str, rows: int = 20, cols: int = 2304, gamma: float = 2.0):
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(rows, cols, generator=g) ** 3
    patchcam = torch.randn(rows, cols, generator=g)
    if face == "reference":
        return lambda: ops.class_patch_reweight_reference(attn, gamma, patchcam)
    return lambda: ops.class_patch_reweight(attn, gamma, patchcam=patchcam)


def make_propagate(form: str, case: AttentionCase = AttentionCase(), classes: int = 20):
    """Refinement by the patch affinity of all blocks: dense from accumulated statistics
    (attention_stats + propagate) or streaming from saved q, k (propagate_streaming)."""
    blocks, scale = case.qkv(), case.head_dim ** -0.5
    cam = torch.randn(case.batch, case.patches, classes)
    if form == "streaming":
        q = torch.stack([b[0] for b in blocks])
        k = torch.stack([b[1] for b in blocks])
        weights = [1.0] * case.blocks
        return lambda: ops.propagate_streaming(q, k, cam, scale=scale, num_cls=case.num_cls,
                                               weights=weights)

    def dense():
        affinity = torch.zeros(case.batch, case.patches, case.patches)
        for q, k, v in blocks:
            ops.attention_stats(q, k, v, scale, case.num_cls, patch2patch=affinity)
        return ops.propagate(affinity, cam)

    return dense


@dataclass(frozen=True)
class RandomWalkCase:
    """IRN's random walk on a VOC image (500×375): the stride-4 grid 94×125 (N = 11,750), K = 3
    classes, β = 10, 2^8 = 256 steps, radius 5."""

    height: int = 94
    width: int = 125
    classes: int = 3
    beta: float = 10
    exp_times: int = 8

    def inputs(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        cams = torch.rand(self.classes, self.height, self.width, generator=g)
        edge = torch.rand(self.height, self.width, generator=g) ** 3
        return cams, edge


def make_random_walk(case: RandomWalkCase, form: str):
    """From CAMs and a boundary map to walked maps: ``fused`` (``irn_affinity`` + the
    ``random_walk`` op, 69-tap stencil) or ``dense`` (upstream's ``propagate_to_edge``: dense
    N×N build on the padded grid, crop, 8 fp32 squarings)."""
    cams, edge = case.inputs()
    if form == "dense":
        return lambda: upstream_random_walk.propagate_to_edge(cams, edge, beta=case.beta,
                                                              exp_times=case.exp_times)
    return lambda: ops.random_walk(cams * (1 - edge), irn_affinity(edge, case.beta),
                                   2 ** case.exp_times)


@dataclass(frozen=True)
class PathAffinityCase:
    """IRN's affinity training step on the boundary map: the 128×128 grid of a 512² crop,
    radius 10 (152 offsets × 13,090 sources per image), batch 8, forward + backward."""

    batch: int = 8
    size: int = 128
    radius: int = 10
    dtype: torch.dtype = torch.float32

    def inputs(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        boundary = torch.rand(self.batch, 1, self.size, self.size, generator=g).to(self.dtype)
        paths = ops.irn_path_set(self.radius)
        pairs = (self.batch, paths.num_offsets, paths.window(self.size, self.size).size)
        return boundary, torch.randn(*pairs, generator=g).to(self.dtype)


def upstream_path_index(radius: int, size: int) -> list[torch.Tensor]:
    """IRN's ``PathIndex(radius, (size, size)).path_indices``: per path length, an int64 table
    (n_paths, length, n_sources) of flat grid indices (``irn:misc/indexing.py``)."""
    paths = ops.irn_path_set(radius)
    window = paths.window(size, size)
    grid = torch.arange(size * size).view(size, size)
    by_length: dict[int, list[torch.Tensor]] = {}
    for path in paths.paths:
        cells = [grid[cy:cy + window.rows, window.left + cx:window.left + cx + window.cols]
                 .reshape(-1) for cy, cx in path]
        by_length.setdefault(len(path), []).append(torch.stack(cells))
    return [torch.stack(tables) for _, tables in sorted(by_length.items())]


def upstream_to_affinity(edge: torch.Tensor, path_indices: list[torch.Tensor]) -> torch.Tensor:
    """IRN's ``to_affinity`` (``irn:net/resnet50_irn.py``): gather every path cell with
    ``index_select``, max-pool over the path axis, ``1 −``; concatenated over the lengths."""
    edge = edge.view(edge.size(0), -1)
    affinities = []
    for index in path_indices:
        gathered = torch.index_select(edge, dim=-1, index=index.view(-1))
        gathered = gathered.view(gathered.size(0), *index.shape)
        affinities.append(torch.squeeze(1 - F.max_pool2d(gathered, (gathered.size(2), 1)), dim=2))
    return torch.cat(affinities, dim=1)


def make_path_affinity(case: PathAffinityCase, form: str):
    """Boundary map → affinities → gradient of the boundary map: ``fused`` (the
    ``path_affinity`` op) or ``gather`` (upstream's ``to_affinity``, index tables prebuilt)."""
    boundary, grad_out = case.inputs()
    leaf = boundary.requires_grad_()
    if form == "gather":
        path_indices = upstream_path_index(case.radius, case.size)
        forward = lambda: upstream_to_affinity(leaf, path_indices)  # noqa: E731
    else:
        forward = lambda: ops.path_affinity(leaf, case.radius)  # noqa: E731

    def run():
        leaf.grad = None
        forward().backward(grad_out)
        return leaf.grad

    return run


def warm_up() -> None:
    """Call every op once on tiny inputs: loads the extension, registers the custom ops and starts
    the thread pool, so that memory measured afterwards belongs to the variant alone."""
    q = torch.randn(1, 2, 9, 8)
    ops.attention_stats(q, q, q, 0.3, 2, cls2patch=torch.zeros(1, 2, 7),
                        patch2patch=torch.zeros(1, 7, 7))
    F.scaled_dot_product_attention(q, q, q)
    ops.class_patch_reweight(torch.rand(2, 7), 2.0, patchcam=torch.rand(2, 7))
    ops.propagate(torch.rand(1, 7, 7), torch.rand(1, 7, 3))
    ops.propagate_streaming(q[None], q[None], torch.rand(1, 7, 3), scale=0.3, num_cls=2,
                            weights=[1.0])
    ops.multiscale_merge([torch.rand(1, 2, 3, 4)], (5, 6), norm="minmax")
    ops.multiscale_merge_reference([torch.rand(1, 2, 3, 4)], [False], 5, 6, False, None, "sum",
                                   "minmax", 1e-8)
    ops.random_walk(torch.rand(2, 3, 4), irn_affinity(torch.rand(3, 4)), 2)
    ops.path_affinity(torch.rand(1, 1, 5, 5, requires_grad=True), 2).sum().backward()


# ----------------------------------------------------------------------- whole-generator cases

def mctformer_image(height: int, width: int, seed: int = 0):
    """The image and labels the MCTformer-V2 generator benchmarks run on: smooth random colours
    (an upscaled 1/8-size noise image, so that attention is not uniform) and classes 3 and 11
    present (of 20)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    image = PIL.Image.fromarray(noise).resize((width, height), PIL.Image.BILINEAR)
    label = np.zeros(20, dtype=np.float32)
    label[[3, 11]] = 1
    return image, label


def make_fused_forward_floor(model, engine, image):
    """The floor of a CAM generator: the model's fused forward and patch CAM over the engine's
    pass batches of ``image``, nothing else (no attention statistics kept, no merge)."""
    batches = list(engine.pass_inputs(image))

    @torch.no_grad()
    def floor():
        for batch in batches:
            _, patches = model.forward_features(batch)
            model.patch_cam(patches, *batch.shape[-2:])

    return floor
