"""Findings with error bars (issue 14 item 4): each compared pair trained over several seeds.

    python examples/findings.py --seeds 0 1 2 --out findings_out
    python examples/findings.py --pretrained --out findings_pre   # the shipped backbones
    python examples/findings.py --init-dir DIR --out findings_dir   # other backbones

Trains the methods of every compared pair once per training seed on the demo's synthetic
benchmark (the same data folder as ``wsss-fast demo``: generated with data seed 0, or ``--data``),
extracts validation CAMs with the demo's settings, evaluates the seeds with the demo's threshold
sweep, and writes a markdown report (``--report``, and OUT/findings.md): mean ± std over seeds of
the seed mIoU and of the co-occurrence classes' IoU per method, and per pair whether the
difference exceeds the spread over seeds (``exceeds_spread``). It also extracts the DOEI plug-in
variants (``DOEI_VARIANTS``) over every seed's MCTformer-V2 checkpoint (no training).

Every step goes through the demo's pipeline calls, so a rerun reuses finished checkpoints, CAMs
and evaluations; each (seed, method) result is kept in OUT/seed<N>/<method>/result.json and the
report is rewritten after each one, so a partial run already reports what it has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from wsss_fast.demo import (FULL, QUICK, DemoScale, _train, checked, cooccurrence_classes,
                            cooccurrence_iou, demo_lpcam_cams, evaluate_folder, extract_options,
                            extraction_plan)
from wsss_fast.io.atomic import atomic_write_bytes, atomic_write_json
from wsss_fast.train.pretrain import PRETRAINED_DIR

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Pair:
    title: str
    baseline: str        # a row of ROWS
    method: str


PAIRS = (
    Pair("BNR vs TransCAM", "transcam", "bnr"),
    Pair("DOEI as an inference plug-in vs MCTformer-V2 (same checkpoint)", "mctformer_v2",
         "mctformer_v2+doei"),
    Pair("MCTformer-V2 trained with DOEI vs MCTformer-V2", "mctformer_v2", "mctformer_v2_doei"),
    Pair("LPCAM vs the IRN CAM it starts from (same checkpoint)", "irn_cam", "lpcam"),
    Pair("EDAM vs the IRN CAM", "irn_cam", "edam"),
)
# Rows that reuse another row's trained checkpoint: their difference is paired by seed.
SHARED_CHECKPOINT = {"mctformer_v2+doei": "mctformer_v2", "lpcam": "irn_cam"}
RUN_ORDER = ("mctformer_v2", "mctformer_v2+doei", "mctformer_v2_doei", "transcam", "bnr",
             "irn_cam", "lpcam", "edam")
# The tiny backbone each row's model starts from with --init-dir (pretrain's families).
INIT_FAMILY = {"mctformer_v2": "vit", "mctformer_v2_doei": "vit", "transcam": "conformer",
               "bnr": "conformer", "irn_cam": "resnet", "edam": "resnet38"}

# DOEI plug-in variants extracted over each seed's MCTformer-V2 checkpoint: name -> model_args of
# the "mctformer_v2+doei" row (DOEI's arguments; {} is the default). "v2" is the baseline row.
# In the order they run (a partial run has the first ones over every seed).
DOEI_VARIANTS: dict[str, dict] = {
    "default (last 2 of 4 blocks, φ_γ on probabilities, λ_e=λ_c=0.5, γ 1→2, β 0.5)": {},
    "γ on the logits before the softmax (no φ_γ after)": {"reweight": "logits"},
    "γ on the logits and φ_γ on the probabilities": {"reweight": "both"},
    "no HFA (λ_e=λ_c=0)": {"lambda_e": 0.0, "lambda_c": 0.0},
    "γ constant (γ_max in every DOEI block)": {"gamma_schedule": "constant"},
    "all 4 blocks": {"blocks": 4},
    "last block only": {"blocks": 1},
    "HFA embedding only (λ_e=1, λ_c=0)": {"lambda_e": 1.0, "lambda_c": 0.0},
    "HFA colour only (λ_e=0, λ_c=1)": {"lambda_e": 0.0, "lambda_c": 1.0},
    "γ_max 3": {"gamma_max": 3.0},
    "β 0 (CAM read-out only, tokens unchanged)": {"beta": 0.0},
}


def rows_of(pairs: Sequence[Pair]) -> list[str]:
    """The rows the pairs need, each once, in training order (a row before those reusing it)."""
    rows: list[str] = []
    for pair in pairs:
        for row in (pair.baseline, pair.method):
            shared = SHARED_CHECKPOINT.get(row)
            for name in ((shared, row) if shared else (row,)):
                if name not in rows:
                    rows.append(name)
    return rows


# ------------------------------------------------------------------------------ aggregation

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for fewer than 2 values)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else float("nan")


def compare(baseline: Mapping[int, float], method: Mapping[int, float]) -> dict:
    """One metric of a pair over the seeds both have. The rule: the difference of the means
    ``delta`` exceeds the spread when ``|delta|`` is larger than the larger of the two
    methods' standard deviations over seeds (``spread``), and the per-seed differences all have
    the sign of ``delta``. Needs 2 seeds or more (else ``exceeds_spread`` is None)."""
    seeds = sorted(set(baseline) & set(method))
    a = [baseline[s] for s in seeds]
    b = [method[s] for s in seeds]
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    deltas = np.subtract(b, a)
    delta = mean_b - mean_a
    spread = max(std_a, std_b) if len(seeds) > 1 else float("nan")
    exceeds = None
    if len(seeds) > 1:
        exceeds = bool(abs(delta) > spread and np.all(np.sign(deltas) == np.sign(delta))
                       and delta != 0)
    return dict(seeds=seeds, baseline=(mean_a, std_a), method=(mean_b, std_b), delta=delta,
                spread=spread, seed_deltas=[float(d) for d in deltas], exceeds_spread=exceeds)


def _pm(stats: tuple[float, float]) -> str:
    mean, std = stats
    if mean != mean:
        return "n/a"
    return f"{100 * mean:.1f}" + ("" if std != std else f" ± {100 * std:.1f}")


def _verdict(comparison: dict) -> str:
    exceeds = comparison["exceeds_spread"]
    if exceeds is None:
        return "n/a (< 2 seeds)"
    delta = 100 * comparison["delta"]
    return (f"**yes** ({delta:+.1f})" if exceeds else f"no ({delta:+.1f}, spread "
            f"{100 * comparison['spread']:.1f})")


METRICS = (("seed_miou", "seed mIoU"), ("cooccurrence_iou", "co-occ. IoU"))


def pairs_table(results: Mapping[str, Mapping[int, dict]], pairs: Sequence[Pair]) -> str:
    """The pairs' markdown table from ``results[row][seed] = {metric: value}``."""
    lines = ["| pair | seeds | metric | baseline | method | Δ (method − baseline) | per-seed Δ | "
             "exceeds the spread? |", "|---|---|---|---:|---:|---:|---|---|"]
    for pair in pairs:
        for key, label in METRICS:
            c = compare({s: r[key] for s, r in results.get(pair.baseline, {}).items()},
                        {s: r[key] for s, r in results.get(pair.method, {}).items()})
            per_seed = ", ".join(f"{100 * d:+.1f}" for d in c["seed_deltas"]) or "—"
            lines.append(f"| {pair.title}: `{pair.method}` vs `{pair.baseline}` | "
                         f"{' '.join(map(str, c['seeds'])) or '—'} | {label} | "
                         f"{_pm(c['baseline'])} | {_pm(c['method'])} | "
                         f"{100 * c['delta']:+.1f} | {per_seed} | {_verdict(c)} |"
                         if c["seeds"] else
                         f"| {pair.title}: `{pair.method}` vs `{pair.baseline}` | — | {label} "
                         f"| n/a | n/a | n/a | — | n/a (no seed finished) |")
    return "\n".join(lines)


