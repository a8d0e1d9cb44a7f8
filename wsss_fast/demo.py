"""The end-to-end demo on the built-in synthetic benchmark (DESIGN §9), no download.

Generates the data, trains a small model per method, extracts CAMs on the validation split with
every method, evaluates the seeds (background-threshold sweep), makes pseudo-labels with the dense
CRF and with IRN's random walk, evaluates those, and writes a report: a markdown table, the
sweep curves and an overlay gallery. With ``learned_rw`` (the default) the random walk of the
strong methods (``LEARNED_RW``) is IRN's over the boundaries of one IRNet, trained on the
confident regions of the first such row (``shared_irnet``), followed by IRN's label CRF; without
it, over image-gradient edges. With ``pretrained`` (the default) every model starts from the
shipped source-domain backbone of its family; without it, from random weights. Every step calls
the pipeline API
(``wsss_fast.pipeline``, the functions under the CLI) and is resumable: rerunning the demo in
the same folder reuses finished steps.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# Methods in report order; each is a training method of wsss_fast.train (LPCAM: prototypes
# over the IRN CAM classifier), or an inference plug-in in INFERENCE_PLUGINS.
DEMO_METHODS = ("token_cam", "mctformer_v1", "mctformer_v2", "mctformer_v2+doei",
                "mctformer_v2_doei", "transcam", "bnr", "lpcam", "edam")
# Rows that extract with another model over a trained method's checkpoint (no new weights):
# row -> (trained method, registry model, method whose extraction settings and preset apply).
INFERENCE_PLUGINS = {
    "mctformer_v2+doei": ("mctformer_v2", "mctformer_v2_doei_tiny", "mctformer_v2_doei"),
}


# Rows whose +RW column is IRN's learned walk (the strong methods, seeds >= 40 in the published
# table); the others keep the image-gradient walk (labelled in the report), which costs no
# training. One IRNet serves them all (shared_irnet): IRN trains one per CAM method, but the
# network is class-agnostic, and one per row cost 255-422 s each under load (15/30 epochs),
# more than the demo's budget; token_cam's IRNet walked MCTformer-V2's and LPCAM's training-split
# CAMs up to +6.8 / +18.7 over their seeds (README, learned affinity).
# TransCAM and BNR joined once their seeds passed 40 (patch-8 Conformer, session 7), EDAM with
# its warm phase (46.4, session 8).
LEARNED_RW = ("token_cam", "mctformer_v1", "mctformer_v2", "mctformer_v2+doei",
              "mctformer_v2_doei", "transcam", "bnr", "lpcam", "edam")
# IRNet's input is zero-padded to one square side covering every synthetic image (96-160 px), as
# IRN pads VOC images to 512.
IRN_PAD_SIZE = 160
# The learned walk's settings on the synthetic images (the one place they are chosen; refine's
# defaults stay IRN's), chosen on 100 training-split images of token_cam, MCTformer-V2 and LPCAM
# (their CAMs and ground truth, the demo's IRNet from token_cam's confident regions), not on the
# validation split the table reports (README, learned affinity; train seed / +CRF / this walk
# without and with the CRF: token_cam 54.5 / 63.6 / 61.7 / 65.2, MCTformer-V2 45.2 / 53.8 /
# 51.3 / 54.0, LPCAM 52.3 / 72.6 / 69.1 / 75.4):
# * steps 8: IRN's 256 fit its ~125×94 VOC grid; on ~30×35 grids they mix each object with its
#   surroundings through any gap (4 and 16 were within 1.3 points, 8 best or near on each row);
# * normalize "class": each class by its own max instead of IRN's max over all classes, so a weak
#   class is not drowned by a strong one;
# * IRN's x0 = cams·(1 − B) (keep_boundary_cams off): with the 30-epoch IRNet's thin rings
#   zeroing the boundary cells beats walking the CAMs on every row (+0.8 / +2.6 / +5.9);
# * upsample 1: the ×2 grid gained 0.8-1.2 over the weaker 10-epoch IRNets, 0.1 over this one;
# * bg_threshold 0.5: one level for every row (each row's best τ was 0.4-0.6);
# * crf "irn": the walk labels a stride-4 grid, upsampled bilinearly; IRN's label CRF (the +CRF
#   column's) over its labels puts the borders on the image's edges: the walk alone is 1.9-3.5
#   below +CRF on every row, walk + CRF 0.2-2.8 above.
LEARNED_RW_WALK = dict(steps=8, normalize="class", bg_threshold=0.5, crf="irn")


@dataclass(frozen=True)
class DemoScale:
    num_train: int
    num_val: int
    image_size: Optional[tuple] = None      # None: the generator's default size range
    train_overrides: dict = field(default_factory=dict)   # passed to train() for every method
    lpcam_bank_images: Optional[int] = None   # LPCAM's feature bank: first N training images


FULL = DemoScale(num_train=600, num_val=150, lpcam_bank_images=160)
QUICK = DemoScale(num_train=48, num_val=12, image_size=(96, 96),
                  train_overrides={"epochs": 2, "batch_size": 8}, lpcam_bank_images=24)


def _log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


@dataclass
class MethodResult:
    method: str
    seed_miou: float = float("nan")
    threshold: float = float("nan")
    fp: float = float("nan")
    fn: float = float("nan")
    cooccurrence_iou: float = float("nan")
    crf_miou: float = float("nan")
    rw_miou: float = float("nan")
    seconds_per_image: float = float("nan")
    train_seconds: float = float("nan")
    note: str = ""


def per_class(values: Sequence) -> np.ndarray:
    """An evaluation report's per-class list as floats (None, an absent class: NaN)."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def cooccurrence_iou(report: dict, cooccurrence: Sequence[int]) -> float:
    """Mean IoU at the best threshold of the co-occurrence classes (0-based foreground indices)
    in an evaluation report."""
    return float(np.nanmean(per_class(report["at_best"]["iou"])[[k + 1 for k in cooccurrence]]))


