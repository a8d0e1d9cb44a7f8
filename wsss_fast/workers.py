"""Many independent per-image jobs (CRFs, random walks) over worker processes, and a graph of
dependent tasks (the demo's rows, ``run_task_graph``).

Both are CPU-bound and single-threaded per image (pydensecrf holds the GIL; one random walk runs
on one thread), so throughput comes from processes, each running whole images. Workers never
outlive the run: they are killed when it stops on an exception (``Interrupted`` included), and
Linux kills them when the program dies without cleanup (SIGKILL; ``die_with_parent``). They
ignore SIGINT: a Ctrl-C reaches the whole process group, and the parent, which handles it, stops
them (a worker would otherwise print a KeyboardInterrupt traceback of its own).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from wsss_fast.io.interrupts import deferred_interrupts, die_with_parent


@dataclass(frozen=True)
class JobFailure:
    """Stands in, in ``run_in_workers``'s result list, for a job that raised or whose worker
    process died: ``index`` of the job, ``error`` as ``"Type: message"``, and the traceback."""

    index: int
    error: str
    traceback: str


def _run_job(function: Callable, index: int, args: tuple, fatal: tuple = ()) -> Any:
    try:
        return function(*args)
    except fatal:
        raise   # an error of the whole run (e.g. a full disk): re-raised in the parent
    except Exception as exc:  # reported per job; the run goes on
        return JobFailure(index, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _process_pool(workers: int, function: Callable) -> ProcessPoolExecutor:
    # forkserver, not fork: forking a parent that has run torch (OpenMP / intra-op thread pools)
    # can deadlock the child. Spawn is safe too but every worker of every pool re-imports
    # torch and pydensecrf (measured 1.8 s per pool on 2 cores with wsss_fast imported); the fork
    # server imports the preloaded modules once per program and then forks ready workers (a
    # second pool started in 0.03 s). The server never runs torch ops, so forking it is safe.
    # The preload only applies if this program has not started its fork server yet.
    context = multiprocessing.get_context("forkserver")
    preload = ["__main__", __name__, getattr(function, "__module__", None)]
    context.set_forkserver_preload([name for name in preload if name])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_init_worker)


def _init_worker() -> None:
    """Workers are children of the fork server, which exits when the last holder of its "alive"
    pipe does; their parent-death signal then kills them, even in the middle of a job. The server
    hands each worker a copy of that pipe (for nested process creation, not used here), which
    would keep the server, and so the worker, alive after this program dies: close it."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from multiprocessing import forkserver
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass
        server._forkserver_alive_fd = None


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Stop the pool's workers now, running jobs included (``shutdown`` alone waits for them).
    ``_processes`` is private; Python 3.14's ``terminate_workers`` does the same."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            process.kill()
        except (OSError, ValueError):   # already exited / already closed
            pass


def run_in_workers(function: Callable, jobs: Iterable[tuple], workers: int = 0,
                   progress: bool = True, desc: str | None = None, *,
                   on_result: Optional[Callable[[int, Any], None]] = None,
                   fatal: tuple = ()) -> list:
    """``[function(*args) for args in jobs]`` over ``workers`` processes, in the jobs' order.

    A job that raises (or whose worker dies) yields a ``JobFailure`` in its place instead of
    stopping the others, except for exceptions of the types in ``fatal``: those stop every job
    and are raised here. ``on_result(index, result)`` is called in this process as each job
    finishes (in completion order), e.g. to journal it at once rather than at the end.
    ``workers=0`` runs in this process with the same semantics. With
    workers, ``function`` and the arguments must be picklable (a module-level function) and at
    most ``4 * workers`` jobs are in flight, so ``jobs`` may be a lazy iterable (e.g. loading the
    CAMs per image). ``progress`` shows a tqdm bar.
    """
    if not callable(function):
        raise ValueError(f"run_in_workers: function must be callable, got {function!r}")
    if workers < 0:
        raise ValueError(f"run_in_workers: workers must be >= 0, got {workers}")
    from tqdm import tqdm

    total = len(jobs) if hasattr(jobs, "__len__") else None
    bar = tqdm(total=total, desc=desc, disable=not progress)
    results: dict[int, Any] = {}
    fatal = tuple(fatal)

    def record(index: int, result: Any) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)
        bar.update()

    try:
        if workers == 0:
            for index, args in enumerate(jobs):
                record(index, _run_job(function, index, tuple(args), fatal))
        else:
            _run_pooled(function, enumerate(jobs), workers, record, fatal)
    finally:
        bar.close()
    return [results[index] for index in range(len(results))]


