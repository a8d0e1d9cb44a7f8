"""One table of ratios measured side by side in one run, with peak memory per variant.

    python -m benchmarks.report            # the DESIGN §8 / issue case (ViT-S 768², fp32, CPU)
    python -m benchmarks.report --quick    # a small case, seconds (smoke test)

Times: every variant of a group runs in interleaved rounds in this process, and the best round
counts (the machine is shared; the minimum is the least disturbed). Peak memory: each variant runs
once in a fresh subprocess that resets its peak RSS (VmHWM, via /proc/self/clear_refs) after its
inputs exist, so the figure is what the variant itself adds on top of its inputs.
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
        "class_patch_reweight": {
            "title": "phi_gamma fused with PatchCAM, 20 x 2304 rows",
            "baseline": "reference",
            "variants": {
                "fused": lambda: cases.make_reweight("fused"),
                "reference": lambda: cases.make_reweight("reference"),
            },
        },
    }


def peak_of(group: str, variant: str, quick: bool) -> float:
    """Run in a child: warm up, build the inputs, reset the peak, run once, report the growth."""
    cases.warm_up()
    run = groups(quick)[group]["variants"][variant]()
    baseline = reset_peak()
    run()
    return peak_growth_mib(baseline)


def measure_peak(group: str, variant: str, quick: bool) -> float:
    cmd = [sys.executable, "-m", "benchmarks.report", "--peak", group, variant]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


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
        print(json.dumps({"peak_mib": peak_of(*args.peak, args.quick)}))
        return 0

    from wsss_fast.ops import _backend
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"cpu face: {_backend.cpu_extension_error() or 'built'}")
    for name, group in groups(args.quick).items():
        if args.only and name not in args.only:
            continue
        times = measure_times(group["variants"], args.rounds)
        peaks = {v: measure_peak(name, v, args.quick) for v in group["variants"]}
        base = group["baseline"]
        print(f"\n## {name}: {group['title']}")
        print(f"| variant | time (ms) | time / {base} | {base} / time | peak MiB | "
              f"{base} peak / peak |")
        print("|---|---:|---:|---:|---:|---:|")
        for variant in group["variants"]:
            t, p = times[variant], peaks[variant]
            mem_ratio = peaks[base] / p if p > 0.5 else float("inf")
            print(f"| {variant} | {t * 1e3:.1f} | {t / times[base]:.2f} | {times[base] / t:.2f} | "
                  f"{p:.0f} | {mem_ratio:.1f} |")
        if name == "attention_stats":
            floor = times["sdpa (floor)"]
            fused = times["attention_stats"]
            print(f"\nattention_stats / sdpa = {fused / floor:.2f} (target <= 1.2); "
                  f"materializing / attention_stats = {times[base] / fused:.2f} (target >= 2); "
                  f"peak materializing / attention_stats = "
                  f"{peaks[base] / max(peaks['attention_stats'], 0.5):.1f} (target >= 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