def methods_table(results: Mapping[str, Mapping[int, dict]]) -> str:
    lines = ["| method | seeds | seed mIoU | best τ (mean) | co-occ. IoU | per-seed mIoU |",
             "|---|---|---:|---:|---:|---|"]
    for row, by_seed in results.items():
        seeds = sorted(by_seed)
        if not seeds:
            continue
        values = [by_seed[s] for s in seeds]
        per_seed = ", ".join(f"{100 * v['seed_miou']:.1f}" for v in values)
        lines.append(f"| `{row}` | {' '.join(map(str, seeds))} | "
                     f"{_pm(mean_std([v['seed_miou'] for v in values]))} | "
                     f"{np.mean([v['threshold'] for v in values]):.2f} | "
                     f"{_pm(mean_std([v['cooccurrence_iou'] for v in values]))} | "
                     f"{per_seed} |")
    return "\n".join(lines)


def ablation_table(variants: Mapping[str, Mapping[int, dict]],
                   baseline: Mapping[int, dict]) -> str:
    """DOEI variants against the MCTformer-V2 row over the same checkpoints (paired)."""
    lines = ["| DOEI plug-in variant | seeds | seed mIoU | Δ mIoU vs v2 | exceeds? | "
             "co-occ. IoU | Δ co-occ. vs v2 | exceeds? |", "|---|---|---:|---:|---|---:|---:|---|"]
    for name, by_seed in variants.items():
        if not by_seed:
            continue
        cells = []
        for key, _ in METRICS:
            c = compare({s: r[key] for s, r in baseline.items()},
                        {s: r[key] for s, r in by_seed.items()})
            cells += [_pm(c["method"]), f"{100 * c['delta']:+.1f}", _verdict(c)]
        seeds = sorted(set(by_seed) & set(baseline))
        lines.append(f"| {name} | {' '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ running

def init_file(init_dir: Optional[Path], row: str) -> Optional[Path]:
    """The pretrained backbone of ``row``'s family in ``init_dir`` (``<family>*.pt``/``.pth``)."""
    if init_dir is None:
        return None
    family = INIT_FAMILY[SHARED_CHECKPOINT.get(row, row)]
    found = sorted(p for p in init_dir.glob(f"{family}*") if p.suffix in (".pt", ".pth")
                   and p.stem.split("_")[0].split(".")[0] == family)
    if not found:
        raise SystemExit(f"--init-dir {init_dir}: no {family}*.pt backbone for {row}")
    return found[0]


def _scale_with_init(scale: DemoScale, init: Optional[Path], trained: str) -> DemoScale:
    """``scale`` with ``init`` (a backbone) and the demo's settings for a pretrained
    ``trained`` method (``demo.PRETRAINED_TRAIN``, where the demo has them) in its overrides."""
    if init is None:
        return scale
    from wsss_fast import demo
    from wsss_fast.train.config import TrainConfig
    if "init" not in TrainConfig.__dataclass_fields__:
        raise SystemExit("--init-dir needs `wsss-fast train --init` (TrainConfig.init), which "
                         "this wsss_fast does not have")
    overrides = {**getattr(demo, "PRETRAINED_TRAIN", {}).get(trained, {}),
                 **scale.train_overrides, "init": str(init)}
    return DemoScale(scale.num_train, scale.num_val, scale.image_size, overrides,
                     scale.lpcam_bank_images)


def _evaluated(data: Path, cams: Path, work: Path, cooccurrence: Sequence[int]) -> dict:
    report = evaluate_folder(data, "val", "cams", cams, work / "eval_seeds")
    return dict(seed_miou=report["best_miou"], threshold=report["best_threshold"],
                cooccurrence_iou=cooccurrence_iou(report, cooccurrence))


def run_row(row: str, data: Path, seed_dir: Path, scale: DemoScale, seed: int, *, workers: int,
            device: str, init_dir: Optional[Path], cooccurrence: Sequence[int],
            model_args: Optional[dict] = None, work: Optional[Path] = None) -> dict:
    """Train (if needed), extract and evaluate one row for one seed; result.json caches it."""
    from wsss_fast.pipeline import extract
    work = work or seed_dir / row
    done = work / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    scale = _scale_with_init(scale, init_file(init_dir, row),
                             "irn_cam" if row == "lpcam" else extraction_plan(row)[0])
    start = time.perf_counter()
    if row == "lpcam":
        # LPCAM starts from the irn_cam row's checkpoint: its train folder is that row's.
        trained = seed_dir / "irn_cam" / "train"
        (work).mkdir(parents=True, exist_ok=True)
        if not (work / "train").exists():
            os.symlink(os.path.relpath(trained, work), work / "train")
        cams = demo_lpcam_cams(data, work, scale.train_overrides, seed=seed, workers=workers,
                               device=device, bank_images=scale.lpcam_bank_images)
    else:
        trained = extraction_plan(row)[0]
        checkpoint = _train(trained, data, seed_dir / trained / "train", scale, seed, workers,
                            device)
        checked(extract(extract_options(row, data, checkpoint, work / "extract",
                                        workers=workers, device=device,
                                        model_args=model_args)))
        cams = work / "extract" / "cams"
    result = dict(_evaluated(data, cams, work, cooccurrence), seed=seed,
                  seconds=time.perf_counter() - start)
    atomic_write_json(done, result)
    return result


def load_results(out: Path, rows: Sequence[str], seeds: Sequence[int]) -> dict:
    return {row: {s: json.loads((out / f"seed{s}" / row / "result.json").read_text())
                  for s in seeds if (out / f"seed{s}" / row / "result.json").exists()}
            for row in rows}


def variant_dir(seed_dir: Path, name: str) -> Path:
    """Where a DOEI variant's result lives; the default variant is the plug-in row itself."""
    if not DOEI_VARIANTS[name]:
        return seed_dir / "mctformer_v2+doei"
    return seed_dir / "doei_variants" / _slug(name)


def load_variants(out: Path, seeds: Sequence[int]) -> dict:
    return {name: {s: json.loads((variant_dir(out / f"seed{s}", name) / "result.json")
                                 .read_text())
                   for s in seeds if (variant_dir(out / f"seed{s}", name) / "result.json")
                   .exists()}
            for name in DOEI_VARIANTS}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:80]


