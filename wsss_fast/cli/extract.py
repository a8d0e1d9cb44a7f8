"""Extract CAMs of a dataset (multi-scale, flipped, resumable, sharded under torchrun).

Writes one CAM file per image into OUT/cams/ (IRN's {keys, cam, high_res} dict by default, or
MCTformer's {class: map}), optional JET overlays into OUT/overlays/, and OUT/manifest-extract.json.
Images that cannot be used (unreadable, no image-level labels, too small for the model) are
skipped, listed in the manifest, and do not stop the run. Rerunning the same command resumes.

  wsss-fast extract --data VOC2012 --split train --model mctformer_v2 \\
      --checkpoint MCTformer_v2.pth --out cams_v2
  torchrun --nproc_per_node 4 -m wsss_fast extract ...      # one shard (and GPU) per rank
  wsss-fast extract --method lpcam --prototypes prototypes.pt --model resnet50_cam ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from wsss_fast.cli.common import (DTYPES, UsageError, add_dataset_arguments,
                                  add_runtime_arguments, finish_run, item_path,
                                  open_dataset_from, progress, report_problems,
                                  require)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    group = parser.add_argument_group("model and method")
    group.add_argument("--model", help="registered model name (mctformer_v1, mctformer_v2, "
                       "mctformer_plus, transcam, token_cam)")
    group.add_argument("--checkpoint", help="weights (architecture read from them)")
    group.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="architecture argument not readable from the weights, e.g. "
                       "num_heads=2 (repeatable)")
    group.add_argument("--random-init", action="store_true",
                       help="run without a checkpoint (benchmarks and smoke tests only)")
    group.add_argument("--preset", help="CAM preset (default: the model's own)")
    group.add_argument("--method", default="cam", choices=("cam", "lpcam"),
                       help="cam: the preset's CAMs (default); lpcam: LPCAM prototype heatmaps "
                       "of an IRN CAM classifier (needs --prototypes)")
    group.add_argument("--prototypes", metavar="FILE",
                       help="LPCAM prototypes of this checkpoint (wsss-fast prototypes)")
    group.add_argument("--preset-arg", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a preset field (YAML value), e.g. square_sizes=[128,256] "
                       "or 'cam_kwargs={cls_layers: 4, refine: false}' (repeatable)")
    group.add_argument("--scales", type=float, nargs="+", help="override the preset's scales")
    group.add_argument("--no-flip", action="store_true", help="no flipped passes")
    group.add_argument("--dtype", default="fp32", choices=DTYPES,
                       help="autocast dtype of the forward (default fp32)")
    group.add_argument("--max-affinity-mib", type=float,
                       help="refine by streaming when a pass's dense affinity exceeds this")
    group.add_argument("--batch-size", type=int, default=1,
                       help="images per forward (images of one size are batched; default 1)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", help="output folder")
    group.add_argument("--format", default="irn", choices=("irn", "mctformer"),
                       help="CAM file format (default irn: {keys, cam, high_res})")
    group.add_argument("--fp16", action="store_true", help="store maps as float16")
    group.add_argument("--overlays", action="store_true",
                       help="also write a JET overlay PNG per present class")
    add_runtime_arguments(parser)


def parse_model_args(pairs, option: str = "--model-arg") -> dict:
    """``["k=v", ...]`` -> ``{k: YAML value of v}``."""
    import yaml
    parsed = {}
    for pair in pairs or ():
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {pair!r}: expected KEY=VALUE")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def _build_engine(args, dataset, device):
    from wsss_fast.engine import CamEngine
    from wsss_fast.models.registry import create_model, model_preset
    if args.checkpoint is None and not args.random_init:
        raise UsageError("--checkpoint is required (or --random-init for a smoke test)")
    torch.manual_seed(0)   # --random-init: the same weights on every rank
    model = create_model(args.model, num_classes=len(dataset.class_names),
                         checkpoint=args.checkpoint, **parse_model_args(args.model_arg))
    overrides = parse_model_args(args.preset_arg, "--preset-arg")
    for name, value in overrides.items():
        if isinstance(value, list):
            overrides[name] = tuple(value)
    if args.scales:
        overrides["scales"] = tuple(args.scales)
    if args.no_flip:
        overrides["flip"] = False
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.method == "lpcam":
        from wsss_fast.engine.lpcam import LpcamEngine
        return LpcamEngine(model, _lpcam_prototypes(args, dataset), device=device, dtype=dtype,
                           **overrides)
    return CamEngine(model, args.preset or model_preset(args.model), device=device, dtype=dtype,
                     max_affinity_mib=args.max_affinity_mib, **overrides)


def _lpcam_prototypes(args, dataset):
    """The --prototypes of --method lpcam, checked against --checkpoint and the classes."""
    from wsss_fast.engine.lpcam import Prototypes
    from wsss_fast.io.run_state import file_digest
    if args.prototypes is None:
        raise UsageError("--method lpcam needs --prototypes FILE (see wsss-fast prototypes)")
    if args.preset is not None:
        raise UsageError("--preset does not apply to --method lpcam (its passes are fixed: "
                         "use --scales / --no-flip)")
    prototypes = Prototypes.load(args.prototypes)
    built_from = prototypes.checkpoint_sha256
    if built_from is not None and (args.checkpoint is None
                                   or file_digest(args.checkpoint) != built_from):
        raise UsageError(f"--prototypes {args.prototypes} was built from another checkpoint "
                         f"(sha256 {built_from[:12]}…) than --checkpoint {args.checkpoint}")
    if tuple(prototypes.class_names) != tuple(dataset.class_names):
        raise UsageError(f"--prototypes {args.prototypes} holds the classes "
                         f"{list(prototypes.class_names)}, the dataset has "
                         f"{list(dataset.class_names)}")
    return prototypes


def _config(args, engine, dataset) -> dict:
    from wsss_fast.io.run_state import file_digest
    method = {} if args.method == "cam" else {
        "method": args.method, "prototypes": str(Path(args.prototypes).resolve()),
        "prototypes_sha256": file_digest(args.prototypes)}
    return {
        "model": args.model, "model_args": parse_model_args(args.model_arg),
        "checkpoint": None if args.checkpoint is None else str(Path(args.checkpoint).resolve()),
        "checkpoint_sha256": None if args.checkpoint is None else file_digest(args.checkpoint),
        "preset": vars(engine.preset), "dtype": args.dtype, "format": args.format,
        "fp16": args.fp16, "overlays": args.overlays, "dataset": dataset.name,
        "classes": list(dataset.class_names), **method,
    }


class _Writer:
    """Writes one image's outputs and journals them."""

    def __init__(self, args, out: Path, class_names, state):
        self.args, self.out, self.class_names, self.state = args, out, class_names, state

    def outputs(self, item: str, keys=()) -> dict[str, Path]:
        outputs = {"cam": item_path(self.out / "cams", item, ".npy")}
        if self.args.overlays:
            for k in keys:
                outputs[f"overlay_{k}"] = item_path(self.out / "overlays", item,
                                                    f"_{self.class_names[k]}.png")
        return outputs

    def write(self, item: str, image: np.ndarray, keys, high_res, low_res) -> None:
        from wsss_fast.io.cam_files import save_cam_file
        from wsss_fast.io.overlays import jet_overlay, save_rgb_png
        outputs = self.outputs(item, keys)
        save_cam_file(outputs["cam"], keys, high_res, low_res, fmt=self.args.format,
                      fp16=self.args.fp16)
        for i, k in enumerate(keys if self.args.overlays else ()):
            save_rgb_png(outputs[f"overlay_{k}"], jet_overlay(image, high_res[i]))
        self.state.record_done(item, outputs)