def cooccurrence_classes(data: Path) -> list[int]:
    design = json.loads((data / "dataset.json").read_text()).get("cooccurrence", {})
    indices = {entry["class_index"] for entry in design.get("background", {}).values()}
    for pair in design.get("pairs", []):
        indices.update(pair["class_indices"])
    return sorted(indices)


def extraction_plan(row: str) -> tuple[str, str, str, str]:
    """``(trained method, registry model, CAM preset, method whose synthetic extraction
    options apply)`` of a report row: a training method, or an INFERENCE_PLUGINS row."""
    from wsss_fast.train.methods import get_method
    if row in INFERENCE_PLUGINS:
        trained, model, settings = INFERENCE_PLUGINS[row]
        return trained, model, get_method(settings).preset, settings
    chosen = get_method(row)
    return row, chosen.model, chosen.preset, row


# Training settings that differ when a method starts from a shipped pretrained backbone
# (pretrained/*.pt, `wsss-fast pretrain`), over the synthetic recipe: the Conformer methods, the
# slowest to train, get 6 epochs instead of 10 (they start from trained features); at patch 8
# (session 7) a step costs ~2x a patch-16 one, so these rows train about twice as long as in
# session 6 (seed 0, 6 epochs from conformer.pt: TransCAM 45.9, BNR 51.6). EDAM trains 14 epochs:
# 10 warm epochs of the plain-CAM loss on the DA layer's raw class maps, then 4 of EDAM's loss at
# 8x the schedule's lr (session 8, seed 0, one run each, README "Why EDAM does not localize
# here": seed 46.4, against 27.2 for the recipe's 10 EDAM epochs; the same 10+4 at 4x 44.7, at 1x
# 39.2, 1x with the trunk frozen 34.2; 10+2 at 1x 28.0; the warm checkpoint's DA masks 25.3).
_PRETRAINED_SHORT = dict(epochs=6)
PRETRAINED_TRAIN: dict = {"transcam": _PRETRAINED_SHORT, "bnr": _PRETRAINED_SHORT,
                          "edam": dict(epochs=14, warm_epochs=10, lr_after_warm=8.0)}
WARM_PHASE_OPTIONS = ("warm_epochs", "lr_after_warm", "freeze_trunk")


