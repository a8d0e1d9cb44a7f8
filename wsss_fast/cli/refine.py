"""Refine CAMs into pseudo-labels by an affinity random walk (IRN or PSA, DESIGN §3.5).

  irn  the stride-4 CAMs (the `cam` entry of irn-format CAM files) walk over the path-max
       affinity of a boundary map (β 10, 256 steps), then ×4 upsampling, global-max
       normalization and a constant background plane (--bg-threshold 0.25).
  psa  the full-resolution CAMs with a (1 − max)^α background walk at stride 8 over a feature
       affinity (β 8, 256 steps).
Boundary maps (--edges DIR of <id>.npy in [0,1] at stride 4, e.g. from an IRN boundary network)
and PSA features (--features DIR of <id>.npy, C×⌈H/8⌉×⌈W/8⌉) are optional: without them an
image-gradient edge map / the image's colours stand in (a weaker, training-free substitute).

  wsss-fast refine --data VOC2012 --cams cams_v2/cams --out rw_labels --preset irn
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from wsss_fast.cli.common import (UsageError, add_dataset_arguments, add_runtime_arguments,
                                  finish_run, item_path, open_dataset_from,
                                  record_job_results, report_problems, require,
                                  validate_label_png)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("--cams", help="folder of irn-format CAM files (<id>.npy)")
    parser.add_argument("--out", help="output folder for <id>.png labels")
    parser.add_argument("--preset", default="irn", choices=("irn", "psa"))
    parser.add_argument("--edges", help="irn: folder of boundary maps <id>.npy (stride 4)")
    parser.add_argument("--features", help="psa: folder of affinity features <id>.npy")
    parser.add_argument("--beta", type=float, help="affinity power (default: the preset's)")
    parser.add_argument("--steps", type=int, help="random-walk steps (default 256)")
    parser.add_argument("--bg-threshold", type=float, help="irn: background plane (0.25)")
    parser.add_argument("--alpha", type=float, help="psa: background power (16)")
    add_runtime_arguments(parser)


def _preset_options(args) -> dict:
    import dataclasses

    from wsss_fast.postprocess.random_walk import RANDOM_WALK_PRESETS
    options = dataclasses.asdict(RANDOM_WALK_PRESETS[args.preset])
    for name in ("beta", "steps", "bg_threshold", "alpha"):
        value = getattr(args, name)
        if value is not None:
            if options[name] is None:
                raise UsageError(f"--{name.replace('_', '-')} does not apply to --preset "
                                 f"{args.preset}")
            options[name] = value
    return options


def _load_side_input(folder, item: str, expected_ndim: int):
    path = item_path(Path(folder), item, ".npy")
    if not path.exists():
        raise ValueError(f"missing {path}")
    array = np.load(path, allow_pickle=False)
    if array.ndim != expected_ndim:
        raise ValueError(f"{path}: expected {expected_ndim} dimensions, got {array.shape}")
    return array.astype(np.float32)


def image_color_features(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A training-free stand-in for AffinityNet features: the image's RGB in [0, 1], averaged
    over the 8×8 cells of PSA's zero-padded stride-8 grid, ``(3, ⌈H/8⌉, ⌈W/8⌉)``."""
    height, width = image.shape[:2]
    padded = np.zeros((grid[0] * 8, grid[1] * 8, 3), np.float32)
    padded[:height, :width] = image.astype(np.float32) / 255.0
    cells = padded.reshape(grid[0], 8, grid[1], 8, 3).mean(axis=(1, 3))
    return np.ascontiguousarray(cells.transpose(2, 0, 1))


