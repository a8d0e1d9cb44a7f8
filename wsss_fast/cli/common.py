"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

from tqdm import tqdm

DTYPES = ("fp32", "bf16", "fp16")


class UsageError(ValueError):
    """A problem with the command's arguments or inputs; reported without a traceback."""


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--data", metavar="ROOT", help="dataset root (VOC2012 folder, COCO root, "
                       "or a folder of images)")
    group.add_argument("--dataset", default="auto", choices=("auto", "voc", "coco", "folder"),
                       help="layout of --data (default: detected)")
    group.add_argument("--split", help="split name (VOC: ImageSets/Segmentation/<split>.txt; "
                       "COCO: train2014/val2014) or a path to a list file")
    group.add_argument("--labels", metavar="FILE", help="image-level labels: cls_labels.npy, "
                       "CSV or JSON (default: the dataset's own)")
    group.add_argument("--classes", metavar="FILE", help="class names, one per line "
                       "(default: the dataset's own)")


def add_runtime_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    group = parser.add_argument_group("runtime")
    if device:
        group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto "
                           "(default; under torchrun each rank takes cuda:LOCAL_RANK)")
    group.add_argument("--workers", type=int, default=2, help="worker processes for image "
                       "decoding / CRF (default 2; 0 = in the main process)")
    group.add_argument("--overwrite", action="store_true", help="redo every item and replace "
                       "existing outputs (default: resume, skipping finished items)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) in (None, "")]
    if missing:
        raise UsageError(f"missing required option(s): {', '.join(missing)}")


def open_dataset_from(args: argparse.Namespace):
    from wsss_fast.data.factory import open_dataset
    if not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data}: not a folder")
    return open_dataset(args.dataset, args.data, split=args.split, labels=args.labels,
                        classes=args.classes)


def progress(items: Iterable, total: Optional[int], desc: str, quiet: bool = False,
             rank: int = 0):
    return tqdm(items, total=total, desc=desc, unit="img", dynamic_ncols=True, position=rank,
                mininterval=1.0, disable=quiet, file=sys.stderr)


def item_path(root: Path, item: str, suffix: str) -> Path:
    """``root/<id><suffix>``; ids of folder datasets may contain '/', giving subfolders."""
    return root / f"{item}{suffix}"


def report_problems(dataset, state) -> None:
    """Items the dataset dropped while indexing go into the manifest as skipped."""
    for item, reason in dataset.problems():
        state.record_skipped(item, reason)


def print_summary(command: str, manifest: dict) -> None:
    counts = manifest["counts"]
    print(f"wsss-fast {command}: {counts.get('done', 0)} done, "
          f"{counts.get('already_done', 0)} already done, {counts.get('skipped', 0)} skipped",
          file=sys.stderr)
    for item in manifest["skipped"][:20]:
        print(f"  skipped {item['id']}: {item['reason']}", file=sys.stderr)
    if len(manifest["skipped"]) > 20:
        print(f"  ... {len(manifest['skipped']) - 20} more in the manifest", file=sys.stderr)


def exit_status(manifest: dict) -> int:
    """Non-zero only when nothing could be done: items were skipped and none is finished."""
    counts = manifest["counts"]
    finished = counts.get("done", 0) + counts.get("already_done", 0)
    return 1 if counts.get("skipped", 0) and not finished else 0


def record_job_results(state, items, results, outputs_of) -> None:
    """Journal what ``run_in_workers`` returned per item: None = done (its ``outputs_of(item)``
    written), a string or a ``JobFailure`` = skipped with that reason."""
    from wsss_fast.workers import JobFailure
    for item, result in zip(items, results):
        if isinstance(result, JobFailure):
            state.record_skipped(item, result.error)
        elif result is not None:
            state.record_skipped(item, result)
        else:
            state.record_done(item, outputs_of(item))


def finish_run(command: str, state, context, extra=None) -> int:
    """End a rank's run: its summary, the barrier, and on rank 0 the merged manifest, the printed
    summary and the exit status (other ranks return 0)."""
    from wsss_fast.distributed import barrier
    state.finish(extra)
    barrier(context)
    if not context.is_main:
        return 0
    manifest = state.write_manifest()
    print_summary(command, manifest)
    return exit_status(manifest)


def validate_label_png(path) -> None:
    """Raises on a label PNG that cannot be read (resume's check of unjournaled outputs)."""
    from wsss_fast.data.images import read_label_png
    read_label_png(path)
