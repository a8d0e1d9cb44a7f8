"""bf16 extraction on CPU against fp32 and an independent floor, in one process (issue 13):

    python -m benchmarks.bf16_report                 # 640×480, scales (1.0, 0.5, 1.5, 2.0) × flip
    python -m benchmarks.bf16_report --quick         # 320×240, scales (1.0, 0.5) × flip
    python -m benchmarks.bf16_report --demo-dir DIR  # + accuracy on the demo's trained checkpoint
    python -m benchmarks.bf16_report --full-size     # + accuracy on a full-size trained ViT-S V2

Speed (MCTformer-V2 ViT-S, one image; weights do not change the cost):
* floor — a plain fused forward of the same passes written here from torch primitives (F.linear,
  F.layer_norm, SDPA, the conv PatchCAM head) over the model's state dict, nothing of wsss_fast's
  forward: what any fp32 extraction must at least cost;
* engine-fp32 / engine-bf16 — ``CamEngine(model, "mctformer_v2"[, dtype=torch.bfloat16])``.
Variants run in interleaved rounds in this process; medians of the rounds and of the per-round
ratios are printed (the machine is shared: the round-by-round ratio is the robust figure).

attention_stats against SDPA at ViT-S 768² (12 blocks, H 6, d 64, C 20, P 2304), fp32 and bf16
(bf16 with both settings of WSSS_FAST_CPU_BF16_GEMM), interleaved the same way.

Accuracy needs trained weights (random ones give nearly flat maps that min-max normalization
amplifies): ``--demo-dir`` is a ``wsss_fast demo`` output (its data/ and
mctformer_v2/train/checkpoint.pth); the validation split is extracted in fp32 and bf16, and the
report gives mean |bf16 − fp32| over the present classes' normalized CAMs and both seed mIoUs.
``--full-size`` does the same for ViT-S MCTformer-V2 (the published size) with its generator's
settings over scales 1.0/0.5/1.5/2.0 × flip, on ``--images`` synthetic ``--size`` validation images
with masks; without ``--full-size-checkpoint`` the model is first trained briefly
(``--train-steps``) on the same synthetic set's training split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import cases


def cpu_description() -> str:
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    bf16 = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, bf16 ISA flags: {bf16 or 'none'}, "
            f"oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")


def interleaved(variants: dict, rounds: int) -> dict:
    """{name: [seconds per round]}, every variant once per round in turn after one warm-up."""
    times = {name: [] for name in variants}
    for round_index in range(rounds + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) measured in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def table(times: dict, floor: str) -> str:
    lines = [f"| variant | median s | min s | median ratio to {floor} (per round) |",
             "|---|---:|---:|---:|"]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | "
                     f"{ratio(times, name, floor):.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the independent floor

def plain_forward(state: dict, heads: int, num_cls: int, patch: int = 16, eps: float = 1e-6):
    """An fp32 MCTformer-V2 forward (tokens → PatchCAM conv head, no final norm, as upstream)
    from a state dict, written with torch primitives only: the floor of any extraction of the
    same passes."""
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))

    def block(x, i):
        p = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
        b, t, dim = x.shape
        h = F.layer_norm(x, (dim,), p("norm1.weight"), p("norm1.bias"), eps)
        qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias"))
        q, k, v = qkv.reshape(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, dim)
        x = x + F.linear(a, p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (dim,), p("norm2.weight"), p("norm2.bias"), eps)
        h = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
                     p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        return x + h

    @torch.no_grad()
    def forward(images):
        b, _, height, width = images.shape
        gh, gw = height // patch, width // patch
        x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                     stride=patch).flatten(2).transpose(1, 2)
        pos = state["pos_embed"]
        n = int(round((pos.shape[1] - num_cls) ** 0.5))
        patch_pos = pos[:, num_cls:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        if (gh, gw) != (n, n) or height != width:  # upstream: bicubic by (grid + 0.1) / n
            patch_pos = F.interpolate(patch_pos, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n),
                                      mode="bicubic", align_corners=False)
        x = x + patch_pos.flatten(2).transpose(1, 2)
        cls = (state["cls_token"] + pos[:, :num_cls]).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for i in range(depth):
            x = block(x, i)
        patches = x[:, num_cls:].transpose(1, 2).reshape(b, -1, gh, gw)
        return F.conv2d(patches, state["head.weight"], state["head.bias"], padding=1)

    return forward


def speed(quick: bool, rounds: int) -> str:
    from benchmarks.extract_report import setup
    from wsss_fast.engine import CamEngine

    model, image, label, scales = setup(quick)
    width, height = image.size
    fp32 = CamEngine(model, "mctformer-v2", scales=scales)
    bf16 = CamEngine(model, "mctformer-v2", scales=scales, dtype=torch.bfloat16)
    floor_forward = plain_forward({k: v.detach() for k, v in model.state_dict().items()},
                                  heads=model.blocks[0].attn.num_heads, num_cls=model.num_classes)
    batches = list(fp32.pass_inputs(image))
    # The floor must compute what the model computes: checked here, not assumed.
    with torch.no_grad():
        _, patches = model.forward_features(batches[0])
        expected = model.patch_cam(patches, *batches[0].shape[-2:])
    got = floor_forward(batches[0])
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-3, rtol=1e-3):
        raise RuntimeError("the floor's forward does not reproduce the model's PatchCAM logits")
    times = interleaved({
        "floor (plain fp32 forward)": lambda: [floor_forward(b) for b in batches],
        "engine-fp32": lambda: fp32(image, label),
        "engine-bf16": lambda: bf16(image, label),
    }, rounds)
    floor = "floor (plain fp32 forward)"
    return (f"## Extraction: MCTformer-V2 ViT-S, {width}x{height}, scales {scales} x flip, "
            f"{rounds} interleaved rounds\n\n{table(times, floor)}\n\n"
            f"engine-bf16 / floor = {ratio(times, 'engine-bf16', floor):.2f} (target <= 0.8); "
            f"engine-fp32 / floor = {ratio(times, 'engine-fp32', floor):.2f}; "
            f"engine-bf16 / engine-fp32 = {ratio(times, 'engine-bf16', 'engine-fp32'):.2f}\n")


# ------------------------------------------------------------------ attention_stats vs SDPA

@contextmanager
def bf16_gemm(mode: str):
    import os
    before = os.environ.get("WSSS_FAST_CPU_BF16_GEMM")
    os.environ["WSSS_FAST_CPU_BF16_GEMM"] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WSSS_FAST_CPU_BF16_GEMM")
        else:
            os.environ["WSSS_FAST_CPU_BF16_GEMM"] = before


def attention(quick: bool, rounds: int) -> str:
    sections = []
    for dtype in (torch.float32, torch.bfloat16):
        case = (cases.AttentionCase(patches=576, blocks=6, dtype=dtype) if quick
                else cases.AttentionCase(dtype=dtype))
        stats = cases.make_attention_stats(case)
        variants = {"sdpa (floor)": cases.make_sdpa(case)}
        if dtype == torch.float32:
            variants["attention_stats"] = stats
        else:
            def with_mode(mode):
                def run():
                    with bf16_gemm(mode):
                        stats()
                return run
            variants["attention_stats, bf16 GEMMs"] = with_mode("on")
            variants["attention_stats, widened to fp32"] = with_mode("off")
        times = interleaved(variants, rounds)
        sections.append(f"## attention_stats vs SDPA, {case.blocks} blocks, B={case.batch} "
                        f"H={case.heads} d={case.head_dim} C={case.num_cls} P={case.patches}, "
                        f"{str(dtype).replace('torch.', '')}, {rounds} interleaved rounds\n\n"
                        f"{table(times, 'sdpa (floor)')}\n")
    return "\n".join(sections)


# ------------------------------------------------------------------ accuracy on trained weights

def compare_dtypes(data: Path, make_options, work: Path) -> dict:
    """Extract ``data``'s validation split in fp32 and in bf16 (``make_options(folder)``: the
    ExtractOptions writing to ``folder``, its dtype then set), evaluate both as seeds, and
    compare the normalized CAMs of the present classes. Returns the seed mIoUs (percent), the
    extraction times (after an untimed warm-up of both on one image), the all-background mIoU
    of the same ground truth, the fp32 maps' mean per-class spatial std, and |bf16 − fp32|: the
    mean over images of the per-image mean, and the max and 99th percentile over all pixels."""
    import numpy as np

    from wsss_fast.demo import evaluate_folder
    from wsss_fast.evaluate.metrics import miou_from_confusion
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.pipeline import extract

    miou, seconds, reports = {}, {}, {}
    folders = {dtype: work / dtype for dtype in ("fp32", "bf16")}
    # Untimed warm-up of both dtypes on the first image (one-time costs off the first timing).
    first = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    (work / "warm.txt").write_text(first + "\n")
    for dtype in folders:
        options = make_options(work / f"warm_{dtype}")
        options.dtype, options.split = dtype, str(work / "warm.txt")
        extract(options)
    for dtype, folder in folders.items():
        options = make_options(folder)
        options.dtype = dtype
        start = time.perf_counter()
        extract(options)
        seconds[dtype] = time.perf_counter() - start
        reports[dtype] = evaluate_folder(data, "val", "cams", folder / "cams",
                                         work / f"eval_{dtype}")
        miou[dtype] = 100 * reports[dtype]["best_miou"]   # at the best threshold
    per_image, pooled, spread = [], [], []
    for path in sorted((folders["fp32"] / "cams").glob("*.npy")):
        a, b = load_cam_file(path), load_cam_file(folders["bf16"] / "cams" / path.name)
        if not np.array_equal(a.keys, b.keys):
            raise RuntimeError(f"{path.name}: fp32 and bf16 files list different classes")
        if a.keys.size:
            diff = np.abs(a.high_res.astype(np.float64) - b.high_res)
            per_image.append(float(diff.mean()))
            pooled.append(diff.ravel())
            spread.append(float(a.high_res.std(axis=(-2, -1)).mean()))
    pooled = np.concatenate(pooled) if pooled else np.full(1, np.nan)
    # The same ground truth predicted all background: what a flat map scores.
    confusion = np.asarray(reports["fp32"]["at_best"]["confusion"], dtype=np.float64)
    background = np.zeros_like(confusion)
    background[:, 0] = confusion.sum(axis=1)
    return {"images": len(per_image), "miou": miou, "seconds": seconds,
            "background_miou": 100 * float(miou_from_confusion(background,
                                                               reports["fp32"]["rule"])),
            "mean": float(np.mean(per_image)) if per_image else float("nan"),
            "max": float(pooled.max()), "p99": float(np.percentile(pooled, 99)),
            "fp32_spread": float(np.mean(spread)) if spread else float("nan")}


def accuracy_table(result: dict) -> str:
    miou, seconds = result["miou"], result["seconds"]
    return (f"| dtype | seed mIoU | extract s |\n|---|---:|---:|\n"
            f"| fp32 | {miou['fp32']:.2f} | {seconds['fp32']:.1f} |\n"
            f"| bf16 | {miou['bf16']:.2f} | {seconds['bf16']:.1f} |\n\n"
            f"normalized-CAM |bf16 - fp32|: mean {result['mean']:.4f} (target <= 1e-2), "
            f"99th percentile {result['p99']:.4f}, max {result['max']:.4f}; "
            f"seed mIoU bf16 - fp32 = {miou['bf16'] - miou['fp32']:+.2f} points "
            f"(target within 0.5); bf16 / fp32 extraction time "
            f"{seconds['bf16'] / seconds['fp32']:.2f}\n")


def accuracy(demo_dir: Path) -> str:
    from wsss_fast.demo import extract_options

    data, checkpoint = demo_dir / "data", demo_dir / "mctformer_v2" / "train" / "checkpoint.pth"
    if not checkpoint.exists():
        raise SystemExit(f"bf16_report: no mctformer_v2 checkpoint at {checkpoint} (run "
                         f"`python -m wsss_fast demo --out {demo_dir} --methods mctformer_v2`)")
    with tempfile.TemporaryDirectory() as work:
        result = compare_dtypes(data, lambda folder: extract_options(
            "mctformer_v2", data, checkpoint, folder, workers=1, device="cpu"), Path(work))
    return (f"## Accuracy on the demo's trained mctformer_v2 checkpoint ({result['images']} val "
            f"images, {checkpoint})\n\n{accuracy_table(result)}")


# The full-size section: ViT-S MCTformer-V2 (deit_small_MCTformerV2_patch16_224's size) with its
# generator's settings (preset "mctformer_v2": class attention of the last 3 blocks fused with
# PatchCAM, refined by the patch affinity of all blocks) over the official generator's scale
# list, each with its flip. --quick: a tiny model, a few small images, two scales.
FULL_SCALES = (1.0, 0.5, 1.5, 2.0)
FULL = dict(model="mctformer_v2", classes=20, train_images=320, batch_size=8)
QUICK = dict(model="mctformer_v2_tiny", classes=3, train_images=8, batch_size=4, steps=2,
             images=3, size=(64, 48), scales=(1.0, 0.5))


def full_size_accuracy(work: Path, checkpoint: Path = None, steps: int = 80, images: int = 32,
                       size: tuple = (384, 288), quick: bool = False) -> str:
    """fp32 against bf16 CAMs of a trained MCTformer-V2 on a synthetic validation split with
    masks (``size`` = W × H); without ``checkpoint`` the model is first trained briefly on the
    same set's training split (``steps`` steps, reused from ``work`` when there)."""
    from benchmarks.brief_training import train_briefly
    from wsss_fast.data.synthetic import generate_synthetic
    from wsss_fast.pipeline import ExtractOptions

    settings = {**FULL, **(QUICK if quick else dict(steps=steps, images=images, size=size,
                                                     scales=FULL_SCALES))}
    (width, height), classes = settings["size"], settings["classes"]
    if checkpoint is not None:
        from benchmarks.compare_official import checkpoint_classes
        classes = checkpoint_classes(checkpoint)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(generate_synthetic(
        work / f"set_k{classes}_{width}x{height}_val{settings['images']}",
        num_train=settings["train_images"], num_val=settings["images"],
        num_classes=classes, image_size=(height, width), seed=0))
    trained = "given"
    if checkpoint is None:
        checkpoint = train_briefly(
            data, work / f"{settings['model']}_trained_{settings['steps']}_{width}x{height}",
            "mctformer_v2", settings["model"], settings["steps"],
            batch_size=settings["batch_size"], threads=torch.get_num_threads())
        trained = (f"trained here: {settings['steps']} steps of batch {settings['batch_size']} "
                   f"on the set's {settings['train_images']} training images, synthetic recipe")
    scales = settings["scales"]
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        result = compare_dtypes(data, lambda folder: ExtractOptions(
            data=str(data), split="val", model=settings["model"], checkpoint=str(checkpoint),
            preset="mctformer_v2", scales=scales, device="cpu", out=str(folder), workers=1,
            quiet=True), Path(scratch))
    structured = result["miou"]["fp32"] - result["background_miou"]
    return (f"## Accuracy on a {'tiny (--quick)' if quick else 'full-size ViT-S'} MCTformer-V2 "
            f"({classes} classes; {trained}; {checkpoint})\n\n"
            f"{result['images']} synthetic val images of {width}x{height}, preset mctformer_v2 "
            f"(cls_layers 3, fused, refined), scales {scales} x flip, "
            f"{torch.get_num_threads()} threads\n\n{accuracy_table(result)}\n"
            f"Structure of the fp32 maps: seed mIoU {result['miou']['fp32']:.2f} against "
            f"{result['background_miou']:.2f} for all background ({structured:+.2f} points); "
            f"per-class spatial std of the normalized maps {result['fp32_spread']:.3f}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--demo-dir", type=Path, help="a `wsss_fast demo` output folder")
    parser.add_argument("--skip", nargs="*", default=(), choices=("speed", "attention"))
    full = parser.add_argument_group("full-size accuracy (a trained ViT-S MCTformer-V2)")
    full.add_argument("--full-size", action="store_true",
                      help="fp32 vs bf16 CAMs and seeds of a full-size trained checkpoint "
                           "(with --quick: a tiny model, seconds)")
    full.add_argument("--full-size-checkpoint", type=Path,
                      help="its weights ({'model': sd}); default: train briefly")
    full.add_argument("--train-steps", type=int, default=80,
                      help="steps of the brief training without a checkpoint (default 80)")
    full.add_argument("--images", type=int, default=32, help="validation images (default 32)")
    full.add_argument("--size", type=int, nargs=2, default=(384, 288), metavar=("W", "H"),
                      help="validation image size (default 384 288)")
    full.add_argument("--work", type=Path, default=Path("/tmp/wsss-fast-bf16-full"),
                      help="scratch folder (synthetic set, trained weights; reused)")
    args = parser.parse_args(argv)
    print(f"# bf16 report\n\n{cpu_description()}\n", flush=True)
    if "attention" not in args.skip:
        print(attention(args.quick, args.rounds), flush=True)
    if "speed" not in args.skip:
        print(speed(args.quick, args.rounds), flush=True)
    if args.demo_dir is not None:
        print(accuracy(args.demo_dir), flush=True)
    if args.full_size:
        print(full_size_accuracy(args.work, args.full_size_checkpoint, args.train_steps,
                                 args.images, tuple(args.size), args.quick), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
