"""End-to-end pipeline throughput: extract, pseudo-label (CRF) and refine on a dataset.

Without --data, a synthetic set of --images images is generated first. Each stage runs as its
subcommand would (the same code path) and is timed; prints a markdown table of images/s and
writes OUT/bench.json and OUT/bench.md when --out is given. For the op-level speed and memory
comparisons see `python -m benchmarks.report` in the repository.

  wsss-fast bench --images 32 --out bench_synth
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from wsss_fast.cli.common import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="dataset root (default: a generated synthetic set)")
    parser.add_argument("--split", help="split of --data")
    parser.add_argument("--images", type=int, default=32, help="synthetic images (default 32)")
    parser.add_argument("--model", default="mctformer_v2")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="architecture argument (default: ViT-S, random weights)")
    parser.add_argument("--checkpoint", help="weights (default: random initialization)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="folder for bench.json / bench.md")


def _stage(name: str, argv: list[str], images: int) -> dict:
    from wsss_fast.cli import main
    start = time.perf_counter()
    status = main(argv + ["--quiet", "--overwrite"])
    seconds = time.perf_counter() - start
    if status != 0:
        raise UsageError(f"bench: stage {name} failed with exit status {status}")
    return {"stage": name, "images": images, "seconds": round(seconds, 3),
            "images_per_second": round(images / seconds, 3)}


def run(args: argparse.Namespace) -> int:
    from wsss_fast.data.factory import open_dataset
    from wsss_fast.io.atomic import atomic_write_bytes, atomic_write_json
    with tempfile.TemporaryDirectory(prefix="wsss-fast-bench-") as scratch:
        scratch = Path(scratch)
        data = args.data
        if data is None:
            from wsss_fast.data.synthetic import generate_synthetic
            data = str(generate_synthetic(scratch / "synth", num_train=args.images, num_val=0,
                                          seed=0, workers=args.workers))
        split = args.split or ("train" if args.data is None else None)
        dataset = open_dataset("auto", data, split=split)
        images = len(dataset)
        common = ["--data", data] + (["--split", split] if split else [])
        model = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
        model += (["--checkpoint", args.checkpoint] if args.checkpoint else ["--random-init"])
        for pair in args.model_arg:
            model += ["--model-arg", pair]
        cams = scratch / "cams"
        rows = [
            _stage("extract", ["extract", *common, *model, "--out", str(cams),
                               "--workers", str(args.workers)], images),
            _stage("pseudo-label (constant τ + IRN label CRF)",
                   ["pseudo-label", *common, "--cams", str(cams / "cams"), "--out",
                    str(scratch / "seeds"), "--rule", "constant", "--crf", "irn",
                    "--threshold", "0.3", "--workers", str(args.workers)], images),
            _stage("pseudo-label (IRN confident regions, 2 CRFs)",
                   ["pseudo-label", *common, "--cams", str(cams / "cams"), "--out",
                    str(scratch / "ir"), "--rule", "confident", "--crf", "irn",
                    "--workers", str(args.workers)], images),
            _stage("refine (IRN random walk, image edges)",
                   ["refine", *common, "--cams", str(cams / "cams"), "--out",
                    str(scratch / "rw"), "--device", args.device,
                    "--workers", str(args.workers)], images),
        ]
    lines = ["| stage | images | seconds | images/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['stage']} | {r['images']} | {r['seconds']:.2f} | "
              f"{r['images_per_second']:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        report = {"model": args.model, "model_args": args.model_arg, "dtype": args.dtype,
                  "workers": args.workers, "data": args.data or "synthetic", "stages": rows}
        atomic_write_json(Path(args.out) / "bench.json", report)
        atomic_write_bytes(Path(args.out) / "bench.md", (table + "\n").encode())
    print(json.dumps({r["stage"]: r["images_per_second"] for r in rows}), file=sys.stderr)
    return 0
