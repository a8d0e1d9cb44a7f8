"""Cost against work: time and peak memory of MCTformer-V2 extraction against input size (issue 13,
item 3), and end-to-end ``extract`` throughput against ``--batch-size`` and ``--workers``.

    python -m benchmarks.scaling                      # benchmarks/results/scaling.md and .png
    python -m benchmarks.scaling --quick              # tiny sizes, seconds (smoke test)
    python -m benchmarks.scaling --sizes 224 448 --presets 320 --no-extract

Rows: one pass of a square S×S image (``--sizes``, 224² → 1280²), and the MCTformer preset on an
S×(3S/4) image (``--presets``, 320–800 px; scales 1.0/0.5/1.5/2.0 × flip). Variants, same random
ViT-S weights (12 blocks, 6 heads, D 384, 20 class tokens):
* floor — a plain fused forward of the same passes (SDPA blocks, PatchCAM head), no CAM;
* dense — ``CamEngine``, affinity refinement from the accumulated (B, P, P) patch affinity;
* streaming — the same with ``max_affinity_mib=0``: refined from saved q, k (no P×P);
* materializing — the upstream-style generator (every block's attention kept and stacked;
  ``tests.oracles.upstream_mctformer``), skipped where its estimate exceeds
  ``--max-materializing-gib``.
Each (row, variant) runs once in its own subprocess, peak RSS above the loaded model and image
(VmHWM); variants of a row run one after another, so ratios within a row are side by side. The
model columns give the dominant memory terms: the affinity accumulator P²·4 B (dense), the saved
q, k of every block 2·L·B·T·D·4 B (streaming), the stacked attention 2·L·H·T²·4 B
(materializing), summed over a pass batch (image and flip).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import cases

VARIANTS = ("floor", "dense", "streaming", "materializing")
PRESET_SCALES = (1.0, 0.5, 1.5, 2.0)
GIB = 1024 ** 3
VIT_S = dict(depth=12, heads=6, dim=384, classes=20, patch=16)
# --quick: a 2-block ViT of width 64, so that the smoke test takes seconds
MODELS = {"vit_s": VIT_S, "tiny": dict(depth=2, heads=1, dim=64, classes=20, patch=16)}
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------- the work


def row_passes(kind: str, size: int) -> list[tuple[int, int, int]]:
    """(height, width, batch) of every forward of a row: the flip is batched with its image."""
    if kind == "single":
        return [(size, size, 1)]
    height, width = size * 3 // 4, size
    return [(round(height * s), round(width * s), 2) for s in PRESET_SCALES]


def image_size(kind: str, size: int) -> tuple[int, int]:
    return (size, size) if kind == "single" else (size, size * 3 // 4)   # PIL (width, height)


def model_bytes(kind: str, size: int, config: dict = VIT_S) -> dict:
    """The dominant memory term of each variant (the largest pass of the row)."""
    L, H, D, C, p = (config[k] for k in ("depth", "heads", "dim", "classes", "patch"))
    worst = {"dense": 0, "streaming": 0, "materializing": 0}
    for height, width, batch in row_passes(kind, size):
        patches = (height // p) * (width // p)
        tokens = patches + C
        worst["dense"] = max(worst["dense"], batch * patches ** 2 * 4)
        worst["streaming"] = max(worst["streaming"], 2 * L * batch * tokens * D * 4)
        # upstream runs one input per forward: the image, then its flip
        worst["materializing"] = max(worst["materializing"], 2 * L * H * tokens ** 2 * 4)
    return worst


def largest_patches(kind: str, size: int) -> int:
    return max((h // VIT_S["patch"]) * (w // VIT_S["patch"]) for h, w, _ in row_passes(kind, size))


def make_run(variant: str, kind: str, size: int, model_size: str = "vit_s"):
    import torch

    from tests.oracles import upstream_mctformer
    from wsss_fast.engine import CamEngine
    from wsss_fast.models.mctformer import mctformer_v2

    torch.manual_seed(0)
    config = MODELS[model_size]
    model = mctformer_v2(num_classes=config["classes"], embed_dim=config["dim"],
                         depth=config["depth"], num_heads=config["heads"]).eval()
    width, height = image_size(kind, size)
    image, label = cases.mctformer_image(height, width)
    scales = (1.0,) if kind == "single" else PRESET_SCALES
    flip = kind != "single"
    if variant == "materializing":
        if not flip:
            return lambda: _materializing_single(model, image)
        return lambda: upstream_mctformer.generate(model, image, label, scales)
    engine = CamEngine(model, "mctformer_v2", scales=scales, flip=flip,
                       max_affinity_mib=0 if variant == "streaming" else None,
                       max_memory_mib=64 * 1024)
    if variant in ("dense", "streaming"):
        return lambda: engine(image, label)
    return cases.make_fused_forward_floor(model, engine, image)


def _materializing_single(model, image):
    """Upstream's per-pass work for one unflipped pass (its generator always adds the flip)."""
    import torch

    from tests.oracles import upstream_mctformer

    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    mean = torch.tensor(upstream_mctformer.MEAN)[:, None, None]
    std = torch.tensor(upstream_mctformer.STD)[:, None, None]
    images = ((x - mean) / std)[None]
    c, wf, hf = model.num_classes, images.shape[2] // 16, images.shape[3] // 16
    cams, patch_attn = upstream_mctformer.forward_return_att(model, images, 3)
    patch_attn = patch_attn.sum(0)
    return torch.matmul(patch_attn.unsqueeze(1), cams.reshape(1, c, -1, 1)).reshape(1, c, wf, hf)


