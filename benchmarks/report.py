"""One table of ratios measured side by side in one run, with peak memory per variant.

    python -m benchmarks.report            # the DESIGN §8 / issue case (ViT-S 768², fp32, CPU)
    python -m benchmarks.report --quick    # a small case, seconds (smoke test)

Times: every variant of a group runs in interleaved rounds in this process, and the best round
counts (the machine is shared; the minimum is the least disturbed). Peak memory: each variant runs
once in a fresh subprocess that resets its peak RSS (VmHWM, via /proc/self/clear_refs) after its
inputs exist, so the figure is what the variant itself adds on top of its inputs. Variants too slow
to repeat (the dense random walk: minutes) are "single-shot": their time is that one run in the
peak-memory child.
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


def groups(quick: bool):
    attention = cases.AttentionCase(patches=576, blocks=6) if quick else cases.AttentionCase()
    merge = cases.MergeCase(height=240, width=320) if quick else cases.MergeCase()
    walk = cases.RandomWalkCase(height=24, width=32) if quick else cases.RandomWalkCase()
    paths = cases.PathAffinityCase(batch=2, size=48) if quick else cases.PathAffinityCase()
    return {
        "attention_stats": {
            "title": (f"attention over {attention.blocks} blocks, B={attention.batch} "
                      f"H={attention.heads} d={attention.head_dim} C={attention.num_cls} "
                      f"P={attention.patches}, fp32"),
            "baseline": "materializing",
            "variants": {
                "sdpa (floor)": lambda: cases.make_sdpa(attention),
                "attention_stats": lambda: cases.make_attention_stats(attention),
                "materializing": lambda: cases.make_materializing(attention),
            },
        },
        "propagate": {
            "title": "refinement by the all-block affinity, K=20, same attention case",
            "baseline": "dense",
            "variants": {
                "dense": lambda: cases.make_propagate("dense", attention),
                "streaming": lambda: cases.make_propagate("streaming", attention),
            },
        },
        "multiscale_merge": {
            "title": (f"merge of {2 * len(merge.scales)} passes to {merge.height}x{merge.width}, "
                      f"K={merge.classes}, minmax"),
            "baseline": "reference",
            "variants": {
                "fused": lambda: cases.make_merge(merge, "fused"),
                "reference": lambda: cases.make_merge(merge, "reference"),
            },
        },
        "random_walk": {
            "title": (f"IRN random walk, {walk.height}x{walk.width} grid, K={walk.classes}, "
                      f"beta={walk.beta}, t={2 ** walk.exp_times}, fp32 (edge map to walked maps)"),
            "baseline": "dense",
            "single_shot": () if quick else ("dense",),
            "variants": {
                "fused": lambda: cases.make_random_walk(walk, "fused"),
                "dense": lambda: cases.make_random_walk(walk, "dense"),
            },
        },
        "path_affinity": {
            "title": (f"IRN path-max affinity, {paths.size}x{paths.size} grid, R={paths.radius}, "
                      f"batch {paths.batch}, fp32, forward + backward (boundary map to its "
                      "gradient)"),
            "baseline": "gather",
            "variants": {
                "fused": lambda: cases.make_path_affinity(paths, "fused"),
                "gather": lambda: cases.make_path_affinity(paths, "gather"),
            },
        },
        "class_patch_reweight": {
            "title": "phi_gamma fused with PatchCAM, 20 x 2304 rows",
            "baseline": "reference",
            "variants": {
                "fused": lambda: cases.make_reweight("fused"),
                "reference": lambda: cases.make_reweight("reference"),
            },
        },
    }


def peak_of(group: str, variant: str, quick: bool) -> dict:
    """Run in a child: warm up, build the inputs, reset the peak, run once, report the growth
    (and the run's time)."""
    cases.warm_up()
    run = groups(quick)[group]["variants"][variant]()
    baseline = reset_peak()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {"peak_mib": peak_growth_mib(baseline), "seconds": seconds}


def measure_peak(group: str, variant: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.report", "--peak", group, variant]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_times(variants: dict, rounds: int) -> dict:
    runs = {name: make() for name, make in variants.items()}
    for run in runs.values():
        run()  # warm-up: first-touch of buffers, lazy initialisation
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small case (smoke test)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--only", nargs="*", help="groups to run (default: all)")
    parser.add_argument("--peak", nargs=2, metavar=("GROUP", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak:
        print(json.dumps(peak_of(*args.peak, args.quick)))
        return 0

    from wsss_fast.ops import _backend
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"cpu face: {_backend.cpu_extension_error() or 'built'}")
    for name, group in groups(args.quick).items():
        if args.only and name not in args.only:
            continue
        single_shot = group.get("single_shot", ())
        times = measure_times({v: make for v, make in group["variants"].items()
                               if v not in single_shot}, args.rounds)
        children = {v: measure_peak(name, v, args.quick) for v in group["variants"]}
        peaks = {v: child["peak_mib"] for v, child in children.items()}
        times.update({v: children[v]["seconds"] for v in single_shot})
        base = group["baseline"]
        print(f"\n## {name}: {group['title']}")
        print(f"| variant | time (ms) | time / {base} | {base} / time | peak MiB | "
              f"{base} peak / peak |")
        print("|---|---:|---:|---:|---:|---:|")
        for variant in group["variants"]:
            t, p = times[variant], peaks[variant]
            mem_ratio = peaks[base] / p if p > 0.5 else float("inf")
            shot = " (one run)" if variant in single_shot else ""
            print(f"| {variant}{shot} | {t * 1e3:.1f} | {t / times[base]:.2f} | "
                  f"{times[base] / t:.2f} | {p:.0f} | {mem_ratio:.1f} |")
        if name == "attention_stats":
            floor = times["sdpa (floor)"]
            fused = times["attention_stats"]
            print(f"\nattention_stats / sdpa = {fused / floor:.2f} (target <= 1.15, issue 13); "
                  f"materializing / attention_stats = {times[base] / fused:.2f} (target >= 2); "
                  f"peak materializing / attention_stats = "
                  f"{peaks[base] / max(peaks['attention_stats'], 0.5):.1f} (target >= 5)")
        if name == "random_walk":
            print(f"\ndense / fused = {times[base] / times['fused']:.1f} (target >= 20); "
                  f"peak dense / fused = {peaks[base] / max(peaks['fused'], 0.5):.1f}")
        if name == "path_affinity":
            print(f"\ngather / fused = {times[base] / times['fused']:.1f} (target >= 3); "
                  f"peak gather / fused = {peaks[base] / max(peaks['fused'], 0.5):.1f} "
                  "(target >= 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