def _extract_batch(engine, batch, writer, state) -> None:
    """CAMs of a batch; a ValueError (e.g. an image too small for the model) is isolated to its
    image by retrying the batch one image at a time."""
    try:
        results = engine.extract([it["image"] for it in batch], [it["labels"] for it in batch])
    except ValueError as error:
        if len(batch) > 1:
            for item in batch:
                _extract_batch(engine, [item], writer, state)
        else:
            state.record_skipped(batch[0]["id"], str(error))
        return
    for item, result in zip(batch, results):
        keys = torch.as_tensor(result.keys, dtype=torch.long)
        writer.write(item["id"], item["image"], result.keys,
                     result.high_res[keys.to(result.high_res.device)].cpu().numpy(),
                     result.low_res[keys.to(result.low_res.device)].cpu().numpy())


def run(args: argparse.Namespace) -> int:
    from wsss_fast.data.loader import image_loader
    from wsss_fast.distributed import close, init_ranks, shard
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.io.run_state import RunState

    require(args, "data", "model", "out")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    context = init_ranks(args.device)
    try:
        dataset = open_dataset_from(args)
        engine = _build_engine(args, dataset, context.device)
        out = Path(args.out)
        state = RunState(out, "extract", _config(args, engine, dataset), rank=context.rank,
                         world=context.world, overwrite=args.overwrite)
        if context.is_main:
            report_problems(dataset, state)
        writer = _Writer(args, out, dataset.class_names, state)
        ids = shard(dataset.ids, context.rank, context.world)
        state.counts["assigned"] = len(ids)
        todo = []
        for item in ids:
            if args.overlays:   # overlay names depend on the keys stored in the CAM file
                done = _finished_with_overlays(state, writer, item)
            else:
                done = state.is_finished(item, writer.outputs(item), validate=load_cam_file)
            if done:
                state.counts["already_done"] += 1
            else:
                todo.append(item)
        start = time.perf_counter()
        batch = []
        bar = progress(image_loader(dataset, todo, workers=args.workers), len(todo),
                       f"extract[{context.rank}]", args.quiet, context.rank)
        for item in bar:
            if item["error"] is not None:
                state.record_skipped(item["id"], item["error"])
            elif item["labels"] is None:
                state.record_skipped(item["id"], "no image-level labels for this id")
            elif not np.any(np.asarray(item["labels"]) > 0):
                # IRN's convention: no positive class -> an empty CAM (all background later).
                height, width = item["image"].shape[:2]
                empty = np.zeros((0, height, width), np.float32)
                writer.write(item["id"], item["image"], np.zeros(0, np.int64), empty,
                             np.zeros((0, -(-height // 4), -(-width // 4)), np.float32))
            else:
                batch.append(item)
                if len(batch) == args.batch_size:
                    _extract_batch(engine, batch, writer, state)
                    batch = []
        if batch:
            _extract_batch(engine, batch, writer, state)
        seconds = time.perf_counter() - start
        return finish_run("extract", state, context, {"extract_seconds": round(seconds, 3)})
    finally:
        close(context)


def _finished_with_overlays(state, writer, item) -> bool:
    from wsss_fast.io.cam_files import CamFileError, load_cam_file
    cam_path = writer.outputs(item)["cam"]
    if not cam_path.exists():
        return False
    try:
        keys = load_cam_file(cam_path).keys
    except CamFileError:
        cam_path.unlink()
        return False
    return state.is_finished(item, writer.outputs(item, keys))