def _scaled_warm_phase(entry: dict, epochs: Optional[int]) -> dict:
    """``entry`` for a scale that trains ``epochs`` (None: the entry's): the warm phase keeps its
    share of the epochs, rounded down (QUICK's 2 of EDAM's 14: 1); in a run too short for one
    warm epoch the warm-phase options are dropped."""
    if "warm_epochs" not in entry or epochs is None or epochs == entry["epochs"]:
        return entry
    warm = entry["warm_epochs"] * epochs // entry["epochs"]
    if warm == 0:
        return {k: v for k, v in entry.items() if k not in WARM_PHASE_OPTIONS}
    return {**entry, "warm_epochs": warm}


def train_overrides(method: str, scale: DemoScale, pretrained: bool) -> dict:
    """TrainConfig fields over the synthetic recipe for ``method``: the scale's, and with
    ``pretrained`` the shipped backbone of its model's family (``init``) and PRETRAINED_TRAIN."""
    if not pretrained:
        return dict(scale.train_overrides)
    from wsss_fast.train.methods import get_method
    from wsss_fast.train.pretrain import shipped_backbone
    entry = _scaled_warm_phase(PRETRAINED_TRAIN.get(method, {}),
                               scale.train_overrides.get("epochs"))
    return {**entry, **scale.train_overrides,
            "init": str(shipped_backbone(get_method(method).model))}


def _train(method: str, data: Path, out: Path, scale: DemoScale, seed: int, workers: int,
           device: str, pretrained: bool = False) -> Path:
    """The checkpoint of ``method`` trained into ``out`` (trained there first if missing) with
    the synthetic recipe, explicitly (from the shipped backbone with ``pretrained``)."""
    from wsss_fast.pipeline import TrainConfig, train
    from wsss_fast.train.trainer import CHECKPOINT, STATE
    checkpoint = out / CHECKPOINT
    if not train_finished(out):
        train(TrainConfig.from_recipe(
            "synthetic", method=method, data=str(data), out=str(out), split="train", seed=seed,
            workers=workers, device=device, resume=(out / STATE).exists(),
            **train_overrides(method, scale, pretrained)))
    return checkpoint


def extract_options(row: str, data: Path, checkpoint: Path, out: Path, *, workers: int,
                    device: str, model_args: Optional[dict] = None,
                    preset_args: Optional[dict] = None):
    """The demo's extraction of the validation split for a report row: the row's model and
    preset with its method's synthetic extraction settings (``Method.synthetic_extract``), then
    ``preset_args`` (later ones win) and ``model_args``."""
    from wsss_fast.pipeline import ExtractOptions
    from wsss_fast.train.methods import get_method
    _, model, preset, settings = extraction_plan(row)
    return ExtractOptions(
        data=str(data), split="val", model=model, checkpoint=str(checkpoint), preset=preset,
        model_args=dict(model_args or {}),
        preset_args={**get_method(settings).synthetic_extract, **(preset_args or {})},
        device=device, out=str(out), workers=workers, quiet=True)


def checked(result):
    """A dataset job's result; a job that could do nothing stops the demo with its first
    reason."""
    from wsss_fast.pipeline import PipelineError
    if result.exit_status != 0:
        reason = result.skipped[0]["reason"] if result.skipped else "no items"
        raise PipelineError(f"{result.command} did nothing in {result.out_dir}: {reason}")
    return result


def train_finished(out: Path) -> bool:
    """Whether the training run in ``out`` completed (an interrupted run leaves its last epoch's
    checkpoint behind, which must be resumed, not used)."""
    from wsss_fast.train.trainer import CHECKPOINT, REPORT
    if not (out / CHECKPOINT).exists() or not (out / REPORT).exists():
        return False
    return bool(json.loads((out / REPORT).read_text()).get("finished"))


def evaluate_folder(data: Path, split: str, source: str, folder: Path, out: Path) -> dict:
    """The evaluation report of CAM files (``source`` "cams") or label PNGs (``"pred"``),
    written to ``out``."""
    from wsss_fast.pipeline import EvaluateOptions, evaluate
    folders = {"cams": str(folder)} if source == "cams" else {"pred": str(folder)}
    return evaluate(EvaluateOptions(data=str(data), split=split, out=str(out),
                                    thresholds="0:1:0.01", **folders)).report


