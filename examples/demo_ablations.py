"""Extraction ablations over a finished demo's checkpoints (the README's findings).

    python examples/demo_ablations.py demo_out            # after `make demo`

For the co-occurrence questions of the demo (does DOEI beat MCTformer-V2, BNR beat TransCAM?),
re-extracts the validation CAMs of the trained MCTformer-V2, TransCAM and BNR models with other
settings through the pipeline API's `extract` (no training), evaluates them with the same
threshold sweep as the demo, and prints seed mIoU and the co-occurrence classes' IoU per variant. Results go to
DEMO/ablations/<variant>/ (resumable, like the demo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsss_fast.demo import (checked, cooccurrence_classes, cooccurrence_iou, evaluate_folder,
                            extract_options, extraction_plan)
from wsss_fast.io.atomic import atomic_write_bytes
from wsss_fast.pipeline import extract

# name -> (demo report row whose checkpoint, model, preset and extraction settings are used,
# ExtractOptions fields applied after the row's own: model_args, preset_args)
VARIANTS = {
    "v2 (demo row)": ("mctformer_v2", {}),
    "v2 + DOEI, defaults (last 2 of 4 blocks, γ_max 2, β 0.5)": ("mctformer_v2+doei", {}),
    "v2 + DOEI, all 4 blocks": ("mctformer_v2+doei", {"model_args": {"blocks": 4}}),
    "v2 + DOEI, γ_max 3": ("mctformer_v2+doei", {"model_args": {"gamma_max": 3}}),
    "v2 + DOEI, β 0 (re-weighting only, no residual)": ("mctformer_v2+doei",
                                                        {"model_args": {"beta": 0}}),
}
for method in ("transcam", "bnr"):
    VARIANTS.update({
        f"{method} (demo row: A*·M, squares 128/192/256)": (method, {}),
        f"{method}: M alone (no A*)": (method, {"preset_args": {"cam_kwargs": {"refine": False}}}),
        f"{method}: A* of the first 2 blocks": (method, {"preset_args": {
            "cam_kwargs": {"layers": (0, 1)}}}),
        f"{method}: A* of the last 2 blocks": (method, {"preset_args": {
            "cam_kwargs": {"layers": 2}}}),
        f"{method}: squares 256/512": (method, {"preset_args": {"square_sizes": (256, 512)}}),
    })


def run_variant(demo: Path, name: str, workers: int) -> tuple[float, float, float]:
    """(seed mIoU, best threshold, co-occurrence IoU) of one variant."""
    row, extra = VARIANTS[name]
    trained = extraction_plan(row)[0]
    data = demo / "data"
    checkpoint = demo / trained / "train" / "checkpoint.pth"
    if not checkpoint.exists():
        raise SystemExit(f"{checkpoint} is missing: run the demo into {demo} first")
    work = demo / "ablations" / "".join(c if c.isalnum() else "_" for c in name)
    # The demo's extraction options of the row, then the variant's (later options win).
    checked(extract(extract_options(row, data, checkpoint, work / "extract", workers=workers,
                                    device="auto", **extra)))
    report = evaluate_folder(data, "val", "cams", work / "extract" / "cams", work / "eval")
    return (report["best_miou"], report["best_threshold"],
            cooccurrence_iou(report, cooccurrence_classes(data)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="a finished demo's output folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="variant names containing these words")
    args = parser.parse_args(argv)
    names = [n for n in VARIANTS if not args.only or any(w in n for w in args.only)]
    rows = ["| variant | seed mIoU | best τ | co-occ. IoU |", "|---|---:|---:|---:|"]
    for name in names:
        print(f"[ablation] {name}", file=sys.stderr, flush=True)
        miou, threshold, cooc = run_variant(args.demo, name, args.workers)
        rows.append(f"| {name} | {100 * miou:.1f} | {threshold:.2f} | {100 * cooc:.1f} |")
    table = "\n".join(rows)
    atomic_write_bytes(args.demo / "ablations" / "report.md", (table + "\n").encode())
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
