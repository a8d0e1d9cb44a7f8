"""``refine``: CAMs → pseudo-labels by an affinity random walk (IRN or PSA, DESIGN §3.5).

  irn  the stride-4 CAMs (the `cam` entry of irn-format CAM files) walk over the path-max
       affinity of a boundary map (β 10, 256 steps), then ×4 upsampling, global-max
       normalization and a constant background plane (bg_threshold 0.25); for small images,
       ``normalize="class"``, ``boundary_fill``, ``keep_boundary_cams`` and ``upsample`` (the
       walk on a finer grid) (off by default; postprocess.random_walk); ``crf="irn"``: IRN's
       label CRF over the walked labels. ``save_scores``: the walked, normalized class maps
       (before the background plane) are also written as CAM files, so that ``evaluate --cams``
       sweeps the walk's background threshold as it does a seed's, and ``pseudo-label --rule
       constant`` labels them at the threshold chosen (``--crf irn``: the label CRF after it).
  psa  the full-resolution CAMs with a (1 − max)^α background walk at stride 8 over a feature
       affinity (β 8, 256 steps).
The affinity comes from a learned network (``irn_checkpoint``: IRNet's boundary map;
``affinity_checkpoint``: AffinityNet's features; computed here, ``engine.learned_affinity``
holds the networks), from maps made elsewhere (``edges``: a
folder of <id>.npy in [0,1] at stride 4; ``features``: <id>.npy, C×⌈H/8⌉×⌈W/8⌉), or, without
either, from an image-gradient edge map / the image's colours (a weaker, training-free
substitute).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from wsss_fast.pipeline.errors import InputError, OptionsError
from wsss_fast.pipeline.job import (JobResult, JobSpec, item_path, run_dataset_job,
                                    validate_label_png, worker_work, write_outputs)
from wsss_fast.options import (device_name, positive_float, positive_int, probability,
                               worker_count)
from wsss_fast.pipeline.options import DatasetOptions, option, path_or_none, require


@dataclass
class RefineOptions(DatasetOptions):
    cams: Optional[str] = option(None, "folder of irn-format CAM files (<id>.npy)")
    out: Optional[str] = option(None, "output folder for <id>.png labels")
    preset: str = option("irn", choices=("irn", "psa"))
    edges: Optional[str] = option(None, "irn: folder of boundary maps <id>.npy (stride 4)")
    features: Optional[str] = option(None, "psa: folder of affinity features <id>.npy")
    irn_checkpoint: Optional[str] = option(
        None, "irn: a trained IRNet (train --method irn): its boundary maps (IRN's single-scale, "
        "padded, flip-averaged inference) instead of --edges or the image-gradient stand-in")
    pad_size: int = option(512, "learned networks: images are zero-padded to this square "
                           "side (IRN: 512; larger images to the next multiple of 16)",
                           check=positive_int)
    affinity_checkpoint: Optional[str] = option(None, "psa: a trained AffinityNet (train "
                                                "--method affinitynet); its features replace "
                                                "--features")
    beta: Optional[float] = option(None, "affinity power (default: the preset's)",
                                   check=positive_float)
    steps: Optional[int] = option(None, "random-walk steps (default 256)", check=positive_int)
    bg_threshold: Optional[float] = option(None, "irn: background plane (0.25)",
                                           check=probability)
    alpha: Optional[float] = option(None, "psa: background power (16)", check=positive_float)
    radius: Optional[int] = option(None, "radius of the walk's half disk of pair offsets "
                                   "(default 5)", check=positive_int)
    normalize: str = option("global", "irn: divide the walked maps by their max over all classes "
                            "(global, IRN) or each class by its own (class)",
                            choices=("global", "class"))
    boundary_fill: Optional[float] = option(
        None, "irn: after the walk, cells whose boundary probability is at least this take their "
        "nearest non-boundary cells' values (default: off, as IRN; for small images, where the "
        "stride-4 boundary cells are a large share of each object)", check=probability)
    keep_boundary_cams: bool = option(
        False, "irn: walk the CAMs themselves instead of IRN's cams·(1 − boundary), so boundary "
        "cells keep their CAM values (for small images)")
    upsample: int = option(
        1, "irn: walk on a grid this many times finer than the stride-4 CAMs (1, IRN; 2 or 4: "
        "CAMs and boundary map upsampled bilinearly first, --radius in fine cells; for small "
        "images)", choices=(1, 2, 4))
    crf: str = option("none", "irn: after the walk, IRN's label CRF over the walked labels (the "
                      "CRF of pseudo-label --rule constant --crf irn; default: none, as IRN)",
                      choices=("none", "irn"))
    save_scores: bool = option(
        False, "irn: also write the walked, normalized class maps (before the background plane) "
        "as CAM files OUT/scores/<id>.npy (mctformer format: the full-resolution maps only), for "
        "evaluate --cams (the background sweep) and pseudo-label (labels at a chosen threshold)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (under torchrun each rank takes "
                         "cuda:LOCAL_RANK)", group="runtime", check=device_name)
    workers: int = option(2, "worker processes for the walks on the CPU (0 = in the main "
                          "process)", group="runtime", check=worker_count)
    overwrite: bool = option(False, "redo every item and replace existing outputs (default: "
                             "resume, skipping finished items)", group="runtime")
    quiet: bool = option(False, "no progress bar", group="runtime")

    def __post_init__(self):
        super().__post_init__()
        for name in ("cams", "out", "edges", "features", "irn_checkpoint",
                     "affinity_checkpoint"):
            setattr(self, name, path_or_none(getattr(self, name)))


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(RefineOptions)}
# IRN-only options of the walk (refine_irn's keywords), with their defaults (upstream's:
# RefineOptions holds them).
IRN_OPTIONS = {name: _DEFAULTS[name]
               for name in ("normalize", "boundary_fill", "keep_boundary_cams", "upsample")}
# Every IRN-only option: the walk's and the label CRF after it.
IRN_ONLY_OPTIONS = {**IRN_OPTIONS, "crf": _DEFAULTS["crf"]}


def preset_options(options: RefineOptions) -> dict:
    """The random-walk preset's settings with the options given."""
    from wsss_fast.postprocess.random_walk import RANDOM_WALK_PRESETS
    settings = dataclasses.asdict(RANDOM_WALK_PRESETS[options.preset])
    for name in ("beta", "steps", "bg_threshold", "alpha", "radius"):
        value = getattr(options, name)
        if value is not None:
            if settings[name] is None:
                raise OptionsError(f"--{name.replace('_', '-')} does not apply to --preset "
                                   f"{options.preset}")
            settings[name] = value
    # IRN-only options; recorded only when set, so an upstream run's config stays as it was.
    for name, default in IRN_ONLY_OPTIONS.items():
        if getattr(options, name) != default:
            if options.preset != "irn":
                raise OptionsError(f"--{name.replace('_', '-')} applies to --preset irn only")
            settings[name] = getattr(options, name)
    if options.save_scores and options.preset != "irn":
        raise OptionsError("--save-scores applies to --preset irn only (PSA's walk includes its "
                           "background)")
    return settings