def demo_lpcam_cams(data: Path, work: Path, train_overrides: dict, *, seed: int, workers: int,
                    device: str, bank_images: Optional[int] = None) -> Path:
    """The demo's LPCAM step on the synthetic benchmark: trains "irn_cam" into ``work/train``,
    builds ``work/prototypes.pt`` and extracts LPCAM CAMs of the "val" split into
    ``work/extract``; each step is skipped when its output exists. ``bank_images``: build the
    feature bank from the first that many training images only (the bank's cost is 9 forward
    passes per image). Returns ``work/extract/cams``."""
    from wsss_fast.pipeline import (ExtractOptions, PrototypesOptions, TrainConfig,
                                    build_prototypes, extract, train)
    from wsss_fast.train.methods import get_method
    from wsss_fast.train.trainer import CHECKPOINT, STATE

    data, work = Path(data), Path(work)
    model = get_method("irn_cam").model
    checkpoint = work / "train" / CHECKPOINT
    if not train_finished(work / "train"):
        train(TrainConfig.from_recipe(
            "synthetic", method="irn_cam", data=str(data), out=str(work / "train"),
            split="train", seed=seed, workers=workers, device=device,
            resume=(work / "train" / STATE).exists(), **train_overrides))
    common = dict(data=str(data), model=model, checkpoint=str(checkpoint), device=device,
                  workers=workers, quiet=True)
    prototypes = work / "prototypes.pt"
    if not prototypes.exists():
        bank_split = "train"
        if bank_images is not None:
            train_ids = (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
            bank_split = str(work / "bank.txt")
            work.mkdir(parents=True, exist_ok=True)
            Path(bank_split).write_text("\n".join(train_ids[:bank_images]) + "\n")
        build_prototypes(PrototypesOptions(**common, split=bank_split, out=str(prototypes),
                                           seed=seed))
    checked(extract(ExtractOptions(**common, method="lpcam", prototypes=str(prototypes),
                                   split="val", out=str(work / "extract"))))
    return work / "extract" / "cams"


# The demo's one IRNet: out/IRNET_DIR (its source row named in IRNET_SOURCE there).
IRNET_DIR, IRNET_SOURCE = "irnet", "source_row.txt"


def shared_irnet(method: str, data: Path, out: Path, cams: Path, scale: DemoScale, *,
                 seed: int, workers: int, device: str) -> Optional[Path]:
    """The checkpoint of the demo's IRNet in ``out/irnet``, trained there first if missing on
    this row's confident regions (``pseudo-label --rule confident`` of its validation CAMs; IRN's
    protocol: the network learns from the CAMs of the images it then labels, never from ground
    truth). The backbone trains with the heads from random weights: frozen (IRN's regime) or
    fine-tuned from the shipped resnet.pt, its boundaries walked worse (README, learned
    affinity). None when no image has a usable confident region."""
    from wsss_fast.io.atomic import atomic_write_bytes
    from wsss_fast.pipeline import NothingToDo, PseudoLabelOptions, TrainConfig, pseudo_label, train
    from wsss_fast.train.trainer import CHECKPOINT, STATE
    run = out / IRNET_DIR
    if train_finished(run):   # a checkpoint is also saved mid-run
        return run / CHECKPOINT
    confident = out / method / "confident"
    checked(pseudo_label(PseudoLabelOptions(data=str(data), split="val", cams=str(cams),
                                            workers=workers, quiet=True, out=str(confident),
                                            rule="confident", crf="irn")))
    # IRN keeps its crop (its pairs reach 40 px); a smaller scale shortens its schedule.
    overrides = {k: v for k, v in scale.train_overrides.items() if k != "crop"}
    try:
        train(TrainConfig.from_recipe(
            "synthetic", method="irn", data=str(data), split="val", out=str(run), seed=seed,
            ir_labels=str(confident / "labels"), workers=workers, device=device,
            resume=(run / STATE).exists(), quiet=True, **overrides))
    except NothingToDo as error:
        _log(f"{method}: no IRNet ({error})")
        return None
    atomic_write_bytes(run / IRNET_SOURCE, f"{method}\n".encode())
    return run / CHECKPOINT


def irnet_source(out: Path) -> Optional[str]:
    """The row whose confident regions trained the demo's IRNet in ``out`` (None: none yet)."""
    path = Path(out) / IRNET_DIR / IRNET_SOURCE
    return path.read_text().strip() if path.exists() else None


def learned_walk(method: str, data: Path, out: Path, cams: Path, scale: DemoScale, *,
                 seed: int, workers: int, device: str) -> Optional[Path]:
    """IRN's refinement of a row's validation CAMs: the boundary map of the demo's IRNet
    (``shared_irnet``, trained on this row's confident regions if it is the first) walked by
    ``refine`` with ``LEARNED_RW_WALK``. Returns the labels folder, or None when there is no
    IRNet."""
    from wsss_fast.pipeline import RefineOptions, refine
    checkpoint = shared_irnet(method, data, out, cams, scale, seed=seed, workers=workers,
                              device=device)
    if checkpoint is None:
        return None
    work = out / method
    checked(refine(RefineOptions(data=str(data), split="val", cams=str(cams), workers=workers,
                                 quiet=True, out=str(work / "rw"), preset="irn",
                                 **LEARNED_RW_WALK, irn_checkpoint=str(checkpoint),
                                 pad_size=IRN_PAD_SIZE, device=device)))
    return work / "rw" / "labels"


def run_method(method: str, data: Path, out: Path, scale: DemoScale, seed: int, workers: int,
               device: str, cooccurrence: Sequence[int],
               pretrained: bool = False, learned_rw: bool = True) -> MethodResult:
    from wsss_fast.pipeline import (PseudoLabelOptions, RefineOptions, extract, pseudo_label,
                                    refine)
    result = MethodResult(method)
    work = out / method
    start = time.perf_counter()
    if method == "lpcam":
        cams = demo_lpcam_cams(data, work, train_overrides("irn_cam", scale, pretrained),
                               seed=seed, workers=workers,
                               device=device, bank_images=scale.lpcam_bank_images)
        result.train_seconds = time.perf_counter() - start   # training + prototypes
    else:
        trained, _, _, settings = extraction_plan(method)
        checkpoint = _train(trained, data, out / trained / "train", scale, seed, workers, device,
                            pretrained)
        if trained == method:
            result.train_seconds = time.perf_counter() - start
        else:
            result.note = f"{trained}'s checkpoint, {settings} extraction (no training)"
        extract_dir = work / "extract"
        checked(extract(extract_options(method, data, checkpoint, extract_dir, workers=workers,
                                        device=device)))
        cams = extract_dir / "cams"
    manifest = json.loads((cams.parent / "manifest-extract.json").read_text())
    done = manifest["counts"]["done"]
    seconds = sum(r.get("seconds", 0.0) for r in manifest["ranks"])
    if done:
        result.seconds_per_image = seconds / done
    seeds = evaluate_folder(data, "val", "cams", cams, work / "eval_seeds")
    result.seed_miou, result.threshold = seeds["best_miou"], seeds["best_threshold"]
    result.fp = float(np.nanmean(per_class(seeds["at_best"]["fp_rate"])))
    result.fn = float(np.nanmean(per_class(seeds["at_best"]["fn_rate"])))
    result.cooccurrence_iou = cooccurrence_iou(seeds, cooccurrence)
    common = dict(data=str(data), split="val", cams=str(cams), workers=workers, quiet=True)
    # The threshold as the report prints it (4 decimals), so a rerun finds the same config.
    threshold = round(result.threshold, 4)
    checked(pseudo_label(PseudoLabelOptions(**common, out=str(work / "crf"), rule="constant",
                                            threshold=threshold, crf="irn")))
    result.crf_miou = evaluate_folder(data, "val", "pred", work / "crf" / "labels",
                                      work / "eval_crf")["at_best"]["miou"]["nanmean"]
    rw_labels = None
    if learned_rw and method in LEARNED_RW:
        rw_labels = learned_walk(method, data, out, cams, scale, seed=seed, workers=workers,
                                 device=device)
    if rw_labels is None:
        checked(refine(RefineOptions(**common, out=str(work / "rw_gradient"), preset="irn",
                                     bg_threshold=threshold, device=device)))
        rw_labels = work / "rw_gradient" / "labels"
        if learned_rw:
            why = "no IRNet for this row" if method not in LEARNED_RW else \
                "no confident region to train IRNet on"
            result.note = "; ".join(filter(None, [result.note, f"+RW over image-gradient "
                                                  f"edges ({why})"]))
    result.rw_miou = evaluate_folder(data, "val", "pred", rw_labels,
                                     work / "eval_rw")["at_best"]["miou"]["nanmean"]
    return result


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}"


