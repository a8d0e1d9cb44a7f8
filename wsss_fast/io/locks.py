"""One run at a time per output folder, command and rank.

``RunLock(path)`` takes an exclusive ``flock`` on ``path`` for the life of a run and writes the
holder's pid and host into it, so that a second run is refused with ``RunLocked`` naming them.
The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed run never blocks
the next one. A lock still held although its recorded holder is dead on this host (a forked child
kept the descriptor) is broken by replacing the lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

from wsss_fast.io.atomic import pid_alive

PathLike = Union[str, os.PathLike]

# Locks held by this process, by path: a second RunLock on one of them (e.g. a retry in the same
# interpreter while a failed run's RunState is still referenced by a traceback) takes it over.
_HELD: dict[str, "RunLock"] = {}
# flock is not supported on every file system (some network/cluster mounts).
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunLocked(BlockingIOError):
    """Another live process holds the lock of this output folder, command and rank. An OSError
    (taking the lock would block), so command lines that report OSErrors in one line do so."""


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_dead(holder: dict) -> bool:
    pid = holder.get("pid")
    return (holder.get("host") == socket.gethostname() and isinstance(pid, int)
            and pid != os.getpid() and not pid_alive(pid))


class RunLock:
    """An exclusive lock on ``path`` (created with its folder), taken at construction and
    released by ``release()`` (or leaving a ``with`` block); ``what`` describes the run in the
    refusal message."""

    def __init__(self, path: PathLike, what: Optional[str] = None):
        self.path = Path(path)
        self.what = what or f"run ({self.path.name})"
        self._fd: Optional[int] = None
        key = os.path.realpath(self.path)
        previous = _HELD.pop(key, None)
        if previous is not None:
            previous.release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = self._acquire()
        _HELD[key] = self

    def _acquire(self) -> int:
        for _ in range(5):   # retried only when another process replaced the file meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if _holder_dead(holder):
                    self._break(fd)
                    os.close(fd)
                    continue
                os.close(fd)
                raise RunLocked(self._refusal(holder)) from None
            except OSError as error:
                if error.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                holder = _read_holder(fd)   # no flock here: the recorded pid is all we have
                if holder and holder.get("pid") != os.getpid() and not _holder_dead(holder):
                    os.close(fd)
                    raise RunLocked(self._refusal(holder)) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:   # broken and replaced by another process after our open()
                os.close(fd)
                continue
            holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode(), 0)
            return fd
        raise RunLocked(f"{self.what}: could not take the lock {self.path} (it keeps being "
                        f"replaced by other processes)")

    def _break(self, fd: int) -> None:
        """Unlink the lock file if it is still the one ``fd`` refers to: later runs lock a new
        file, and the orphan that holds the old one keeps a lock on nothing."""
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)

    def _refusal(self, holder: dict) -> str:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
               + (f", since {holder['since']}" if holder.get("since") else ""))
        return (f"{self.what} is already running ({who}; lock {self.path}); wait for it to "
                f"finish or use another output folder")

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (the file stays: unlinking it could let two runs lock different
        files). Safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(os.path.realpath(self.path), None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)   # closing drops the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
