"""``extract``: CAMs of a dataset (multi-scale, flipped, resumable, sharded under torchrun).

Writes one CAM file per image into OUT/cams/ (IRN's {keys, cam, high_res} dict by default, or
MCTformer's {class: map}), optional JET overlays into OUT/overlays/, and OUT/manifest-extract.json.
Images that cannot be used (unreadable, no image-level labels, too small for the model) are
skipped and listed in the manifest; they do not stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from wsss_fast.pipeline.errors import InputError, OptionsError
from wsss_fast.pipeline.job import JobResult, JobSpec, item_path, run_dataset_job
from wsss_fast.options import Number, device_name, positive_float, positive_int, worker_count
from wsss_fast.pipeline.options import (DTYPES, DatasetOptions, option, parse_key_values,
                                        path_or_none, require)

METHODS = ("cam", "lpcam")
FORMATS = ("irn", "mctformer")
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# A scale multiplies the image's sides; far beyond the presets' 0.5-2.0 it only exhausts memory.
SCALE = Number(minimum=0, above_minimum=True, maximum=10)


@dataclass
class ExtractOptions(DatasetOptions):
    model: Optional[str] = option(None, "registered model name (mctformer_v1, mctformer_v2, "
                                  "mctformer_plus, transcam, token_cam)", group="model and method")
    checkpoint: Optional[str] = option(None, "weights (architecture read from them)",
                                       group="model and method")
    model_args: dict = option(help="architecture argument not readable from the weights, e.g. "
                              "num_heads=2 (repeatable)", flag="--model-arg", repeat=True,
                              metavar="KEY=VALUE", group="model and method",
                              default_factory=dict)
    random_init: bool = option(False, "run without a checkpoint (benchmarks and smoke tests "
                               "only)", group="model and method")
    preset: Optional[str] = option(None, "CAM preset (default: the model's own)",
                                   group="model and method")
    method: str = option("cam", "cam: the preset's CAMs (default); lpcam: LPCAM prototype "
                         "heatmaps of an IRN CAM classifier (needs --prototypes)",
                         choices=METHODS, group="model and method")
    prototypes: Optional[str] = option(None, "LPCAM prototypes of this checkpoint (wsss-fast "
                                       "prototypes)", metavar="FILE", group="model and method")
    preset_args: dict = option(help="override a preset field (YAML value), e.g. "
                               "square_sizes=[128,256] or 'cam_kwargs={cls_layers: 4, refine: "
                               "false}' (repeatable)", flag="--preset-arg", repeat=True,
                               metavar="FIELD=VALUE", group="model and method",
                               default_factory=dict)
    scales: Optional[tuple[float, ...]] = option(None, "override the preset's scales",
                                                 group="model and method", check=SCALE)
    flip: bool = option(True, "no flipped passes", group="model and method")
    dtype: str = option("fp32", "autocast dtype of the forward", choices=DTYPES,
                        group="model and method")
    max_affinity_mib: Optional[float] = option(None, "refine by streaming when a pass's dense "
                                               "affinity exceeds this",
                                               group="model and method", check=positive_float)
    max_memory_mib: Optional[float] = option(None, "memory budget of one forward pass: passes "
                                             "over it refine by streaming, images still over it "
                                             "are skipped (default: half the available RAM, "
                                             "90%% of the free GPU memory)",
                                             group="model and method", check=positive_float)
    batch_size: int = option(1, "images per forward (images of one size are batched)",
                             group="model and method", check=positive_int)
    out: Optional[str] = option(None, "output folder", group="output")
    format: str = option("irn", "CAM file format (irn: {keys, cam, high_res})", choices=FORMATS,
                         group="output")
    fp16: bool = option(False, "store maps as float16", group="output")
    overlays: bool = option(False, "also write a JET overlay PNG per present class",
                            group="output")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (under torchrun each rank takes "
                         "cuda:LOCAL_RANK)", group="runtime", check=device_name)
    workers: int = option(2, "worker processes for image decoding (0 = in the main process)",
                          group="runtime", check=worker_count)
    overwrite: bool = option(False, "redo every item and replace existing outputs (default: "
                             "resume, skipping finished items)", group="runtime")
    quiet: bool = option(False, "no progress bar", group="runtime")

    def __post_init__(self):
        super().__post_init__()
        self.model_args = parse_key_values(self.model_args, "--model-arg")
        self.preset_args = parse_key_values(self.preset_args, "--preset-arg")
        self.checkpoint, self.prototypes = map(path_or_none, (self.checkpoint, self.prototypes))
        self.out = path_or_none(self.out)


def check_option_combinations(options: ExtractOptions) -> None:
    """Rules between options, checked with the values before the dataset is opened."""
    if options.checkpoint is None and not options.random_init:
        raise OptionsError("--checkpoint is required (or --random-init for a smoke test)")
    if options.method == "lpcam":
        if options.prototypes is None:
            raise OptionsError("--method lpcam needs --prototypes FILE (see wsss-fast prototypes)")
        if options.preset is not None:
            raise OptionsError("--preset does not apply to --method lpcam (its passes are fixed: "
                               "use --scales / --no-flip)")


def build_engine(options: ExtractOptions, dataset, device):
    """The CAM engine of ``options`` (a ``CamEngine``, or an ``LpcamEngine`` for lpcam)."""
    from wsss_fast.engine import CamEngine
    from wsss_fast.models.registry import model_preset
    torch.manual_seed(0)   # --random-init: the same weights on every rank
    model = load_model(options.model, len(dataset.class_names), options.checkpoint,
                       options.model_args)
    overrides = {name: tuple(value) if isinstance(value, list) else value
                 for name, value in options.preset_args.items()}
    if options.scales:
        overrides["scales"] = tuple(options.scales)
    if not options.flip:
        overrides["flip"] = False
    dtype = _AUTOCAST[options.dtype]
    if options.method == "lpcam":
        from wsss_fast.engine.lpcam import LpcamEngine
        return LpcamEngine(model, lpcam_prototypes(options, dataset), device=device,
                           dtype=dtype, max_memory_mib=options.max_memory_mib, **overrides)
    return CamEngine(model, options.preset or model_preset(options.model), device=device,
                     dtype=dtype, max_affinity_mib=options.max_affinity_mib,
                     max_memory_mib=options.max_memory_mib, **overrides)


def load_model(name: str, num_classes: int, checkpoint: Optional[str], model_args: dict):
    """``create_model`` with an unreadable checkpoint reported as an ``InputError`` whose
    ``__cause__`` is the OS error."""
    from wsss_fast.models.registry import create_model
    try:
        return create_model(name, num_classes=num_classes, checkpoint=checkpoint, **model_args)
    except OSError as error:
        message = f"--checkpoint {checkpoint}: {error.strerror}" if error.strerror else str(error)
        raise InputError(message) from error


def lpcam_prototypes(options: ExtractOptions, dataset):
    """The prototypes of method lpcam, checked against the checkpoint and the classes."""
    from wsss_fast.engine.lpcam import Prototypes
    from wsss_fast.io.run_state import file_digest
    prototypes = Prototypes.load(options.prototypes)
    built_from = prototypes.checkpoint_sha256
    if built_from is not None and (options.checkpoint is None
                                   or file_digest(options.checkpoint) != built_from):
        raise InputError(f"--prototypes {options.prototypes} was built from another checkpoint "
                         f"(sha256 {built_from[:12]}…) than --checkpoint {options.checkpoint}")
    if tuple(prototypes.class_names) != tuple(dataset.class_names):
        raise InputError(f"--prototypes {options.prototypes} holds the classes "
                         f"{list(prototypes.class_names)}, the dataset has "
                         f"{list(dataset.class_names)}")
    return prototypes


def _config(options: ExtractOptions, engine, dataset) -> dict:
    from wsss_fast.io.run_state import file_digest
    method = {} if options.method == "cam" else {
        "method": options.method, "prototypes": str(Path(options.prototypes).resolve()),
        "prototypes_sha256": file_digest(options.prototypes)}
    checkpoint = options.checkpoint
    return {
        "model": options.model, "model_args": dict(options.model_args),
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "checkpoint_sha256": None if checkpoint is None else file_digest(checkpoint),
        "preset": vars(engine.preset), "dtype": options.dtype, "format": options.format,
        "fp16": options.fp16, "overlays": options.overlays, "dataset": dataset.name,
        "classes": list(dataset.class_names), **method,
    }


class CamWriter:
    """Writes one image's CAM file (and overlays) and journals them."""

    def __init__(self, options: ExtractOptions, out: Path, class_names):
        self.options, self.out, self.class_names = options, out, class_names

    def outputs(self, item: str, keys=()) -> dict[str, Path]:
        outputs = {"cam": item_path(self.out / "cams", item, ".npy")}
        if self.options.overlays:
            for k in keys:
                outputs[f"overlay_{k}"] = item_path(self.out / "overlays", item,
                                                    f"_{self.class_names[k]}.png")
        return outputs

    def write(self, state, item: str, image: np.ndarray, keys, high_res, low_res) -> None:
        from wsss_fast.io.cam_files import save_cam_file
        from wsss_fast.io.overlays import jet_overlay, save_rgb_png
        from wsss_fast.pipeline.job import write_outputs
        outputs = self.outputs(item, keys)

        def publish():
            save_cam_file(outputs["cam"], keys, high_res, low_res, fmt=self.options.format,
                          fp16=self.options.fp16)
            for i, k in enumerate(keys if self.options.overlays else ()):
                save_rgb_png(outputs[f"overlay_{k}"], jet_overlay(image, high_res[i]))
        write_outputs(publish, outputs["cam"])
        state.record_done(item, outputs)

    def write_or_skip(self, state, item: str, image: np.ndarray, keys, high_res,
                      low_res) -> None:
        """``write``, or journal ``item`` as skipped if its maps cannot be written (NaN or inf
        values: checked before anything is written). Errors of the output folder stop the run."""
        from wsss_fast.io.cam_files import check_finite_cams
        from wsss_fast.pipeline.job import item_failure
        try:
            check_finite_cams(f"CAMs of {item}", high_res=high_res, low_res=low_res)
            self.write(state, item, image, keys, high_res, low_res)
        except Exception as error:
            state.record_skipped(item, item_failure(error))

    def finished(self, state, item: str) -> bool:
        """Resume check; with overlays their names depend on the keys stored in the CAM file."""
        from wsss_fast.io.cam_files import CamFileError, load_cam_file
        if not self.options.overlays:
            return state.is_finished(item, self.outputs(item), validate=load_cam_file)
        cam_path = self.outputs(item)["cam"]
        if not cam_path.exists():
            return False
        try:
            keys = load_cam_file(cam_path).keys
        except CamFileError:
            cam_path.unlink()
            return False
        return state.is_finished(item, self.outputs(item, keys))


