"""Why a trained TransCAM / BNR Conformer does (not) localize: the README's measurements.

    python examples/conformer_diagnosis.py DEMO/transcam/train/checkpoint.pth DEMO/data \
        [--compare DEMO/lpcam/train/checkpoint.pth] [--png maps.png]

Prints, on the first --images validation images resized to --size squares:

* classification mAP of each head (conv = GAP(M), transformer = the class token), against the
  chance level (the mean class frequency): a head at chance has learned nothing;
* per block, the mean entropy of the patch→patch attention rows, against log(P) (uniform rows);
  rows near log(P) or collapsed onto a few sink tokens make A* a global average, so A*·M is flat;
* the locality of M: the share of the input-gradient mass of the centre cell of M within ±24 px
  of that cell (3×3 cells at stride 16), for the checkpoint and for the same model at random
  init (and for --compare, a resnet_cam checkpoint: its CAM is ``W · features``).

--png writes, per present class of the first 6 images: image, M, A*·M and the column sums of A*.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss_fast import ops
from wsss_fast.constants import IMAGENET_MEAN, IMAGENET_STD
from wsss_fast.engine.cam_engine import load_image, to_normalized_tensor
from wsss_fast.models.checkpoint import read_state_dict
from wsss_fast.models.registry import MODELS, create_model
from wsss_fast.train.pretrain import average_precision


def load_split(data: Path, images: int, size: int):
    ids = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:images]
    labels = np.load(data / "cls_labels.npy", allow_pickle=True).item()
    targets = np.stack([labels[int(i.replace("_", ""))] for i in ids])
    pictures = [load_image(data / "JPEGImages" / f"{i}.jpg").resize((size, size), 3)
                for i in ids]   # 3: PIL bicubic, as the transcam preset
    x = torch.stack([to_normalized_tensor(p, IMAGENET_MEAN, IMAGENET_STD) for p in pictures])
    return x, targets, pictures


def cam_of(model, x: torch.Tensor) -> torch.Tensor:
    """The map whose locality is measured: M for a Conformer, ``W · features`` for a ResNet."""
    if hasattr(model, "conv_cls_head"):
        return model.cam_maps(x, refine=False)
    return F.conv2d(model.features(x), model.classifier.weight)


def locality(model, x: torch.Tensor, radius: int = 24) -> float:
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        cam = cam_of(model, x)
        h, w = cam.shape[-2:]
        cam[:, :, h // 2, w // 2].sum().backward()
    grad = x.grad.abs().sum(1).mean(0)
    cy, cx = [(n // 2) * (s // n) + (s // n) // 2 for n, s in ((h, x.shape[-2]), (w, x.shape[-1]))]
    window = grad[max(cy - radius, 0):cy + radius, max(cx - radius, 0):cx + radius]
    return float(window.sum() / grad.sum())


@torch.no_grad()
def attention_per_block(model, x: torch.Tensor) -> list[torch.Tensor]:
    """``(B, P, P)`` head-mean patch→patch attention of each block."""
    h, w = model.token_grid(*x.shape[-2:])
    maps = []
    for block in range(model.depth):
        stats = ops.AttentionStats.allocate(x.shape[0], 1, h * w, model.depth,
                                            patch2patch_layers=[block])
        model.forward_features(x, stats)
        maps.append(stats.patch2patch.clone())
    return maps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--model", default="transcam_tiny")
    parser.add_argument("--compare", help="a resnet_cam_tiny checkpoint (IRN CAM / LPCAM row)")
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = create_model(args.model, checkpoint=args.checkpoint).eval()
    x, targets, pictures = load_split(Path(args.data), args.images, args.size)
    with torch.no_grad():
        conv, trans = (torch.cat(t)[:, 1:].numpy() for t in
                       zip(*(model(x[i:i + 16]) for i in range(0, len(x), 16))))
    print(f"val mAP (chance {100 * targets.mean():.1f}): conv head "
          f"{100 * np.nanmean(average_precision(conv, targets)):.1f}, transformer head "
          f"{100 * np.nanmean(average_precision(trans, targets)):.1f}")
    maps = attention_per_block(model, x[:16])
    entropy = [float(-(a * torch.log(a.clamp_min(1e-12))).sum(-1).mean()) for a in
               (m / m.sum(-1, keepdim=True) for m in maps)]
    print(f"attention row entropy per block (uniform {np.log(maps[0].shape[-1]):.2f}): "
          + " ".join(f"{e:.2f}" for e in entropy))
    # the same architecture (read from the checkpoint), freshly initialized
    fresh = create_model(args.model, **MODELS.get(args.model).config_from_state(
        read_state_dict(args.checkpoint))).eval()
    print(f"M locality (gradient mass within ±24 px): trained {locality(model, x[:8]):.2f}, "
          f"random init {locality(fresh, x[:8]):.2f}", end="")
    if args.compare:
        other = create_model("resnet_cam_tiny", checkpoint=args.compare).eval()
        print(f", resnet_cam_tiny {locality(other, x[:8]):.2f}", end="")
    print(f" (uniform {48 * 48 / (args.size * args.size):.2f})")
    if args.png:
        write_png(model, x, targets, pictures, sum(maps), args.png)


def write_png(model, x, targets, pictures, affinity, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    with torch.no_grad():
        m_maps = model.cam_maps(x[:6], refine=False)[:, 1:]
    h, w = m_maps.shape[-2:]
    for i in range(min(6, len(x))):
        for k in np.nonzero(targets[i])[0]:
            m = m_maps[i, k]
            rows.append((pictures[i], m, (affinity[i] @ m.flatten()).reshape(h, w),
                         affinity[i].sum(0).reshape(h, w), k))
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2 * len(rows)), squeeze=False)
    for r, (picture, m, am, column, k) in enumerate(rows):
        for ax, image, title in zip(axes[r], (picture, m, am, column),
                                    (f"class {k}", "M", "A*·M", "column sums of A*")):
            ax.imshow(image)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=60)


if __name__ == "__main__":
    main()
