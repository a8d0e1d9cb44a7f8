"""The resumable dataset job, written once: ranks → dataset → RunState → shard → resume check
per item → work → journal → manifest → exit accounting.

A stage describes its job with a ``setup(dataset, context) -> JobSpec`` callable (the config
fingerprint, each item's outputs, how to validate an unjournaled output and the work over the
items left to do); ``run_dataset_job`` does the rest and returns a ``JobResult``.

Failures are isolated per item: an exception while computing one item skips it with its reason
(``item_failure``), and the run goes on to write its manifest. What stops a run is an error of
the run itself (``RUN_ERRORS``: a full disk, an output folder it cannot write, a held lock) and
interrupts (``Interrupted``, a ``KeyboardInterrupt``, so ``except Exception`` never swallows
it). The run's lock is held from the RunState's creation until its end, also on failure; on the
way out, temporary files of worker processes killed meanwhile are removed.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from wsss_fast.pipeline.options import DatasetOptions, open_dataset_of

Outputs = Callable[[str], "dict[str, Path]"]


def item_path(root: Path, item: str, suffix: str) -> Path:
    """``root/<id><suffix>``; ids of folder datasets may contain '/', giving subfolders."""
    return Path(root) / f"{item}{suffix}"


def validate_label_png(path) -> None:
    """Raises on a label PNG that cannot be read (resume's check of unjournaled outputs)."""
    from wsss_fast.data.images import read_label_png
    read_label_png(path)


@dataclass
class JobSpec:
    """What one stage does per item. ``work(todo, state)`` processes the ids not yet finished
    and journals each (``state.record_done`` / ``record_skipped``); it may return extra manifest
    entries. ``finished(state, item)`` replaces the default resume check (outputs complete)."""

    config: Mapping
    outputs: Outputs
    work: Callable[[list, Any], Optional[dict]]
    validate: Optional[Callable[[Path], None]] = None
    finished: Optional[Callable[[Any, str], bool]] = None
    timed: bool = False   # record the work's seconds as "<command>_seconds" in the manifest


@dataclass
class JobResult:
    """A finished dataset job. ``manifest`` is the merged manifest on rank 0 (None on the other
    ranks, which only know their own ``counts``)."""

    command: str
    out_dir: Path
    counts: dict
    manifest: Optional[dict] = None
    rank: int = 0
    world: int = 1
    skipped: list = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """Non-zero only when nothing could be done: items were skipped and none is finished
        (0 on ranks other than 0)."""
        if self.manifest is None:
            return 0
        return exit_status(self.manifest)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / f"manifest-{self.command}.json"


def exit_status(manifest: dict) -> int:
    counts = manifest["counts"]
    finished = counts.get("done", 0) + counts.get("already_done", 0)
    return 1 if counts.get("skipped", 0) and not finished else 0


def report_problems(dataset, state) -> None:
    """Items the dataset dropped while indexing go into the manifest as skipped."""
    for item, reason in dataset.problems():
        state.record_skipped(item, reason)


def run_errors() -> tuple:
    """Exception types that are errors of the whole run, never of one item: they stop it."""
    from wsss_fast.io.atomic import DiskFull
    from wsss_fast.io.locks import RunLocked
    from wsss_fast.io.run_state import OutputNotWritable
    return (DiskFull, OutputNotWritable, RunLocked)


def item_failure(error: BaseException) -> str:
    """The skip reason of an item whose computation raised ``error`` ("Type: message"; a
    ValueError, the library's way of describing a bad input, by its message alone). Re-raises
    the errors of the run itself (``run_errors``) and anything that is not an ``Exception``."""
    if not isinstance(error, Exception) or isinstance(error, run_errors()):
        raise error
    if isinstance(error, ValueError) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


def write_outputs(write: Callable[[], None], where) -> None:
    """Run ``write()``, which publishes an item's outputs; an OS error there is an error of the
    output folder (``OutputNotWritable``; a full disk stays ``DiskFull``), which stops the run
    instead of skipping the item, as it would fail the same way for every item."""
    from wsss_fast.io.atomic import DiskFull
    from wsss_fast.io.run_state import OutputNotWritable
    try:
        write()
    except DiskFull:
        raise
    except OSError as error:
        raise OutputNotWritable(f"cannot write {where}: {error.strerror or error}") from error


def record_job_result(state, item: str, result, outputs_of: Outputs) -> None:
    """Journal what a job returned for ``item``: None = done (its ``outputs_of(item)``
    written), a string or a ``JobFailure`` = skipped with that reason."""
    from wsss_fast.workers import JobFailure
    if isinstance(result, JobFailure):
        state.record_skipped(item, result.error)
    elif result is not None:
        state.record_skipped(item, result)
    else:
        outputs = outputs_of(item)
        missing = [str(path) for path in outputs.values() if not Path(path).exists()]
        if missing:
            state.record_skipped(item, f"the job wrote no {', '.join(missing)}")
        else:
            state.record_done(item, outputs)


def record_job_results(state, items: Sequence[str], results: Sequence, outputs_of: Outputs) -> None:
    """``record_job_result`` of every item."""
    for item, result in zip(items, results):
        record_job_result(state, item, result, outputs_of)


def worker_work(job: Callable, job_args: Callable[[str], tuple], outputs: Outputs, *,
                workers: int, progress: bool, desc: str) -> Callable:
    """A ``JobSpec.work`` that runs ``job(*job_args(item))`` per item in ``workers`` processes
    (``wsss_fast.workers.run_in_workers``); ``job`` returns None (done) or the reason to skip.
    Each item is journaled as soon as its job returns (an interrupted run keeps what it
    finished); an item whose arguments cannot be built is skipped; a job raising one of the
    ``run_errors`` stops the run."""
    from wsss_fast.workers import run_in_workers

    def work(todo: list, state) -> None:
        ready, jobs = [], []
        for item in todo:
            try:
                jobs.append(tuple(job_args(item)))
            except Exception as error:
                state.record_skipped(item, item_failure(error))
            else:
                ready.append(item)
        run_in_workers(job, jobs, workers=workers, progress=progress, desc=desc,
                       on_result=lambda index, result: record_job_result(
                           state, ready[index], result, outputs),
                       fatal=run_errors())
    return work


def _die_with_launcher() -> None:
    """Under torchrun, have this rank killed when the launcher dies (even by SIGKILL): a rank
    must not run on as an orphan, holding its GPU and its lock."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from wsss_fast.io.interrupts import die_with_parent
        die_with_parent()


def run_dataset_job(command: str, data: DatasetOptions, out_dir, setup: Callable, *,
                    device: Optional[str] = "cpu", overwrite: bool = False) -> JobResult:
    """Run ``command`` over the dataset of ``data`` into ``out_dir``, resumably and sharded
    over the torchrun ranks. ``setup(dataset, context) -> JobSpec`` builds the stage (model,
    writers) once the dataset is open and the rank's device is known."""
    from wsss_fast.distributed import close, init_ranks
    from wsss_fast.io.atomic import remove_stale_temps
    from wsss_fast.io.run_state import RunState

    out = Path(out_dir)
    _die_with_launcher()
    context = init_ranks(device)
    try:
        dataset = open_dataset_of(data)
        spec = setup(dataset, context)
        with RunState(out, command, spec.config, rank=context.rank, world=context.world,
                      overwrite=overwrite) as state:
            try:
                return _run_items(command, spec, state, dataset, context, out)
            finally:   # workers killed by an interrupt or a run error may leave temporary files
                with contextlib.suppress(OSError):
                    remove_stale_temps(out)
    finally:
        close(context)


def _run_items(command: str, spec: JobSpec, state, dataset, context, out: Path) -> JobResult:
    """Resume check, work, summary and (rank 0) manifest of one rank's share of the items."""
    from wsss_fast.distributed import barrier, shard
    if context.is_main:
        report_problems(dataset, state)
    ids = shard(dataset.ids, context.rank, context.world)
    state.counts["assigned"] = len(ids)
    todo = []
    for item in ids:
        if spec.finished is not None:
            done = spec.finished(state, item)
        else:
            done = state.is_finished(item, spec.outputs(item), validate=spec.validate)
        if done:
            state.counts["already_done"] += 1
        else:
            todo.append(item)
    start = time.perf_counter()
    extra = dict(spec.work(todo, state) or {})
    if spec.timed:
        extra[f"{command}_seconds"] = round(time.perf_counter() - start, 3)
    state.finish(extra)
    barrier(context)
    manifest = state.write_manifest() if context.is_main else None
    return JobResult(command=command, out_dir=out, counts=dict(state.counts),
                     manifest=manifest, rank=context.rank, world=context.world,
                     skipped=list(manifest["skipped"] if manifest else state.skipped))