def child(variant: str, kind: str, size: int, model_size: str) -> dict:
    import torch

    from benchmarks.memory import peak_growth_mib, reset_peak

    with torch.no_grad():
        make_run(variant, "single", 64, model_size)()  # lazy imports, first-call costs
        run = make_run(variant, kind, size, model_size)
        baseline = reset_peak()
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": peak_growth_mib(baseline)}


def run_child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.scaling", *args],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"scaling child {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_rows(rows, max_materializing_gib: float, rounds: int, log, done=None,
                 model_size: str = "vit_s") -> list[dict]:
    """Every row's variants; ``done(results)`` after each row (partial reports)."""
    results = []
    for kind, size in rows:
        model = model_bytes(kind, size, MODELS[model_size])
        entry = {"kind": kind, "size": size, "patches": largest_patches(kind, size),
                 "model_gib": {k: v / GIB for k, v in model.items()}, "variants": {}}
        for variant in VARIANTS:
            if variant == "materializing" and model["materializing"] / GIB > max_materializing_gib:
                entry["variants"][variant] = None
                continue
            best = None
            for _ in range(rounds):
                r = run_child(["--child", variant, kind, str(size), model_size])
                best = r if best is None or r["seconds"] < best["seconds"] else \
                    {**best, "peak_mib": max(best["peak_mib"], r["peak_mib"])}
            entry["variants"][variant] = best
            log(f"{kind} {size}: {variant} {best['seconds']:.2f} s, {best['peak_mib']:.0f} MiB")
        results.append(entry)
        if done is not None:
            done(results)
    return results


# ------------------------------------------------------------------------------- extract


def extract_throughput(data: str, *, batch_size: int, workers: int, device: str = "cpu",
                       dtype: str = "fp32", images: int, model: str = "mctformer_v2",
                       model_args: dict | None = None) -> float:
    """images/s of the ``extract`` pipeline stage (random ViT-S weights) over ``data``."""
    from wsss_fast.pipeline import ExtractOptions, extract

    with tempfile.TemporaryDirectory(prefix="wsss-fast-scaling-") as out:
        options = ExtractOptions(data=data, split="train", workers=workers, quiet=True,
                                 overwrite=True, model=model, model_args=model_args or {},
                                 random_init=True, device=device, dtype=dtype,
                                 batch_size=batch_size, out=out)
        start = time.perf_counter()
        result = extract(options)
        seconds = time.perf_counter() - start
    if result.exit_status != 0:
        raise RuntimeError(f"extract failed: {result.skipped[:1]}")
    return images / seconds


def synthetic_set(root: Path, images: int, height: int, width: int) -> str:
    from wsss_fast.data.synthetic import generate_synthetic

    return str(generate_synthetic(root, num_train=images, num_val=0, image_size=(height, width),
                                  seed=0))


def measure_extract(images: int, height: int, width: int, batches, workers, log,
                    model_args: dict | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="wsss-fast-scaling-data-") as scratch:
        data = synthetic_set(Path(scratch) / "synth", images, height, width)
        for w in workers:
            for b in batches:
                rate = extract_throughput(data, batch_size=b, workers=w, images=images,
                                          model_args=model_args)
                rows.append({"batch_size": b, "workers": w, "images_per_second": rate})
                log(f"extract batch {b} workers {w}: {rate:.3f} images/s")
    return rows


# ------------------------------------------------------------------------------- report


def _fmt(r, key, scale=1.0, digits=2):
    if r is None:
        return "skipped"
    if key == "seconds":   # significant digits: a tiny pass must not print as 0.00
        return _seconds(r[key] * scale)
    return f"{r[key] * scale:.{digits}f}"


def _seconds(value: float) -> str:
    return f"{value:.3g}"


def markdown(results, extract_rows, settings: str, extract_settings: str) -> str:
    lines = ["# Cost against input size (`python -m benchmarks.scaling`)", "", settings, "",
             "| input | largest pass P | floor s | dense s | streaming s | materializing s | "
             "dense / floor | streaming / floor | floor MiB | dense MiB | streaming MiB | "
             "materializing MiB | model GiB: P² dense / q,k streaming / stacked attn |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in results:
        v = e["variants"]
        label = (f"{e['size']}² one pass" if e["kind"] == "single" else
                 f"{e['size']}×{e['size'] * 3 // 4} 4 scales × flip")
        floor = v["floor"]["seconds"]
        m = e["model_gib"]
        lines.append(
            f"| {label} | {e['patches']} | {_seconds(floor)} | {_fmt(v['dense'], 'seconds')} | "
            f"{_fmt(v['streaming'], 'seconds')} | {_fmt(v['materializing'], 'seconds')} | "
            f"{v['dense']['seconds'] / floor:.2f} | {v['streaming']['seconds'] / floor:.2f} | "
            f"{_fmt(v['floor'], 'peak_mib', digits=0)} | {_fmt(v['dense'], 'peak_mib', digits=0)} | "
            f"{_fmt(v['streaming'], 'peak_mib', digits=0)} | "
            f"{_fmt(v['materializing'], 'peak_mib', digits=0)} | "
            f"{m['dense']:.3f} / {m['streaming']:.3f} / {m['materializing']:.2f} |")
    lines += ["", "Materializing 'skipped': its stacked-attention estimate is over "
              "`--max-materializing-gib`. Memory: dense keeps one P×P fp32 accumulator per "
              "forward (O(P²)), materializing keeps every block's H attention maps (O(L·H·T²)), "
              "streaming keeps every block's q and k (O(L·T·D)). Streaming therefore needs less "
              "memory only beyond P ≈ 2·L·D patches (9,216 for ViT-S: about a 1536² pass); below "
              "that the dense accumulator is the smaller one, which is why the engine picks dense "
              "unless a pass's affinity exceeds its budget. Time grows as P² for every variant "
              "(attention itself)."]
    if extract_rows:
        lines += ["", "## End-to-end `extract` throughput", "", extract_settings, "",
                  "| --workers | --batch-size | images/s |", "|---:|---:|---:|"]
        lines += [f"| {r['workers']} | {r['batch_size']} | {r['images_per_second']:.3f} |"
                  for r in extract_rows]
    return "\n".join(lines) + "\n"


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, marker in (("single", "o"), ("preset", "s")):
        rows = [e for e in results if e["kind"] == kind]
        if not rows:
            continue
        for variant in VARIANTS:
            pts = [(e["patches"], e["variants"][variant]) for e in rows
                   if e["variants"][variant] is not None]
            if not pts:
                continue
            p = [x for x, _ in pts]
            label = f"{variant} ({'one pass' if kind == 'single' else '4 scales × flip'})"
            ax_t.plot(p, [r["seconds"] for _, r in pts], marker=marker, label=label)
            ax_m.plot(p, [max(r["peak_mib"], 1) for _, r in pts], marker=marker, label=label)
    for ax, title in ((ax_t, "time (s)"), (ax_m, "peak RSS above inputs (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("patches P of the largest pass")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[224, 448, 640, 896, 1280],
                        help="square one-pass sizes (default 224 448 640 896 1280)")
    parser.add_argument("--presets", type=int, nargs="*", default=[320, 480, 640, 800],
                        help="long sides of the 4-scale × flip rows (default 320 480 640 800)")
    parser.add_argument("--max-materializing-gib", type=float, default=6.0,
                        help="skip the materializing baseline above this estimate (default 6)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per variant (best counts)")
    parser.add_argument("--no-extract", action="store_true", help="skip the extract table")
    parser.add_argument("--extract-images", type=int, default=16)
    parser.add_argument("--extract-size", type=int, nargs=2, default=(240, 320),
                        metavar=("H", "W"))
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--quick", action="store_true",
                        help="a 2-block ViT of width 64, sizes 64/96, preset 96, extract 4 images "
                        "of 48×64 (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "scaling"),
                        help="writes OUT.md and OUT.png (default benchmarks/results/scaling)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        variant, kind, size, model_size = (args.child + ["vit_s"])[:4]
        print(json.dumps(child(variant, kind, int(size), model_size)))
        return 0
    for name in ("sizes", "presets", "batch_sizes", "workers"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be positive integers")
    model_size = "tiny" if args.quick else "vit_s"
    config = MODELS[model_size]
    if args.quick:
        args.sizes = [64, 96] if args.sizes == parser.get_default("sizes") else args.sizes
        args.presets = [96] if args.presets == parser.get_default("presets") else args.presets
        args.extract_images, args.extract_size = 4, (48, 64)
        args.batch_sizes, args.workers = [1, 2], [1]
    import torch

    rows = [("single", s) for s in args.sizes] + [("preset", s) for s in args.presets]
    settings = (f"CPU, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start "
                f"(a shared machine: absolute times are pessimistic, ratios within a row were "
                f"measured one after another); MCTformer-V2 "
                f"{'ViT-S' if model_size == 'vit_s' else 'tiny ViT (smoke test)'} ({config['depth']}"
                f" blocks, D {config['dim']}, {config['heads']} heads), random weights; best of "
                f"{args.rounds} run(s) per variant.")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = lambda rows_so_far: out.with_suffix(".md").write_text(  # noqa: E731
        markdown(rows_so_far, [], settings + " (partial: still running)", ""))
    results = measure_rows(rows, args.max_materializing_gib, args.rounds, log, partial,
                           model_size)
    tiny_args = {"embed_dim": config["dim"], "depth": config["depth"],
                 "num_heads": config["heads"]} if args.quick else None
    extract_rows = [] if args.no_extract else measure_extract(
        args.extract_images, *args.extract_size, args.batch_sizes, args.workers, log, tiny_args)
    extract_settings = (f"`wsss_fast.pipeline.extract` (the `wsss-fast extract` stage) on "
                        f"{args.extract_images} synthetic {args.extract_size[1]}×"
                        f"{args.extract_size[0]} images, MCTformer-V2 ViT-S random weights, "
                        "preset scales × flip, fp32, CPU; images/s over the whole stage "
                        "(model load included).")
    report = markdown(results, extract_rows, settings, extract_settings)
    out.with_suffix(".md").write_text(report)
    plot(results, out.with_suffix(".png"))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
