"""End-to-end pipeline throughput: extract, pseudo-label (CRF) and refine on a dataset.

Without --data, a synthetic set of --images images is generated first. Each stage runs through
the same pipeline function as its subcommand and is timed; prints a markdown table of images/s
and writes OUT/bench.json and OUT/bench.md when --out is given. For the op-level speed and memory
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

from wsss_fast.options import (Number, argparse_type, device_name, key_value, text,
                               worker_count)
from wsss_fast.pipeline.options import DTYPES
from wsss_fast.pipeline import (ExtractOptions, PipelineError, PseudoLabelOptions, RefineOptions,
                                extract, pseudo_label, refine)
from wsss_fast.pipeline.options import parse_key_values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    path = argparse_type(text)
    parser.add_argument("--data", type=path,
                        help="dataset root (default: a generated synthetic set)")
    parser.add_argument("--split", type=path, help="split of --data")
    parser.add_argument("--images", type=argparse_type(Number(integer=True, minimum=1,
                                                              maximum=999_999)),
                        default=32, help="synthetic images (default 32)")
    parser.add_argument("--model", type=path, default="mctformer_v2")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        type=argparse_type(key_value),
                        help="architecture argument (default: ViT-S, random weights)")
    parser.add_argument("--checkpoint", type=path,
                        help="weights (default: random initialization)")
    parser.add_argument("--device", type=argparse_type(device_name), default="auto")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--workers", type=argparse_type(worker_count), default=2)
    parser.add_argument("--out", type=path, help="folder for bench.json / bench.md")


def _stage(name: str, stage, options, images: int) -> dict:
    start = time.perf_counter()
    result = stage(options)
    seconds = time.perf_counter() - start
    if result.exit_status != 0:
        raise PipelineError(f"bench: stage {name} did nothing: {result.skipped[:1]}")
    return {"stage": name, "images": images, "seconds": round(seconds, 3),
            "images_per_second": round(images / seconds, 3)}


def run(args: argparse.Namespace) -> int:
    from wsss_fast.data.factory import open_dataset
    from wsss_fast.io.atomic import atomic_write_bytes, atomic_write_json
    model_args = parse_key_values(args.model_arg)
    with tempfile.TemporaryDirectory(prefix="wsss-fast-bench-") as scratch:
        scratch = Path(scratch)
        data = args.data
        if data is None:
            from wsss_fast.data.synthetic import generate_synthetic
            data = str(generate_synthetic(scratch / "synth", num_train=args.images, num_val=0,
                                          seed=0, workers=args.workers))
        split = args.split or ("train" if args.data is None else None)
        images = len(open_dataset("auto", data, split=split))
        common = dict(data=data, split=split, workers=args.workers, quiet=True, overwrite=True)
        cams = scratch / "cams"
        rows = [
            _stage("extract", extract, ExtractOptions(
                **common, model=args.model, model_args=model_args, checkpoint=args.checkpoint,
                random_init=args.checkpoint is None, device=args.device, dtype=args.dtype,
                out=str(cams)), images),
            _stage("pseudo-label (constant τ + IRN label CRF)", pseudo_label, PseudoLabelOptions(
                **common, cams=str(cams / "cams"), out=str(scratch / "seeds"), rule="constant",
                crf="irn", threshold=0.3), images),
            _stage("pseudo-label (IRN confident regions, 2 CRFs)", pseudo_label,
                   PseudoLabelOptions(**common, cams=str(cams / "cams"), out=str(scratch / "ir"),
                                      rule="confident", crf="irn"), images),
            _stage("refine (IRN random walk, image edges)", refine, RefineOptions(
                **common, cams=str(cams / "cams"), out=str(scratch / "rw"),
                device=args.device), images),
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