def learned_network(options: RefineOptions):
    """``(name, AffinityNetwork)`` of the learned affinity whose checkpoint option is set, or
    None; ``OptionsError`` if it does not feed ``--preset`` or competes with --edges /
    --features."""
    from wsss_fast.engine.learned_affinity import AFFINITY_NETWORKS
    given = [(name, entry) for name, entry in AFFINITY_NETWORKS.items()
             if getattr(options, entry.option, None) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise OptionsError("give one learned affinity checkpoint, got "
                           + ", ".join(e.flag for _, e in given))
    name, entry = given[0]
    flag = entry.flag
    if entry.walk != options.preset:
        raise OptionsError(f"{flag} feeds --preset {entry.walk}, not --preset {options.preset}")
    side = "edges" if entry.walk == "irn" else "features"
    if getattr(options, side) is not None:
        raise OptionsError(f"{flag} and --{side} exclude each other (both give the affinity)")
    return name, entry


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
               device: torch.device, side_input: Optional[np.ndarray] = None, *,
               with_scores: bool = False):
    """The label of one image; ``settings``: preset, its options, edges and features folders;
    ``side_input``: the boundary map (irn) / features (psa) a learned network made
    for this image, instead of the folders'. ``with_scores`` (irn): ``(label, (keys, scores))``,
    the walked, normalized ``(n, H, W)`` maps the label's background plane is set against."""
    from wsss_fast.io.cam_files import load_cam_file
    from wsss_fast.postprocess import random_walk as rw
    record = load_cam_file(cam_path)
    height, width = image.shape[:2]
    if record.keys.size == 0:
        empty = np.zeros((height, width), np.uint8)
        return (empty, (record.keys, np.zeros((0, height, width), np.float32))) if with_scores \
            else empty
    if record.high_res.shape[1:] != (height, width):
        raise ValueError(f"CAM size {record.high_res.shape[1:]} differs from the image size "
                         f"{(height, width)}")
    keys, options = record.keys, settings["options"]
    if settings["preset"] == "irn":
        if record.low_res is None:
            raise ValueError(f"{cam_path} has no stride-4 'cam' maps (write irn-format CAMs)")
        grid = record.low_res.shape[1:]
        if side_input is not None:
            edge = side_input
        elif settings["edges"]:
            edge = _load_side_input(settings["edges"], item, 2)
        else:
            edge = rw.image_edge_map(image, grid)
        if tuple(edge.shape) != tuple(grid):
            raise ValueError(f"boundary map of shape {tuple(edge.shape)} does not match the "
                             f"stride-4 CAM grid {tuple(grid)}")
        cams = torch.from_numpy(record.low_res).to(device)
        labels, scores = rw.refine_irn(
            cams, keys, torch.from_numpy(np.ascontiguousarray(edge)).to(device), (height, width),
            beta=options["beta"], steps=options["steps"], bg_threshold=options["bg_threshold"],
            radius=options["radius"], return_scores=True,
            **{name: options.get(name, default) for name, default in IRN_OPTIONS.items()})
        if options.get("crf", IRN_ONLY_OPTIONS["crf"]) != "none":
            from wsss_fast.postprocess.crf import crf_inference_label
            # The label space of the seed's CRF (postprocess.pseudo_label.crf_seed): background
            # and every class of the dataset.
            labels = crf_inference_label(image, labels.astype(np.int64),
                                         settings["num_classes"] + 1,
                                         options["crf"]).astype(np.uint8)
        return (labels, (keys, scores.cpu().numpy())) if with_scores else labels
    grid = (-(-height // 8), -(-width // 8))
    if side_input is not None:
        features = side_input
    elif settings["features"]:
        features = _load_side_input(settings["features"], item, 3)
    else:
        features = image_color_features(image, grid)
    cams = torch.from_numpy(record.high_res).to(device)
    return rw.refine_psa(cams, keys, torch.from_numpy(features).to(device),
                         alpha=options["alpha"], beta=options["beta"], steps=options["steps"],
                         radius=options["radius"])


def refine_job(item: str, image_path: str, cam_path: str, label_path: str, settings: dict,
               side_input: Optional[np.ndarray] = None):
    """One image (in a worker process on the CPU): read, walk, write atomically. Returns None or
    the reason the item was skipped."""
    from wsss_fast.data.images import ImageDecodeError, read_image, write_label_png
    from wsss_fast.io.cam_files import CamFileError, save_cam_file
    if not Path(cam_path).exists():
        return f"no CAM file {cam_path}"
    scores_path = settings.get("scores_path")
    try:
        image = read_image(image_path)
        label = refine_one(settings, item, image, Path(cam_path),
                           torch.device(settings["device"]), side_input,
                           with_scores=scores_path is not None)
    except (CamFileError, ImageDecodeError, ValueError) as error:
        return str(error)

    def publish():   # each file atomically; resume redoes an item missing either
        if scores_path is not None:
            keys, scores = label[1]
            save_cam_file(item_path(Path(scores_path), item, ".npy"), keys, scores,
                          fmt="mctformer")
        write_label_png(label_path, np.asarray(label[0] if scores_path else label, np.uint8))
    write_outputs(publish, label_path)
    return None


def validate_output(path) -> None:
    """Raises on an output of ``refine`` that cannot be read (resume's check): a label PNG or a
    scores CAM file."""
    from wsss_fast.io.cam_files import load_cam_file
    (load_cam_file if Path(path).suffix == ".npy" else validate_label_png)(path)


def refine(options: RefineOptions) -> JobResult:
    """Random-walk labels of the CAM files in ``options.cams`` into ``options.out/labels``."""
    require(options, "data", "cams", "out")
    walk = preset_options(options)
    network = learned_network(options)
    cams_dir, out = Path(options.cams), Path(options.out)
    if not cams_dir.is_dir():
        raise InputError(f"--cams {cams_dir}: not a folder")
    checkpoint = None
    if network is not None:
        flag = network[1].flag
        checkpoint = Path(getattr(options, network[1].option))
        if not checkpoint.is_file():
            raise InputError(f"{flag} {checkpoint}: no such file")
        if options.pad_size % 16:
            raise OptionsError(f"--pad-size {options.pad_size}: must be a multiple of 16 (the "
                               f"networks' stride)")
        from wsss_fast.engine.learned_affinity import read_network_state
        from wsss_fast.models.checkpoint import CheckpointError
        try:   # another network's checkpoint is refused before anything is written
            read_network_state(checkpoint, network[0], flag)
        except (CheckpointError, OSError) as error:
            raise InputError(str(error)) from error

    def outputs(item):
        paths = {"label": item_path(out / "labels", item, ".png")}
        if options.save_scores:
            paths["scores"] = item_path(out / "scores", item, ".npy")
        return paths

    def setup(dataset, context) -> JobSpec:
        config = {"preset": options.preset, **walk, "cams": str(cams_dir.resolve()),
                  "edges": options.edges, "features": options.features,
                  "dataset": dataset.name}
        if options.save_scores:   # recorded only when set: earlier runs keep their config
            config["save_scores"] = True
        side_input = None
        if network is not None:
            from wsss_fast.data.images import read_image
            from wsss_fast.io.checksums import file_checksum
            from wsss_fast.models.checkpoint import CheckpointError
            name, entry = network
            config.update(network=name, checkpoint=str(checkpoint.resolve()),
                          checkpoint_blake2b=file_checksum(checkpoint),
                          pad_size=options.pad_size)
            try:
                side_input = entry.load(str(checkpoint), context.device, options.pad_size)
            except (CheckpointError, OSError) as error:
                raise InputError(str(error)) from error
        settings = {"preset": options.preset, "options": walk, "edges": options.edges,
                    "features": options.features, "device": str(context.device),
                    "num_classes": len(dataset.class_names),
                    "scores_path": str(out / "scores") if options.save_scores else None}
        if hasattr(side_input, "batch"):   # images in chunks through the network, walked here
            from wsss_fast.pipeline.refine_psa import learned_batch_work
            work = learned_batch_work(refine_one, settings, dataset, cams_dir, outputs,
                                      side_input.batch, progress=not options.quiet,
                                      desc=f"refine[{context.rank}]")
            return JobSpec(config=config, outputs=outputs, work=work, validate=validate_output)

        def job_args(item):
            image_path = dataset.sample(item).image_path
            # The network runs here (batch of the image and its flip, on the run's device);
            # the walks in the worker processes.
            side = None if side_input is None else side_input(read_image(image_path))
            return (item, image_path, str(item_path(cams_dir, item, ".npy")),
                    str(outputs(item)["label"]), settings, side)

        # One walk runs on one thread (see csrc/cpu/random_walk.cpp): on the CPU, images are
        # walked in parallel worker processes; on a GPU, in this process.
        work = worker_work(
            refine_job, job_args,
            outputs, workers=options.workers if context.device.type == "cpu" else 0,
            progress=not options.quiet, desc=f"refine[{context.rank}]")
        return JobSpec(config=config, outputs=outputs, work=work, validate=validate_output)

    return run_dataset_job("refine", options, out, setup, device=options.device,
                           overwrite=options.overwrite)