def _count(data: Path, split: str) -> str:
    listing = data / "ImageSets" / "Segmentation" / f"{split}.txt"
    return str(len(listing.read_text().split())) if listing.exists() else "?"


def _is_shipped(init_dir: Optional[Path]) -> bool:
    return init_dir is not None and init_dir.resolve() == PRETRAINED_DIR.resolve()


def _init_flag(init_dir: Optional[Path]) -> str:
    """The command-line option that names ``init_dir`` ("" from scratch)."""
    if init_dir is None:
        return ""
    return " --pretrained" if _is_shipped(init_dir) else f" --init-dir {init_dir}"


def _start(init_dir: Optional[Path]) -> str:
    if init_dir is None:
        return "from scratch"
    return ("the shipped backbones, pretrained/" if _is_shipped(init_dir)
            else f"backbones from {init_dir}")


def write_report(out: Path, report: Optional[Path], pairs: Sequence[Pair], seeds: Sequence[int],
                 scale_name: str, init_dir: Optional[Path], minutes: float,
                 variants: bool = True) -> str:
    results = load_results(out, rows_of(pairs), seeds)
    data = out / "data"
    names = (data / "classes.txt").read_text().split() if (data / "classes.txt").exists() else []
    cooc = cooccurrence_classes(data) if (data / "dataset.json").exists() else []
    text = [f"# Findings over training seeds ({scale_name} demo scale, seeds "
            f"{' '.join(map(str, seeds))}, "
            f"{_start(init_dir)})", "",
            "`python examples/findings.py --seeds " + " ".join(map(str, seeds)) +
            _init_flag(init_dir) + " --out OUT`: each method trained "
            "once per seed with the demo's synthetic recipe on the demo's data ("
            f"{_count(data, 'train')} training / {_count(data, 'val')} validation images); the "
            "seed only changes the training "
            "(initialization, data order, augmentation). CAM seeds extracted and evaluated as in "
            "the demo (best background threshold of the sweep; mIoU nanmean over background + "
            "classes). Co-occurrence classes: " + (", ".join(names[k] for k in cooc) or "?") +
            ". mean ± std: sample standard deviation over seeds (ddof 1).", "",
            "**Rule.** A difference *exceeds the spread over seeds* when |Δ| (difference of the "
            "means) is larger than the larger of the two methods' standard deviations over seeds "
            "**and** every seed's own difference has the sign of Δ. With 3 seeds this is a "
            "coarse screen, not a significance test: a `no` means the seeds do not separate the "
            "two methods.", "", "## Pairs", "", pairs_table(results, pairs), "",
            "## Methods", "", methods_table(results), ""]
    if variants and any(p.method == "mctformer_v2+doei" for p in pairs):
        text += ["## DOEI plug-in variants (one honest round)", "",
                 "Extracted over each seed's MCTformer-V2 checkpoint (no retraining); Δ and the "
                 "rule are paired with the `mctformer_v2` row of the same seed.", "",
                 ablation_table(load_variants(out, seeds), results.get("mctformer_v2", {})), ""]
    missing = [f"`{row}` (seeds {' '.join(str(s) for s in seeds if s not in by_seed)})"
               for row, by_seed in results.items() if len(by_seed) < len(seeds)]
    if missing:
        text.append("**Not finished** (rerun the same command: finished steps are reused): " +
                    ", ".join(missing) + ".\n")
    spent = sum(r.get("seconds", 0.0) for by_seed in results.values() for r in by_seed.values())
    text.append(f"Time: {spent / 60:.1f} min summed over the finished (seed, method) steps "
                f"(training, extraction, evaluation; a variant's extraction is not counted); "
                f"this invocation ran {minutes:.1f} min.\n")
    body = "\n".join(text)
    atomic_write_bytes(out / "findings.md", body.encode())
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(report, body.encode())
    return body


