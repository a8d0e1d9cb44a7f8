"""Atomic file writes: data goes to a temporary file in the destination folder, which is renamed
over the final name only once complete, so a reader (or a resumed run) never sees a partial file.

Temporary names carry the host and process id (``.<name>.<host>-<pid>.tmp``) so that ranks of one
run never collide, and so that a resumed run can delete the leftovers of killed processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", fsync: bool = False) -> Iterator:
    """``with atomic_write(path) as f: f.write(...)`` publishes ``path`` only if the block
    completes; on an exception the temporary file is removed and ``path`` is untouched.
    ``fsync`` makes the data durable across power loss (not needed against killed processes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path)
    try:
        with open(temp, mode) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: PathLike, obj) -> None:
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def _pid_alive(pid: int) -> bool:
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
        if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
                removed += 1
    return removed
