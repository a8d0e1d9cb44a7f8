"""Our CAM generators against the official ones, side by side in one run (issue 13, item 4).

    python -m benchmarks.compare_official --mctformer-repo ~/src/MCTformer [--transcam-repo ~/src/TransCAM]
    python -m benchmarks.compare_official --mctformer-repo PATH --quick   # smoke test: 2 small
                                                                        # images, tiny models

The official code is imported from the checkout given (xulianuwa/MCTformer, liruiwen/TransCAM;
the golden outputs in tests/data/golden name the commits); nothing of it is copied here. Without
a path the comparison is skipped with one line (exit 0).

Same weights, images and scales for both sides:
* weights: ``--mctformer-checkpoint`` / ``--transcam-checkpoint`` in the upstream layouts
  (MCTformer ``{'model': sd}`` of ``deit_small_MCTformerV2_patch16_224``, TransCAM's plain state
  dict of ``Net_sm``); without one, ``wsss-fast train`` trains the full-size model briefly
  (``--train-steps``) on a synthetic set, so that maps have structure (random weights give
  nearly flat maps whose min-max amplifies rounding);
* images: synthetic ``--size`` images in VOC layout (``--images`` of them);
* MCTformer-V2: the official ``engine.generate_attention_maps_ms`` with ``VOC12DatasetMS``, scales
  1.0/0.5/1.5/2.0 × flip, layer_index 3, fused attention, patch-attention refinement, batch 1,
  ``.npy`` dicts saved; ours ``CamEngine(model, "mctformer_v2")`` with the same scales;
* TransCAM: ``benchmarks.transcam_report``'s comparison (the one runner of the official
  ``infer_TransCAM.py``: squares 256/512/768 × flip on VOC-size synthetic images, its two CRF
  seeds timed apart per image, so that CAM-only times compare like with like) with the same
  weights.

Each side runs in its own subprocess: model loaded and warmed up on a small image, peak RSS reset
(VmHWM, /proc/self/clear_refs), then every image, its output saved as upstream does. Sides run in
interleaved rounds; the best round's time counts. max |diff| is over the saved per-class
normalized maps of both sides. The only run-time adaptations of the official code are that
``.cuda()`` is a no-op, ``PIL.Image.CUBIC`` is mapped to ``BICUBIC`` (removed in Pillow 10) and
``wsss_fast`` is imported first (it makes the pinned CUDA torchvision importable on CPU torch,
which timm needs), and where scikit-learn is missing a stub ``sklearn.metrics`` lets MCTformer's
``engine.py`` import (it uses it for training-time mAP only; the stub raises if called).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

from benchmarks.brief_training import train_briefly
from benchmarks.transcam_report import transcam_section

MCT_SCALES = (1.0, 0.5, 1.5, 2.0)
MCT_MODEL = "deit_small_MCTformerV2_patch16_224"
TRANSCAM_CLASSES = 20          # infer_TransCAM.py hard-codes VOC's 20 classes (21 outputs)
SIDES = ("theirs", "ours")


# ---------------------------------------------------------------------------------- checks


def check_repo(family: str, path: str) -> Path:
    """The checkout must hold the files the official generator is run from."""
    need = {"mctformer": ("models.py", "engine.py", "datasets.py", "vision_transformer.py"),
            "transcam": ("infer_TransCAM.py", "network/conformer_CAM.py", "voc12/data.py",
                         "tool/imutils.py")}[family]
    root = Path(path).expanduser().resolve()
    missing = [f for f in need if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"compare_official: --{family}-repo {path} is not a {family} checkout "
                         f"(missing {', '.join(missing)})")
    return root


# ---------------------------------------------------------------------------------- data


def prepare_images(work: Path, count: int, size: tuple[int, int], num_classes: int) -> Path:
    """Synthetic images in VOC layout plus what the official MCTformer loader reads:
    ``train_aug_id.txt``, ``voc12/cls_labels.npy`` keyed by image id (read relative to the
    working directory), and a warm-up image."""
    import PIL.Image

    from wsss_fast.data.synthetic import generate_synthetic

    root = work / f"mctformer_images_{count}_{size[0]}x{size[1]}_k{num_classes}"
    if (root / "ready").exists():
        return root
    generate_synthetic(root / "voc", num_train=count, num_val=0, num_classes=num_classes,
                       image_size=size, seed=1)
    labels = np.load(root / "voc" / "cls_labels.npy", allow_pickle=True).item()
    names = sorted((root / "voc" / "ImageSets" / "Segmentation" / "train.txt").read_text()
                   .split())
    by_name = {}
    for name in names:
        by_name[name] = labels[int(name.replace("_", ""))].astype(np.float32)
    warm = "2026_999999"
    PIL.Image.open(root / "voc" / "JPEGImages" / f"{names[0]}.jpg").convert("RGB").resize(
        (64, 48)).save(root / "voc" / "JPEGImages" / f"{warm}.jpg")
    by_name[warm] = by_name[names[0]]
    (root / "voc12").mkdir(exist_ok=True)
    np.save(root / "voc12" / "cls_labels.npy", by_name, allow_pickle=True)
    for listing, ids in (("run", names), ("warm", [warm])):
        (root / listing).mkdir(exist_ok=True)
        (root / listing / "train_aug_id.txt").write_text("".join(f"{i}\n" for i in ids))
    (root / "ready").write_text("")
    return root


def train_checkpoint(work: Path, family: str, steps: int) -> Path:
    """Train the full-size model briefly with our trainer (upstream checkpoint layout)."""
    out = work / f"{family}_trained_{steps}"
    if (out / "checkpoint.pth").exists():
        return out / "checkpoint.pth"
    from wsss_fast.data.synthetic import generate_synthetic

    data = generate_synthetic(work / "train_set_k20", num_train=320, num_val=0,
                              num_classes=TRANSCAM_CLASSES, seed=0)
    method = "mctformer_v2" if family == "mctformer" else "transcam"
    return train_briefly(Path(data), out, method, method, steps)


def checkpoint_classes(path: Path) -> int:
    """Classes of an MCTformer-V2 checkpoint."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state.get("model", state)["head.weight"].shape[0])


# ---------------------------------------------------------------------------------- children


def _needs_sklearn(*args, **kwargs):
    raise RuntimeError("scikit-learn is not installed (the official mAP needs it)")


def _upstream_on_cpu(repo: Path) -> None:
    """The adaptations listed in the module docstring, and the checkout on sys.path."""
    import PIL.Image
    import torch

    import wsss_fast  # noqa: F401  (torchvision shim before timm)

    if importlib.util.find_spec("sklearn") is None:
        # engine.py imports average_precision_score at the top for its training-time mAP only
        for name in ("sklearn", "sklearn.metrics"):
            stub = types.ModuleType(name)
            stub.__spec__ = importlib.util.spec_from_loader(name, loader=None)  # torch._dynamo
            sys.modules[name] = stub
        sys.modules["sklearn.metrics"].average_precision_score = _needs_sklearn
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    if not hasattr(PIL.Image, "CUBIC"):
        PIL.Image.CUBIC = PIL.Image.BICUBIC
    sys.path.insert(0, str(repo))


def _images(root: Path, listing: str) -> list[str]:
    return (root / listing / "train_aug_id.txt").read_text().split()


def mctformer_theirs(repo: Path, root: Path, checkpoint: Path, out: Path, scales) -> callable:
    _upstream_on_cpu(repo)
    import torch

    from wsss_fast.models.registry import count_blocks

    os.chdir(root)  # datasets.py reads voc12/cls_labels.npy from the working directory
    import datasets
    import engine
    import models

    state = torch.load(checkpoint, map_location="cpu")["model"]
    classes, embed_dim = state["cls_token"].shape[1:]
    if embed_dim == 384:
        model = getattr(models, MCT_MODEL)(num_classes=classes)
    else:  # a smaller checkpoint (smoke tests): the official class, heads of 64 as ours assume
        from functools import partial

        model = models.MCTformerV2(
            patch_size=16, embed_dim=embed_dim, depth=count_blocks(state, "blocks."),
            num_heads=max(1, embed_dim // 64), mlp_ratio=4, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=classes)
    model.load_state_dict(state)
    transform = datasets.build_transform(False, argparse.Namespace(input_size=224,
                                                                   gen_attention_maps=True))

    def run(listing: str):
        dataset = datasets.VOC12DatasetMS(img_name_list_path=str(root / listing),
                                          voc12_root=str(root / "voc"), scales=tuple(scales),
                                          train=False, gen_attn=True, transform=transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=0)
        engine.generate_attention_maps_ms(loader, model, torch.device("cpu"), argparse.Namespace(
            attention_dir=None, cam_npy_dir=str(out / listing), img_list=str(root / listing),
            model=MCT_MODEL, patch_size=16, nb_classes=classes, layer_index=3,
            attention_type="fused", patch_attn_refine=True, visualize_cls_attn=True,
            out_crf=None))
        return {}

    return run


def ours(root: Path, checkpoint: Path, out: Path, scales) -> callable:
    import PIL.Image

    from wsss_fast.engine import CamEngine
    from wsss_fast.models.registry import create_model

    labels = np.load(root / "voc12" / "cls_labels.npy", allow_pickle=True).item()
    model = create_model("mctformer_v2", checkpoint=str(checkpoint)).eval()
    engine = CamEngine(model, "mctformer_v2", scales=scales)

    def run(listing: str):
        (out / listing).mkdir(parents=True, exist_ok=True)
        for name in _images(root, listing):
            image = PIL.Image.open(root / "voc" / "JPEGImages" / f"{name}.jpg").convert("RGB")
            np.save(out / listing / f"{name}.npy", engine(image, labels[name]).as_dict())
        return {}

    return run


def child(args) -> dict:
    """One side: load, warm up on the small image, reset the peak, run every image."""
    import contextlib

    import torch

    from benchmarks.memory import peak_growth_mib, reset_peak

    side = args.child
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)  # no stale maps from an earlier run
    root, checkpoint = Path(args.images_root), Path(args.checkpoint)
    if side == "ours":
        run = ours(root, checkpoint, out, MCT_SCALES)
    else:
        run = mctformer_theirs(Path(args.repo), root, checkpoint, out, MCT_SCALES)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # upstream prints progress
        run("warm")
        baseline = reset_peak()
        start = time.perf_counter()
        run("run")
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": peak_growth_mib(baseline)}


# ---------------------------------------------------------------------------------- parent


def max_abs_diff(ours_dir: Path, theirs_dir: Path, names) -> float:
    worst = 0.0
    for name in names:
        a = np.load(ours_dir / f"{name}.npy", allow_pickle=True).item()
        b = np.load(theirs_dir / f"{name}.npy", allow_pickle=True).item()
        if sorted(a) != sorted(b):
            raise RuntimeError(f"{name}: classes differ, ours {sorted(a)} vs theirs {sorted(b)}")
        for k in a:
            worst = max(worst, float(np.abs(a[k].astype(np.float64) - b[k]).max()))
    return worst


def compare(repo: Path, checkpoint: Path, root: Path, work: Path, rounds: int) -> dict:
    """MCTformer-V2, official against ours: best time and largest peak over ``rounds``."""
    names = _images(root, "run")
    best = {side: {"seconds": float("inf"), "peak_mib": 0.0} for side in SIDES}
    for _ in range(rounds):
        for side in SIDES:
            cmd = [sys.executable, "-m", "benchmarks.compare_official", "--child", side,
                   "--repo", str(repo), "--images-root", str(root), "--checkpoint",
                   str(checkpoint), "--out-dir", str(work / f"out_mctformer_{side}")]
            done = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode != 0:
                raise SystemExit(f"compare_official: mctformer {side} failed:\n"
                                 f"{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            best[side]["seconds"] = min(best[side]["seconds"], result["seconds"])
            best[side]["peak_mib"] = max(best[side]["peak_mib"], result["peak_mib"])
    diff = max_abs_diff(work / "out_mctformer_ours" / "run", work / "out_mctformer_theirs" / "run",
                        names)
    return {"images": len(names), "sides": best, "max_abs_diff": diff}


def table(result: dict, settings: str) -> list[str]:
    n = result["images"]
    theirs, ours_ = result["sides"]["theirs"], result["sides"]["ours"]
    return [f"\n## {settings}", "",
            "| generator | time / image (s) | peak RSS above the loaded model (MiB) |",
            "|---|---:|---:|",
            f"| official generate_attention_maps_ms | {theirs['seconds'] / n:.2f} | "
            f"{theirs['peak_mib']:.0f} |",
            f"| ours, CamEngine | {ours_['seconds'] / n:.2f} | {ours_['peak_mib']:.0f} |",
            "", f"official / ours = **{theirs['seconds'] / ours_['seconds']:.2f}×** time, "
            f"**{theirs['peak_mib'] / max(ours_['peak_mib'], 1):.1f}×** peak RSS; max |ours − "
            f"official| over the normalized maps = {result['max_abs_diff']:.2g}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mctformer-repo", help="checkout of xulianuwa/MCTformer")
    parser.add_argument("--transcam-repo", help="checkout of liruiwen/TransCAM")
    parser.add_argument("--mctformer-checkpoint", help="{'model': sd} of the official ViT-S V2")
    parser.add_argument("--transcam-checkpoint", help="state dict of the official Net_sm")
    parser.add_argument("--train-steps", type=int, default=24,
                        help="steps of the brief training when no checkpoint is given")
    parser.add_argument("--images", type=int, default=4, help="synthetic images (default 4)")
    parser.add_argument("--transcam-images", type=int, default=None,
                        help="VOC-size synthetic images for TransCAM (default: --images)")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (best counts)")
    parser.add_argument("--quick", action="store_true", help="2 images of 160x224 (smoke test)")
    parser.add_argument("--work", default="/tmp/wsss-fast-compare-official",
                        help="scratch folder (images, trained weights, outputs; reused)")
    parser.add_argument("--report", help="also write the markdown report here")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    for hidden in ("--repo", "--images-root", "--checkpoint", "--out-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if not args.mctformer_repo and not args.transcam_repo:
        print("compare_official: skipped: give --mctformer-repo and/or --transcam-repo (a "
              "checkout of the official code; it is never copied into this repository)")
        return 0
    repos = {family: check_repo(family, path) for family, path in
             (("mctformer", args.mctformer_repo), ("transcam", args.transcam_repo)) if path}
    size = (160, 224) if args.quick else tuple(args.size)
    count = 2 if args.quick else args.images
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    lines = [f"# Official generators vs ours, side by side (`python -m benchmarks.compare_official"
             f" {' '.join(argv if argv is not None else sys.argv[1:])}`)", "",
             f"CPU, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the start); "
             f"{args.rounds} interleaved round(s), best time, each side in its own process."]
    for family, repo in repos.items():
        if family == "transcam" and args.quick:    # the tiny golden layout, random weights
            lines += [""] + transcam_section(str(repo), 1, args.rounds, quick=True)
            continue
        given = args.mctformer_checkpoint if family == "mctformer" else args.transcam_checkpoint
        checkpoint = Path(given) if given else train_checkpoint(work, family, args.train_steps)
        if family == "transcam":
            n = args.transcam_images or count
            print(f"transcam: {n} VOC-size images, weights {checkpoint}", flush=True)
            lines += [""] + transcam_section(str(repo), n, args.rounds, quick=False,
                                             weights=str(checkpoint))
            continue
        classes = checkpoint_classes(checkpoint)
        root = prepare_images(work, count, size, classes)
        print(f"mctformer: {count} images {size[1]}x{size[0]}, {classes} classes, weights "
              f"{checkpoint}", flush=True)
        result = compare(repo, checkpoint, root, work, args.rounds)
        lines += table(result, f"MCTformer-V2, {count} synthetic {size[1]}×{size[0]} images, "
                               f"scales {'/'.join(map(str, MCT_SCALES))} × flip; weights "
                               f"`{checkpoint.name}` ({classes} classes), official code at "
                               f"`{repo}`")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.report:
        Path(args.report).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