def _seconds(value: float) -> str:
    return "—" if value != value else f"{value:.0f}"


def report_table(results: Sequence[MethodResult]) -> str:
    """The markdown table, then a line per note (the row's method name marks it)."""
    lines = ["| method | seed mIoU | best τ | FP | FN | co-occ. IoU | +CRF mIoU | +RW mIoU | "
             "extract s/img | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.method} | {_pct(r.seed_miou)} | {r.threshold:.2f} | {_pct(r.fp)} | "
                     f"{_pct(r.fn)} | {_pct(r.cooccurrence_iou)} | {_pct(r.crf_miou)} | "
                     f"{_pct(r.rw_miou)} | {r.seconds_per_image:.3f} | "
                     f"{_seconds(r.train_seconds)} |")
    notes = [f"- {r.method}: {r.note}" for r in results if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def gallery_rows(data: Path, rows: int) -> list[tuple[str, int]]:
    """``(validation id, 0-based class)`` pairs for the gallery: the first images in order, one
    of their ground-truth classes per row, a class not shown yet while there is one."""
    from wsss_fast.data.images import read_label_png
    candidates = []
    for item in (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:8 * rows]:
        present = np.unique(read_label_png(data / "SegmentationClass" / f"{item}.png"))
        candidates += [(item, int(v) - 1) for v in present if 0 < v < 255]
    picked, shown = [], set()
    for pair in candidates:                  # new classes first, then the rest in order
        if len(picked) < rows and pair[1] not in shown and pair[0] not in dict(picked):
            picked.append(pair)
            shown.add(pair[1])
    picked += [p for p in candidates if p not in picked][:rows - len(picked)]
    return picked


def _gallery(data: Path, out: Path, results: Sequence[MethodResult], path: Path,
             rows: int = 6) -> None:
    """Rows: a validation image and one of its classes (named in the first column); columns: the
    image, its ground truth (that class outlined in yellow), and per method the CAM of that class
    (JET) with the white outline of the pixels the method's seed gives that class at its best
    threshold (the header's τ)."""
    from wsss_fast.data.images import read_image, read_label_png
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.io.overlays import (jet_overlay, label_overlay, labelled_grid, outline,
                                       save_rgb_png)
    from wsss_fast.postprocess.pseudo_label import constant_background
    names = (data / "classes.txt").read_text().split()
    picks = gallery_rows(data, rows)
    cells = []
    for item, k in picks:
        image = read_image(data / "JPEGImages" / f"{item}.jpg")
        truth = read_label_png(data / "SegmentationClass" / f"{item}.png")
        # Yellow: white would vanish in the ground truth's light ignore band.
        row = [image, outline(label_overlay(image, truth, alpha=0.7), truth == k + 1,
                              colour=(255, 255, 0))]
        for r in results:
            cam_path = out / r.method / "extract" / "cams" / f"{item}.npy"
            record = load_cam_file(cam_path) if cam_path.exists() else None
            if record is None or k not in record.keys:
                row.append(np.zeros_like(image))
                continue
            cams, keys = record.high_res, record.keys
            tile = jet_overlay(image, cams[list(keys).index(k)])
            if r.threshold == r.threshold:
                seed = constant_background(cams, keys, round(r.threshold, 4))
                tile = outline(tile, seed == k + 1)
            row.append(tile)
        cells.append(row)
    titles = [["image"], ["ground truth"]] + [[r.method, f"tau {r.threshold:.2f}"]
                                              for r in results]
    save_rgb_png(path, labelled_grid(cells, titles, [[item, names[k]] for item, k in picks]))


def run_demo(out, *, quick: bool = False, seed: int = 0, workers: int = 2, device: str = "cpu",
             methods: Sequence[str] = DEMO_METHODS, scale: Optional[DemoScale] = None,
             pretrained: bool = True, learned_rw: bool = True) -> Path:
    """Run the demo into ``out``; returns the report path. ``scale`` replaces the size that
    ``quick`` picks (QUICK or FULL). ``pretrained``: every model starts from the shipped
    backbone of its family (pretrained/*.pt); False: from scratch. ``learned_rw`` (default):
    the +RW column of the LEARNED_RW rows walks over the demo's IRNet's boundaries; False:
    over image-gradient edges."""
    from wsss_fast.data.synthetic import generate_synthetic
    from wsss_fast.evaluate import plot_sweep
    from wsss_fast.io.atomic import atomic_write_bytes, atomic_write_json
    out = Path(out)
    if scale is None:
        scale = QUICK if quick else FULL
    started = time.perf_counter()
    data = out / "data"
    options = dict(num_train=scale.num_train, num_val=scale.num_val, seed=seed, workers=workers)
    if scale.image_size is not None:
        options["image_size"] = scale.image_size
    _log(f"synthetic data: {scale.num_train} train / {scale.num_val} val images in {data}")
    generate_synthetic(data, **options)
    cooccurrence = cooccurrence_classes(data)
    results = []
    for method in methods:
        _log(f"{method}: train, extract, evaluate, CRF, random walk")
        results.append(run_method(method, data, out, scale, seed, workers, device,
                                  cooccurrence, pretrained, learned_rw))
        _log(f"{method}: seed mIoU {_pct(results[-1].seed_miou)}")
    curves = {}
    for r in results:
        report = json.loads((out / r.method / "eval_seeds" / "evaluation.json").read_text())
        curves[r.method] = (report["thresholds"], per_class(report["miou_curve"]))
    plot_sweep(curves, out / "sweep_curves.png", title="seed mIoU vs background threshold")
    _gallery(data, out, results, out / "gallery.png")
    minutes = (time.perf_counter() - started) / 60
    table = report_table(results)
    names = (data / "classes.txt").read_text().split()
    start = ("backbones pretrained on the source domain (pretrained/*.pt)" if pretrained
             else "from scratch")
    walk = (f"over the boundary map of one IRNet trained on the confident regions of "
            f"{irnet_source(out) or 'the first learned-walk row'} (backbone trained with the "
            f"heads; refine {LEARNED_RW_WALK}"
            f"{', then IRN label CRF over the walked labels' if LEARNED_RW_WALK.get('crf') else ''}"
            f"), or over image-gradient edges where a note says so" if learned_rw
            else "over image-gradient edges")
    text = (f"# wsss-fast demo ({'quick' if quick else 'full'}, seed {seed}, {start})\n\n"
            f"Synthetic benchmark: {scale.num_train} training / {scale.num_val} validation "
            f"images, {len(names)} classes; co-occurrence classes: "
            f"{', '.join(names[k] for k in cooccurrence)}."
            f"\nSeeds: CAMs at the best background threshold (mIoU, nanmean over background + "
            f"classes); FP/FN: mean over classes at that threshold (IRN's rates); co-occ. IoU: "
            f"mean IoU of the co-occurrence classes; +CRF: IRN label CRF of the seed; +RW: IRN "
            f"random walk {walk}.\n\n{table}\n\n"
            f"Total time: {minutes:.1f} min. Curves: sweep_curves.png; overlays: gallery.png.\n")
    atomic_write_bytes(out / "report.md", text.encode())
    atomic_write_json(out / "report.json", {"quick": quick, "seed": seed, "minutes": minutes,
                                            "pretrained": pretrained, "learned_rw": learned_rw,
                                            "results": [vars(r) for r in results]})
    print(text)
    return out / "report.md"