def run(out: Path, *, seeds: Sequence[int], pairs: Sequence[Pair] = PAIRS,
        scale: DemoScale = FULL, scale_name: str = "full", data: Optional[Path] = None,
        init_dir: Optional[Path] = None, report: Optional[Path] = None, workers: int = 2,
        device: str = "cpu", variants: bool = True) -> str:
    from wsss_fast.data.synthetic import generate_synthetic
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if data is None:   # the demo's data folder, generated as the demo does with data seed 0
        data = out / "data"
        options = dict(num_train=scale.num_train, num_val=scale.num_val, seed=0,
                       workers=workers)
        if scale.image_size is not None:
            options["image_size"] = scale.image_size
        generate_synthetic(data, **options)
    elif not (out / "data").exists():
        os.symlink(data.resolve(), out / "data")
    cooccurrence = cooccurrence_classes(data)
    rows = rows_of(pairs)

    def refresh():
        return write_report(out, report, pairs, seeds, scale_name, init_dir,
                            (time.perf_counter() - started) / 60, variants)

    # Row by row, each over all seeds, so that a partial run has whole pairs: the DOEI pairs
    # (the cheapest models) first, then TransCAM / BNR, then the ResNets.
    for row in sorted(rows, key=RUN_ORDER.index):
        for seed in seeds:
            print(f"[findings] seed {seed}: {row}", file=sys.stderr, flush=True)
            run_row(row, data, out / f"seed{seed}", scale, seed, workers=workers, device=device,
                    init_dir=init_dir, cooccurrence=cooccurrence)
            refresh()
        if row != "mctformer_v2+doei" or not variants:
            continue
        for name, model_args in DOEI_VARIANTS.items():
            for seed in seeds:
                print(f"[findings] seed {seed}: DOEI variant {name}", file=sys.stderr, flush=True)
                seed_dir = out / f"seed{seed}"
                run_row("mctformer_v2+doei", data, seed_dir, scale, seed, workers=workers,
                        device=device, init_dir=init_dir, cooccurrence=cooccurrence,
                        model_args=model_args, work=variant_dir(seed_dir, name))
                refresh()
    return refresh()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (resumable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--init-dir", type=Path, help="pretrained backbones (<family>*.pt: vit, "
                       "conformer, resnet, resnet38) passed to train as --init")
    start.add_argument("--pretrained", action="store_true", help="the shipped backbones "
                       "(pretrained/, as `wsss-fast demo --pretrained`): --init-dir pretrained")
    parser.add_argument("--data", type=Path, help="an existing demo data folder (default: "
                        "OUT/data, generated as the demo does)")
    parser.add_argument("--report", type=Path, default=REPO / "benchmarks" / "results" /
                        "findings.md", help="where the report goes (also OUT/findings.md)")
    parser.add_argument("--pairs", nargs="+", metavar="METHOD",
                        help="only the pairs whose method is one of these rows")
    parser.add_argument("--quick", action="store_true",
                        help="the demo's --quick scale (shows that it runs; numbers mean nothing)")
    parser.add_argument("--no-variants", action="store_true", help="skip the DOEI variants")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch threads of training (default: "
                        "torch's; 1 is often faster on a busy machine; no effect on results)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds: expected distinct seeds >= 0, got {args.seeds}")
    pairs = PAIRS
    if args.pairs:
        known = [p.method for p in PAIRS]
        unknown = sorted(set(args.pairs) - set(known))
        if unknown:
            parser.error(f"--pairs: unknown {unknown}; known: {known}")
        pairs = tuple(p for p in PAIRS if p.method in args.pairs)
    if args.pretrained:
        args.init_dir = PRETRAINED_DIR
    if args.init_dir is not None and not args.init_dir.is_dir():
        parser.error(f"--init-dir: {args.init_dir} is not a folder")
    scale = QUICK if args.quick else FULL
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)     # extraction runs in this process
        scale = DemoScale(scale.num_train, scale.num_val, scale.image_size,
                          {**scale.train_overrides, "threads": args.threads},
                          scale.lpcam_bank_images)
    print(run(args.out, seeds=args.seeds, pairs=pairs, scale=scale,
              scale_name="quick" if args.quick else "full", data=args.data,
              init_dir=args.init_dir, report=args.report, workers=args.workers,
              device=args.device, variants=not args.no_variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