def _run_pooled(function: Callable, jobs, workers: int, record: Callable, fatal: tuple) -> None:
    # Creating the pool and submitting (which starts worker processes on demand) run with
    # interrupts deferred: a signal between a worker's start and its registration in the pool
    # would leave it out of _kill_workers, to die later with a traceback of its own.
    pool = None
    in_flight: dict = {}

    def collect(done) -> bool:
        """Record finished jobs; True if the pool broke (a worker died)."""
        broken = False
        for future in done:
            index = in_flight.pop(future)
            try:
                result = future.result()
            except fatal:
                raise
            except BrokenProcessPool as exc:
                # Every job in flight when a worker dies (e.g. a segfault in native code) fails
                # with it; a fresh pool runs the rest.
                result = JobFailure(index, f"BrokenProcessPool: {exc}", "")
                broken = True
            except Exception as exc:  # e.g. arguments or a result that do not pickle
                result = JobFailure(index, f"{type(exc).__name__}: {exc}",
                                    traceback.format_exc())
            record(index, result)
        return broken

    def renewed(pool: ProcessPoolExecutor) -> ProcessPoolExecutor:
        pool.shutdown(wait=True, cancel_futures=True)
        with deferred_interrupts():
            return _process_pool(workers, function)

    def submit(index: int, args) -> Any:
        with deferred_interrupts():
            return pool.submit(_run_job, function, index, tuple(args), fatal)

    completed = False
    try:
        with deferred_interrupts():
            pool = _process_pool(workers, function)
        for index, args in jobs:
            while len(in_flight) >= 4 * workers:
                if collect(wait(in_flight, return_when=FIRST_COMPLETED).done):
                    pool = renewed(pool)
            try:
                future = submit(index, args)
            except BrokenProcessPool:  # broke since the last collect
                pool = renewed(pool)
                future = submit(index, args)
            in_flight[future] = index
        while in_flight:
            if collect(wait(in_flight, return_when=FIRST_COMPLETED).done):
                pool = renewed(pool)
        completed = True
    finally:
        if pool is not None:
            if not completed:   # an exception or an interrupt: nobody will collect the results
                _kill_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)


def run_task_graph(function: Callable, tasks: Sequence[tuple[str, tuple, Iterable[str]]],
                   workers: int = 0, *,
                   on_result: Optional[Callable[[str, Any], None]] = None) -> dict:
    """``{name: function(*args, inputs)}`` for ``tasks`` of ``(name, args, names it depends
    on)``, where ``inputs`` is ``{dependency: its result}``: each task starts once all its
    dependencies have finished, over ``workers`` processes (0: one after another in this
    process). Among ready tasks the earlier listed starts first, so list the tasks that
    unblock others early.

    Unlike ``run_in_workers`` the tasks are not independent, so the first one that raises
    stops the run: the tasks still running are killed (their workers too) and its exception
    is raised here; a dead worker raises ``BrokenProcessPool``. ``on_result(name, result)``
    is called in this process as each task finishes.
    """
    if not callable(function):
        raise ValueError(f"run_task_graph: function must be callable, got {function!r}")
    if workers < 0:
        raise ValueError(f"run_task_graph: workers must be >= 0, got {workers}")
    names = [name for name, _, _ in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"run_task_graph: task names repeat in {names}")
    needs = {name: set(depends) for name, _, depends in tasks}
    arguments = {name: tuple(args) for name, args, _ in tasks}
    for name, depends in needs.items():
        if not depends <= set(names):
            raise ValueError(f"run_task_graph: task {name!r} depends on unknown "
                             f"{sorted(depends - set(names))}")
    results: dict[str, Any] = {}
    pending = list(names)

    def take_ready(limit: int) -> list:
        ready = [name for name in pending if needs[name] <= results.keys()][:limit]
        for name in ready:
            pending.remove(name)
        return ready

    def call_args(name: str) -> tuple:
        return (*arguments[name], {d: results[d] for d in sorted(needs[name])})

    def record(name: str, result: Any) -> None:
        results[name] = result
        if on_result is not None:
            on_result(name, result)

    def cycle() -> ValueError:
        return ValueError(f"run_task_graph: tasks {pending} depend on each other")

    if workers == 0:
        while pending:
            ready = take_ready(1)
            if not ready:
                raise cycle()
            record(ready[0], function(*call_args(ready[0])))
        return results
    pool = None
    running: dict = {}
    completed = False
    try:
        with deferred_interrupts():
            pool = _process_pool(workers, function)
        while pending or running:
            for name in take_ready(workers - len(running)):
                with deferred_interrupts():   # see _run_pooled
                    running[pool.submit(function, *call_args(name))] = name
            if not running:
                raise cycle()
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                record(running.pop(future), future.result())
        completed = True
    finally:
        if pool is not None:
            if not completed:   # a failed task or an interrupt: stop the others now
                _kill_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)
    return results
