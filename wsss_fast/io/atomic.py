"""Atomic file writes: data goes to a temporary file in the destination folder, which is renamed
over the final name only once complete, so a reader (or a resumed run) never sees a partial file.

Temporary names carry the host and process id (``.<name>.<host>-<pid>.tmp``) so that ranks of one
run never collide, and so that a resumed run can delete the leftovers of killed processes.

A full disk (ENOSPC) or an exceeded quota (EDQUOT) while writing raises ``DiskFull`` naming the
file, with the temporary file removed. ``atomic_write_group`` writes several files all or nothing
(a checkpoint and its training state).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"
_DISK_FULL = {errno.ENOSPC: "no space left on the device",
              errno.EDQUOT: "disk quota exceeded"}


class DiskFull(OSError):
    """The device (or the quota) filled up while writing ``filename``; nothing was published
    under that name and the temporary file is removed."""

    def __str__(self) -> str:
        return self.strerror


def _disk_full_errno(error: BaseException) -> Optional[int]:
    """ENOSPC/EDQUOT if ``error`` or an exception it was raised from is one: torch.save reports
    a failed write of its zip writer as a RuntimeError raised while handling the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def raise_if_disk_full(error: BaseException, path: PathLike, published: bool = False) -> None:
    """Raise ``DiskFull`` naming ``path`` if ``error`` comes from a full disk or quota;
    ``published=False`` says that nothing was written under that name."""
    code = _disk_full_errno(error)
    if code is not None:
        outcome = "" if published else "; the file was not written"
        raise DiskFull(code, f"{_DISK_FULL[code]} while writing {path}{outcome} (free some "
                             f"space and rerun)", os.fspath(path)) from None


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", fsync: bool = False) -> Iterator:
    """``with atomic_write(path) as f: f.write(...)`` publishes ``path`` only if the block
    completes; on an exception the temporary file is removed and ``path`` is untouched.
    ``fsync`` makes the data durable across power loss (not needed against killed processes)."""
    path = Path(path)
    temp = _temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, mode) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise_if_disk_full(error, path)
        raise


def atomic_write_group(contents: Mapping[PathLike, Union[bytes, Callable[[BinaryIO], None]]],
                       fsync: bool = False) -> None:
    """Write several files all or nothing: each value (bytes, or a function writing to a binary
    handle) goes to its temporary file first, and only when every one is complete are they
    renamed over their names, in the mapping's order. A failure while writing (a full disk, an
    exception in a writer) publishes none of them.

    The renames are not one atomic step: a process killed between two of them leaves a new file
    next to an old one. To tell such a torn pair, store one file's ``bytes_checksum`` in the
    other and compare it with ``file_checksum`` when reading them back.
    """
    temps: list[tuple[Path, Path]] = []
    path = None
    try:
        for path, content in contents.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append((_temp_path(path), path))
            with open(temps[-1][0], "wb") as handle:
                if callable(content):
                    content(handle)
                else:
                    handle.write(content)
                handle.flush()
                if fsync:
                    os.fsync(handle.fileno())
        for temp, path in temps:
            os.replace(temp, path)
    except BaseException as error:
        for temp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        if path is not None:
            raise_if_disk_full(error, path)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: PathLike, obj) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (EPERM: it does, owned by another
    user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: PathLike) -> int:
    """Delete temporary files left in ``folder`` (recursively) by killed processes of this host;
    those of live processes (other ranks) are kept. Returns how many were removed."""
    host = socket.gethostname()
    removed = 0
    for temp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        owner = temp.name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
                removed += 1
    return removed
