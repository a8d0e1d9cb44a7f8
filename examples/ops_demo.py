"""The kernel core on an MCTformer-V2-shaped CAM computation (random weights, no download):

    python examples/ops_demo.py [--height 480 --width 640 --scales 1.0 0.5]

Per scale and flip, 12 blocks of ViT-S attention feed the class→patch rows (last 3 blocks) and
the patch affinity (all blocks) through ``attention_stats``; the CAM is the V2 fusion
``class_patch_reweight(cls2patch, 1, patchcam)`` refined by ``propagate``; ``multiscale_merge``
resizes, flips back, sums and min-max normalizes. The same computation runs on the reference
faces (upstream-style, attention materialized), and the demo prints the difference and times.
"""

from __future__ import annotations

import argparse
import time

import torch

from wsss_fast import ops
from wsss_fast.ops import _backend

HEADS, HEAD_DIM, BLOCKS, CLASSES, PATCH = 6, 64, 12, 20, 16


def passes(height, width, scales, gen):
    for s in scales:
        h, w = round(height * s) // PATCH, round(width * s) // PATCH
        q, k, v = (torch.randn(BLOCKS, 2, HEADS, CLASSES + h * w, HEAD_DIM, generator=gen)
                   for _ in range(3))
        patchcam = torch.randn(2, CLASSES, h, w, generator=gen)  # image and its flip, batched
        yield (h, w), q, k, v, patchcam


def cams_fused(q, k, v, patchcam, h, w):
    stats = ops.AttentionStats.allocate(2, CLASSES, h * w, BLOCKS, cls2patch_layers=3,
                                        patch2patch_layers="all")
    for i in range(BLOCKS):
        ops.attention_stats(q[i], k[i], v[i], HEAD_DIM ** -0.5, CLASSES, **stats.block_kwargs(i))
    cams = ops.class_patch_reweight(stats.cls2patch, 1.0, patchcam=patchcam)    # (2, C, P)
    refined = ops.propagate(stats.patch2patch, cams.transpose(1, 2).contiguous())
    return refined.transpose(1, 2).reshape(2, CLASSES, h, w)


def cams_reference(q, k, v, patchcam, h, w):
    maps = [torch.softmax(q[i] @ k[i].transpose(-1, -2) * HEAD_DIM ** -0.5, -1)
            for i in range(BLOCKS)]
    attn = torch.stack(maps).mean(dim=2)                                         # (L, 2, T, T)
    cls2patch = attn[-3:, :, :CLASSES, CLASSES:].sum(0)
    affinity = attn[:, :, CLASSES:, CLASSES:].sum(0)
    cams = cls2patch * patchcam.flatten(2).clamp_min(0)
    return torch.bmm(affinity, cams.transpose(1, 2)).transpose(1, 2).reshape(2, CLASSES, h, w)


def run(cam_fn, inputs, size, labels):
    start = time.perf_counter()
    per_pass, flips = [], []
    for (h, w), q, k, v, patchcam in inputs:
        cams = cam_fn(q, k, v, patchcam, h, w)
        per_pass += [cams[:1], cams[1:]]
        flips += [False, True]
    merged = ops.multiscale_merge(per_pass, size, flips=flips, labels=labels, norm="minmax")
    return merged, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"wsss-fast kernel core demo: {args.height}x{args.width}, scales {args.scales} x flip, "
          f"ViT-S ({BLOCKS} blocks, {HEADS} heads), {CLASSES} class tokens")
    print(f"CPU face: {_backend.cpu_extension_error() or 'built'}; "
          f"{torch.get_num_threads()} threads")
    inputs = list(passes(args.height, args.width, args.scales, torch.Generator().manual_seed(args.seed)))
    labels = torch.zeros(1, CLASSES)
    labels[0, [3, 11]] = 1.0
    size = (args.height, args.width)
    # One-time costs stay out of the timings: torch imports torch._dynamo (~1.5 s) on the first
    # call of any custom op that mutates its inputs.
    warm = list(passes(64, 64, [1.0], torch.Generator().manual_seed(1)))
    run(cams_fused, warm, (64, 64), labels)
    run(cams_reference, warm, (64, 64), labels)
    fused, t_fused = run(cams_fused, inputs, size, labels)
    reference, t_reference = run(cams_reference, inputs, size, labels)
    err = (fused - reference).abs().max().item()
    print(f"fused faces:     {t_fused:6.2f} s")
    print(f"reference faces: {t_reference:6.2f} s (attention materialized, as upstream)")
    print(f"max |fused - reference| over the normalized CAMs: {err:.2e}")
    for c in (3, 11):
        print(f"class {c}: min {fused[0, c].min():.3f} max {fused[0, c].max():.3f} "
              f"mean {fused[0, c].mean():.3f}")
    if err > 1e-4:
        raise SystemExit(f"fused and reference CAMs differ by {err:.2e} (> 1e-4)")


if __name__ == "__main__":
    main()