def _extract_batch(engine, batch, writer: CamWriter, state) -> None:
    """CAMs of a batch. A failure (an image too small for the model or too large for the memory
    budget, an error in the model) is isolated to its image by retrying the batch one image at a
    time; the image is then skipped with the reason. Non-finite CAMs are skipped, never written."""
    from wsss_fast.pipeline.job import item_failure
    try:
        results = engine.extract([it["image"] for it in batch], [it["labels"] for it in batch])
    except Exception as error:
        reason = item_failure(error)
        if len(batch) > 1:
            for item in batch:
                _extract_batch(engine, [item], writer, state)
        else:
            state.record_skipped(batch[0]["id"], reason)
        return
    for item, result in zip(batch, results):
        keys = torch.as_tensor(result.keys, dtype=torch.long)
        high_res = result.high_res[keys.to(result.high_res.device)].cpu().numpy()
        low_res = result.low_res[keys.to(result.low_res.device)].cpu().numpy()
        writer.write_or_skip(state, item["id"], item["image"], result.keys, high_res, low_res)


def _shutdown_loader(iterator) -> None:
    """Stop and join a DataLoader iterator's worker processes now (on an interrupt or an error,
    the iterator may otherwise live on in the traceback, its workers with it)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def extract(options: ExtractOptions) -> JobResult:
    """Extract the CAMs of ``options``' dataset into ``options.out``; rerunning resumes."""
    from wsss_fast.data.loader import image_loader
    from wsss_fast.io.interrupts import deferred_interrupts
    from wsss_fast.pipeline.progress import progress
    require(options, "data", "model", "out")
    check_option_combinations(options)
    out = Path(options.out)

    def setup(dataset, context) -> JobSpec:
        engine = build_engine(options, dataset, context.device)
        writer = CamWriter(options, out, dataset.class_names)

        def work(todo, state):
            with deferred_interrupts():   # its workers start and are registered together
                loader = iter(image_loader(dataset, todo, workers=options.workers))
            try:
                _extract_items(loader, len(todo), state, context.rank)
            finally:
                _shutdown_loader(loader)

        def _extract_items(loader, total, state, rank):
            batch = []
            bar = progress(loader, total, f"extract[{rank}]", options.quiet, rank)
            for item in bar:
                if item["error"] is not None:
                    state.record_skipped(item["id"], item["error"])
                elif item["labels"] is None:
                    state.record_skipped(item["id"], "no image-level labels for this id")
                elif not np.any(np.asarray(item["labels"]) > 0):
                    # IRN's convention: no positive class -> an empty CAM (all background).
                    height, width = item["image"].shape[:2]
                    writer.write_or_skip(
                        state, item["id"], item["image"], np.zeros(0, np.int64),
                        np.zeros((0, height, width), np.float32),
                        np.zeros((0, -(-height // 4), -(-width // 4)), np.float32))
                else:
                    batch.append(item)
                    if len(batch) == options.batch_size:
                        _extract_batch(engine, batch, writer, state)
                        batch = []
            if batch:
                _extract_batch(engine, batch, writer, state)

        return JobSpec(config=_config(options, engine, dataset), outputs=writer.outputs,
                       work=work, finished=writer.finished, timed=True)

    return run_dataset_job("extract", options, out, setup, device=options.device,
                           overwrite=options.overwrite)
