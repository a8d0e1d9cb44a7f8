"""Interrupts and process lifetime: SIGTERM/SIGINT as an exception, and workers that die with
their parent.

``handle_interrupts()`` turns SIGINT and SIGTERM into ``Interrupted`` in the main thread, so a
run unwinds through its ``finally`` blocks (worker pools terminated, locks released) and the
command line can print one line and exit with the shell's status for the signal (130, 143)::

    try:
        with handle_interrupts():
            return run(args)
    except Interrupted as stop:
        print(f"wsss-fast {command}: {stop}", file=sys.stderr)
        return stop.exit_status

``die_with_parent()``, called first thing in a worker process, asks Linux to SIGKILL the worker
when its parent dies, even by SIGKILL, when no cleanup code of the parent runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Iterator, Optional, Sequence

_PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal. A KeyboardInterrupt, so that ``except Exception`` around
    one item does not swallow it and libraries treat it as Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_status = 128 + signum   # what a shell reports for a process killed by it
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    def __str__(self) -> str:
        return self.args[0]


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


# Signals that arrived inside ``deferred_interrupts()`` blocks, raised when the outermost ends.
_deferral = threading.local()


def _raise_once(signals: Sequence[int]):
    """A handler raising ``Interrupted`` for the first signal only: later ones (a second Ctrl-C,
    torchrun forwarding a SIGTERM) must not interrupt the cleanup that the first one started.
    Inside ``deferred_interrupts()`` the signal is kept for the end of the block."""
    def handler(signum, frame) -> None:
        for other in signals:
            signal.signal(other, signal.SIG_IGN)
        if getattr(_deferral, "depth", 0):
            _deferral.pending = signum
            return
        _raise_interrupted(signum, frame)
    return handler


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A block that an interrupt must not cut in two (starting a worker process and registering
    it, so that it is stopped with the others): a signal arriving inside raises ``Interrupted``
    when the block ends."""
    _deferral.depth = getattr(_deferral, "depth", 0) + 1
    try:
        yield
    finally:
        _deferral.depth -= 1
        pending = getattr(_deferral, "pending", None)
        if not _deferral.depth and pending is not None:
            _deferral.pending = None
            raise Interrupted(pending)


@contextlib.contextmanager
def handle_interrupts(signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, the given signals raise ``Interrupted`` in the main thread; the previous
    handlers are restored afterwards. Outside the main thread (where Python cannot install
    handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _raise_once(tuple(signals))
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def die_with_parent(expected_parent: Optional[int] = None) -> bool:
    """Have this process SIGKILLed when its parent exits (Linux ``PR_SET_PDEATHSIG``). "Parent"
    is the thread that forked this process: fork workers from a thread that outlives them.

    If the parent already died before this call (the signal would never come), exit now:
    ``expected_parent`` is the parent's pid when the caller knows it (captured before forking),
    otherwise the parent seen on entry is compared with the one after the call.
    Returns False where the mechanism is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid() if expected_parent is None else expected_parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os._exit(1)   # orphaned already: nobody will collect this worker's results
    return True
