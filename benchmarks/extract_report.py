"""End-to-end MCTformer-V2 extraction on CPU, side by side (issue 3 / DESIGN §8):

    python -m benchmarks.extract_report             # 640×480, scales (1.0, 0.5, 1.5, 2.0) × flip
    python -m benchmarks.extract_report --quick     # 320×240, scales (1.0, 0.5) × flip

Variants, same random ViT-S weights (12 blocks, 6 heads, D=384, 20 class tokens) and image:
* floor — a plain fused forward of the same passes (SDPA blocks, image and flip batched, PatchCAM
  head), producing no CAM: what any extraction must at least cost;
* engine — ``CamEngine(model, "mctformer_v2")``: the whole generator, CAMs included;
* engine-bf16 — the same under CPU bf16 autocast (linear layers and convs in bf16; attention
  statistics and softmax stay fp32); its error against fp32 is reported;
* materializing — the upstream-style generator (eager attention, all blocks' maps stacked, one pass
  per forward, maps summed on the host: ``tests.oracles.upstream_mctformer``).
Each variant runs in its own subprocess (peak RSS above the loaded model and image, via VmHWM), in
interleaved rounds; the best round counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks import cases
from benchmarks.memory import peak_growth_mib, reset_peak

VARIANTS = ("floor", "engine", "engine-bf16", "materializing")


def setup(quick: bool):
    from wsss_fast.models.mctformer import mctformer_v2

    torch.manual_seed(0)
    model = mctformer_v2().eval()
    image, label = cases.mctformer_image(*((240, 320) if quick else (480, 640)))
    scales = (1.0, 0.5) if quick else (1.0, 0.5, 1.5, 2.0)
    return model, image, label, scales


def make_run(variant: str, quick: bool):
    from tests.oracles import upstream_mctformer
    from wsss_fast.engine import CamEngine

    model, image, label, scales = setup(quick)
    engine = CamEngine(model, "mctformer-v2", scales=scales)
    if variant == "engine":
        return lambda: engine(image, label)
    if variant == "engine-bf16":
        engine_bf16 = CamEngine(model, "mctformer-v2", scales=scales, dtype=torch.bfloat16)
        return lambda: engine_bf16(image, label)
    if variant == "materializing":
        return lambda: upstream_mctformer.generate(model, image, label, scales)
    return cases.make_fused_forward_floor(model, engine, image)


def child(variant: str, quick: bool) -> dict:
    run = make_run(variant, quick)
    warm = make_run(variant, True) if not quick else run
    warm()  # lazy imports and first-call costs (torch imports torch._dynamo on first custom op)
    baseline = reset_peak()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": peak_growth_mib(baseline)}


def bf16_error(quick: bool) -> dict:
    """Max and mean |bf16 - fp32| over the present classes' normalized maps."""
    from wsss_fast.engine import CamEngine

    model, image, label, scales = setup(quick)
    fp32 = CamEngine(model, "mctformer-v2", scales=scales)(image, label)
    bf16 = CamEngine(model, "mctformer-v2", scales=scales, dtype=torch.bfloat16)(image, label)
    diff = (bf16.high_res[fp32.keys] - fp32.high_res[fp32.keys]).abs()
    return {"max": diff.max().item(), "mean": diff.mean().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS + ("bf16-error",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "bf16-error":
        print(json.dumps(bf16_error(args.quick)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.quick)))
        return 0
    _, image, _, scales = setup(args.quick)
    print(f"MCTformer-V2 (ViT-S, random weights), {image.size[0]}x{image.size[1]}, scales "
          f"{scales} x flip, fp32, {torch.get_num_threads()} threads")
    def run_child(name):
        cmd = [sys.executable, "-m", "benchmarks.extract_report", "--child", name]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return json.loads(out.stdout.strip().splitlines()[-1])

    best = {v: {"seconds": float("inf"), "peak_mib": 0.0} for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            result = run_child(variant)
            best[variant]["seconds"] = min(best[variant]["seconds"], result["seconds"])
            best[variant]["peak_mib"] = max(best[variant]["peak_mib"], result["peak_mib"])
    floor, mat = best["floor"], best["materializing"]
    print("| variant | time (s) | time / floor | materializing / time | peak RSS (MiB) | "
          "materializing peak / peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in VARIANTS:
        r = best[variant]
        print(f"| {variant} | {r['seconds']:.2f} | {r['seconds'] / floor['seconds']:.2f} | "
              f"{mat['seconds'] / r['seconds']:.2f} | {r['peak_mib']:.0f} | "
              f"{mat['peak_mib'] / max(r['peak_mib'], 1):.1f} |")
    engine = best["engine"]
    print(f"\nengine / floor = {engine['seconds'] / floor['seconds']:.2f} (target <= 1.15); "
          f"materializing / engine = {mat['seconds'] / engine['seconds']:.2f} (target >= 2.5); "
          f"engine peak = 1/{mat['peak_mib'] / max(engine['peak_mib'], 1):.1f} of materializing "
          f"(target <= 1/10)")
    err = run_child("bf16-error")
    print(f"engine-bf16 / engine = {best['engine-bf16']['seconds'] / engine['seconds']:.2f}; "
          f"|bf16 - fp32| over the normalized maps: max {err['max']:.3g}, mean {err['mean']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