def refine_one(settings: dict, item: str, image: np.ndarray, cam_path: Path,
               device: torch.device) -> np.ndarray:
    """The label of one image; ``settings``: preset, its options, edges and features folders."""
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.postprocess import random_walk as rw
    record = load_cam_file(cam_path)
    height, width = image.shape[:2]
    if record.keys.size == 0:
        return np.zeros((height, width), np.uint8)
    if record.high_res.shape[1:] != (height, width):
        raise ValueError(f"CAM size {record.high_res.shape[1:]} differs from the image size "
                         f"{(height, width)}")
    keys, options = record.keys, settings["options"]
    if settings["preset"] == "irn":
        if record.low_res is None:
            raise ValueError(f"{cam_path} has no stride-4 'cam' maps (write irn-format CAMs)")
        grid = record.low_res.shape[1:]
        edge = (_load_side_input(settings["edges"], item, 2) if settings["edges"]
                else rw.image_edge_map(image, grid))
        cams = torch.from_numpy(record.low_res).to(device)
        return rw.refine_irn(cams, keys, torch.from_numpy(np.ascontiguousarray(edge)).to(device),
                             (height, width), beta=options["beta"], steps=options["steps"],
                             bg_threshold=options["bg_threshold"])
    grid = (-(-height // 8), -(-width // 8))
    if settings["features"]:
        features = _load_side_input(settings["features"], item, 3)
    else:
        features = image_color_features(image, grid)
    cams = torch.from_numpy(record.high_res).to(device)
    return rw.refine_psa(cams, keys, torch.from_numpy(features).to(device),
                         alpha=options["alpha"], beta=options["beta"], steps=options["steps"])


def refine_job(item: str, image_path: str, cam_path: str, label_path: str, settings: dict):
    """One image (in a worker process on the CPU): read, walk, write atomically. Returns None or
    the reason the item was skipped."""
    from wsss_fast.data.images import ImageDecodeError, read_image, write_label_png
    from wsss_fast.io.cam_files import CamFileError
    if not Path(cam_path).exists():
        return f"no CAM file {cam_path}"
    try:
        image = read_image(image_path)
        label = refine_one(settings, item, image, Path(cam_path),
                           torch.device(settings["device"]))
    except (CamFileError, ImageDecodeError, ValueError) as error:
        return str(error)
    write_label_png(label_path, np.asarray(label, np.uint8))
    return None


def run(args: argparse.Namespace) -> int:
    from wsss_fast.distributed import close, init_ranks, shard
    from wsss_fast.io.run_state import RunState
    from wsss_fast.workers import run_in_workers
    require(args, "data", "cams", "out")
    options = _preset_options(args)
    cams_dir, out = Path(args.cams), Path(args.out)
    if not cams_dir.is_dir():
        raise UsageError(f"--cams {cams_dir}: not a folder")
    context = init_ranks(args.device)
    try:
        dataset = open_dataset_from(args)
        config = {"preset": args.preset, **options, "cams": str(cams_dir.resolve()),
                  "edges": args.edges, "features": args.features, "dataset": dataset.name}
        state = RunState(out, "refine", config, rank=context.rank, world=context.world,
                         overwrite=args.overwrite)
        if context.is_main:
            report_problems(dataset, state)
        ids = shard(dataset.ids, context.rank, context.world)
        state.counts["assigned"] = len(ids)
        todo = []
        for item in ids:
            outputs = {"label": item_path(out / "labels", item, ".png")}
            if state.is_finished(item, outputs, validate=validate_label_png):
                state.counts["already_done"] += 1
            else:
                todo.append(item)
        settings = {"preset": args.preset, "options": options, "edges": args.edges,
                    "features": args.features, "device": str(context.device)}
        jobs = [(item, dataset.sample(item).image_path, str(item_path(cams_dir, item, ".npy")),
                 str(item_path(out / "labels", item, ".png")), settings) for item in todo]
        # One walk runs on one thread (see csrc/cpu/random_walk.cpp): on the CPU, images are
        # walked in parallel worker processes; on a GPU, in this process.
        workers = args.workers if context.device.type == "cpu" else 0
        results = run_in_workers(refine_job, jobs, workers=workers, progress=not args.quiet,
                                 desc=f"refine[{context.rank}]")
        record_job_results(state, todo, results,
                           lambda item: {"label": item_path(out / "labels", item, ".png")})
        return finish_run("refine", state, context)
    finally:
        close(context)
