"""Resumable runs: a per-rank journal of finished items and a manifest per command.

An item is finished when all its output files exist with the sizes the journal recorded; outputs
that exist without a journal entry (the process died between publishing and journaling) are
checked by a validator and adopted or redone. Outputs are published atomically, so a killed run
never leaves a partial file under a final name; a truncated file from elsewhere fails the size or
validator check and is redone. The manifest (``manifest-<command>.json``) records the config,
library versions, counts and every skipped item with its reason. A different config in an existing
output folder is refused unless ``overwrite`` (Spark's "error" save mode by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from wsss_fast.io.atomic import atomic_write_json, remove_stale_temps

STATE_DIR = ".wsss-fast"


class OutputNotWritable(OSError):
    """The output folder cannot be created or written."""


class ConfigConflict(RuntimeError):
    """The output folder holds results of a different configuration."""


def library_versions() -> dict:
    import numpy
    import torch

    import wsss_fast
    return {"wsss_fast": wsss_fast.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}


def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file (checkpoints go into the config fingerprint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputNotWritable(f"cannot write to the output folder {folder}: "
                                f"{error.strerror or error}") from None


class RunState:
    def __init__(self, out_dir, command: str, config: Mapping, *, rank: int = 0, world: int = 1,
                 overwrite: bool = False):
        """``config`` must be JSON-serializable; all of it is the fingerprint that a later run in
        the same folder must match."""
        self.out_dir = Path(out_dir)
        self.command = command
        self.config = json.loads(json.dumps(dict(config), default=str))
        self.rank, self.world = rank, world
        self.started = time.time()
        self.state_dir = self.out_dir / STATE_DIR
        check_writable(self.out_dir)
        self.state_dir.mkdir(exist_ok=True)
        self.fresh = overwrite   # redo every item, replacing existing outputs
        self._check_config()
        self.done = {} if self.fresh else self._read_journals()
        remove_stale_temps(self.out_dir)
        self.counts = {"assigned": 0, "done": 0, "already_done": 0, "skipped": 0}
        self.skipped: list[dict] = []
        self._skipped_ids: set[str] = set()
        self._journal = open(self.state_dir / f"{command}.rank{rank}.jsonl", "a")

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / f"manifest-{self.command}.json"

    def _check_config(self) -> None:
        fingerprint = self.state_dir / f"{self.command}.config.json"
        if fingerprint.exists() and not self.fresh:
            previous = json.loads(fingerprint.read_text())
            if previous != self.config:
                changed = sorted(k for k in set(previous) | set(self.config)
                                 if previous.get(k) != self.config.get(k))
                raise ConfigConflict(
                    f"{self.out_dir} holds `{self.command}` results of another configuration "
                    f"(differs in: {', '.join(changed)}); use another folder or --overwrite")
        if self.rank == 0:
            if self.fresh:
                for journal in self.state_dir.glob(f"{self.command}.rank*.jsonl"):
                    journal.unlink()
            atomic_write_json(fingerprint, self.config)

    def _read_journals(self) -> dict[str, dict]:
        done: dict[str, dict] = {}
        for journal in sorted(self.state_dir.glob(f"{self.command}.rank*.jsonl")):
            with open(journal) as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                        done[entry["id"]] = entry["outputs"]
                    except (ValueError, KeyError, TypeError):
                        continue   # a line torn by a killed process: that item is re-checked
        return done

    def is_finished(self, item: str, outputs: Mapping[str, Path],
                    validate: Optional[Callable[[Path], None]] = None) -> bool:
        """True if ``item``'s outputs are complete (journaled with matching sizes, or present and
        accepted by ``validate``, which raises on a bad file). Bad files are removed."""
        if self.fresh:
            return False
        recorded = self.done.get(item)
        if recorded is not None and set(recorded) == set(outputs) and all(
                p.exists() and p.stat().st_size == recorded[name] for name, p in outputs.items()):
            return True
        if not all(p.exists() for p in outputs.values()):
            return False
        try:
            for path in outputs.values():
                if validate is not None:
                    validate(path)
        except (OSError, ValueError):
            for path in outputs.values():
                path.unlink(missing_ok=True)
            return False
        self.record_done(item, outputs, count=False)
        return True

    def record_done(self, item: str, outputs: Mapping[str, Path], count: bool = True) -> None:
        sizes = {name: p.stat().st_size for name, p in outputs.items()}
        self._journal.write(json.dumps({"id": item, "outputs": sizes}) + "\n")
        self._journal.flush()
        self.done[item] = sizes
        if count:
            self.counts["done"] += 1

    def record_skipped(self, item: str, reason: str) -> None:
        """``item`` could not be done; listed in the manifest (once per id)."""
        if item in self._skipped_ids:
            return
        self._skipped_ids.add(item)
        self.counts["skipped"] += 1
        self.skipped.append({"id": item, "reason": reason})

    def finish(self, extra: Optional[Mapping] = None) -> dict:
        """Write this rank's summary; returns it."""
        self._journal.close()
        summary = {"rank": self.rank, "world": self.world, "host": socket.gethostname(),
                   "seconds": round(time.time() - self.started, 3), "counts": self.counts,
                   "skipped": self.skipped, **(extra or {})}
        atomic_write_json(self.state_dir / f"{self.command}.rank{self.rank}.summary.json",
                          summary)
        return summary

    def write_manifest(self, extra: Optional[Mapping] = None) -> dict:
        """Merge the summaries of all ranks of this world into the manifest (call on rank 0 after
        every rank finished)."""
        ranks = []
        for rank in range(self.world):
            path = self.state_dir / f"{self.command}.rank{rank}.summary.json"
            if path.exists():
                ranks.append(json.loads(path.read_text()))
        counts = {key: sum(r["counts"].get(key, 0) for r in ranks) for key in self.counts}
        skipped = {}   # one entry per id (rank 0 also reports the dataset's indexing problems)
        for entry in (item for r in ranks for item in r["skipped"]):
            skipped.setdefault(entry["id"], entry)
        counts["skipped"] = len(skipped)
        manifest = {
            "command": self.command, "config": self.config, "versions": library_versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world": self.world,
            "counts": counts, "outputs_total": len(self._read_journals()),
            "skipped": list(skipped.values()),
            "ranks": [{k: r[k] for k in ("rank", "host", "seconds", "counts")} for r in ranks],
            **(extra or {}),
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest
