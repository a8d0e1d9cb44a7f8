"""Resumable runs: a per-rank journal of finished items and a manifest per command.

Each rank keeps two journals in ``OUT/.wsss-fast/``, one JSON line per event:

- ``<command>.rank<r>.jsonl``, one line per finished item: ``{"id", "digest", "outputs": {name:
  {"path", "size", "blake2b"}}}`` (paths relative to the output folder, a content checksum each);
- ``<command>.pending.rank<r>.jsonl``: ``{"id", "digest", "pending": true, "outputs": [paths]}``,
  the run is about to (re)do the item; ``is_finished`` writes it, after removing the item's old
  outputs, whenever it answers False.

``digest`` identifies the run's config. An item is finished when a done entry under the current
digest matches its outputs' sizes and checksums (a same-size corruption is redone). Outputs
without one (the process died between publishing and journaling) are adopted, once ``validate``
accepts them, only if a run of this config marked the item pending and never finished it: outputs
of another configuration are never adopted. Lines without a digest (older versions) count as
not finished. Outputs are published atomically, so a killed run never leaves a partial file
under a final name.

The config is recorded in ``<command>.config.json``; a different config in an existing output
folder is refused (``ConfigConflict``, Spark's "error" save mode) unless ``overwrite``, or unless
nothing was done under the recorded one (a run that failed before its first item does not block
the corrected command). ``overwrite`` deletes the outputs the old journals list, then the
journals, and only then records the new config: an interrupted overwrite leaves nothing that a
later run could adopt. One run at a time per folder, command and rank: the constructor takes
``<command>.rank<r>.lock`` (``RunLocked``), ``finish()`` or ``close()`` releases it. The manifest
(``manifest-<command>.json``) records the config, library versions, counts and every skipped
item with its reason.
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

from wsss_fast.io.atomic import atomic_write_json, raise_if_disk_full, remove_stale_temps
from wsss_fast.io.checksums import file_checksum, file_digest  # noqa: F401 (file_digest: API)
from wsss_fast.io.locks import RunLock, RunLocked  # noqa: F401 (RunLocked: raised here)

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


def config_digest(config: Mapping) -> str:
    """A short digest of a JSON-able config, independent of key order."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputNotWritable(f"cannot write to the output folder {folder}: "
                                f"{error.strerror or error}") from None


def _open_journal(path: Path):
    """Open a journal for appending, first ending a line torn by a killed process (the next
    entry would otherwise be glued to it and lost)."""
    try:
        with open(path, "rb") as existing:
            existing.seek(-1, os.SEEK_END)
            torn = existing.read(1) != b"\n"
    except OSError:   # missing, or empty (cannot seek before its start)
        torn = False
    journal = open(path, "a")
    if torn:
        journal.write("\n")
        journal.flush()
    return journal


def _is_done_entry(entry: dict) -> bool:
    return isinstance(entry.get("outputs"), dict) and not entry.get("pending")


class RunState:
    def __init__(self, out_dir, command: str, config: Mapping, *, rank: int = 0, world: int = 1,
                 overwrite: bool = False):
        """``config`` must be JSON-serializable; all of it is the fingerprint that a later run in
        the same folder must match."""
        self.out_dir = Path(out_dir)
        self.command = command
        self.config = json.loads(json.dumps(dict(config), default=str))
        self.digest = config_digest(self.config)
        self.rank, self.world = rank, world
        self.started = time.time()
        self.state_dir = self.out_dir / STATE_DIR
        check_writable(self.out_dir)
        self.state_dir.mkdir(exist_ok=True)
        self._lock = RunLock(self.state_dir / f"{command}.rank{rank}.lock",
                             what=f"`{command}` rank {rank} in {self.out_dir}")
        try:
            self.fresh = overwrite   # redo every item, replacing existing outputs
            if self.fresh:
                self._remove_previous_run()
            entries = [] if self.fresh else self._read_entries()
            self._check_config(entries)
            self.done, self._pending = self._index(entries)
            remove_stale_temps(self.out_dir)
            self.counts = {"assigned": 0, "done": 0, "already_done": 0, "skipped": 0}
            self.skipped: list[dict] = []
            self._skipped_ids: set[str] = set()
            self._journal = _open_journal(self._journal_path("done", rank))
            self._pending_journal = _open_journal(self._journal_path("pending", rank))
        except BaseException:
            self._lock.release()
            raise

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / f"manifest-{self.command}.json"

    # ------------------------------------------------------------------ config and old journals

    def _journal_path(self, kind: str, rank: int) -> Path:
        infix = ".pending" if kind == "pending" else ""
        return self.state_dir / f"{self.command}{infix}.rank{rank}.jsonl"

    def _journals(self, ranks: Optional[Callable[[int], bool]] = None) -> list[Path]:
        """Both journals of every rank (``ranks``: only those it accepts)."""
        found = []
        for infix in ("", ".pending"):
            prefix = f"{self.command}{infix}.rank"
            for path in self.state_dir.glob(f"{prefix}*.jsonl"):
                rank = path.name[len(prefix):-len(".jsonl")]
                if rank.isdigit() and (ranks is None or ranks(int(rank))):
                    found.append(path)
        return sorted(found)

    def _read_entries(self, journals=None) -> list[dict]:
        entries = []
        for journal in self._journals() if journals is None else journals:
            with open(journal) as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue   # a line torn by a killed process: that item is re-checked
                    if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                        entries.append(entry)
        return entries

    def _index(self, entries: list[dict]) -> tuple[dict[str, list[dict]], set[str]]:
        """Done records per item and the pending items, under the current digest only."""
        done: dict[str, list[dict]] = {}
        pending: set[str] = set()
        for entry in entries:
            if entry.get("digest") != self.digest:
                continue
            if entry.get("pending"):
                pending.add(entry["id"])
            elif _is_done_entry(entry) and all(isinstance(r, dict)
                                               for r in entry["outputs"].values()):
                done.setdefault(entry["id"], []).append(entry["outputs"])
        return done, pending - set(done)

    def _check_config(self, entries: list[dict]) -> None:
        fingerprint = self.state_dir / f"{self.command}.config.json"
        previous = None
        if fingerprint.exists():
            try:
                previous = json.loads(fingerprint.read_text())
            except ValueError:
                previous = {"<unreadable config.json>": True}
        if previous is not None and previous != self.config and not self.fresh:
            # Work journaled under another config (or by an older version, without a digest)
            # blocks; a recorded config under which nothing was done does not.
            if any(_is_done_entry(e) and e.get("digest") != self.digest for e in entries):
                changed = sorted(k for k in set(previous) | set(self.config)
                                 if previous.get(k) != self.config.get(k))
                raise ConfigConflict(
                    f"{self.out_dir} holds `{self.command}` results of another configuration "
                    f"(differs in: {', '.join(changed)}); use another folder or --overwrite")
        if self.rank == 0 and previous != self.config:
            atomic_write_json(fingerprint, self.config)

    def _remove_previous_run(self) -> None:
        """For ``overwrite``: delete the outputs the old journals list, then the journals (this
        rank's share of them, also those of ranks beyond the current world)."""
        mine = self._journals(lambda rank: rank % self.world == self.rank)
        for entry in self._read_entries(mine):
            for path in self._entry_paths(entry):
                path.unlink(missing_ok=True)
        for journal in mine:
            journal.unlink(missing_ok=True)
            journal.with_name(journal.name[:-len(".jsonl")] + ".summary.json").unlink(
                missing_ok=True)

    def _entry_paths(self, entry: dict) -> list[Path]:
        """The outputs an entry names, restricted to files inside the output folder."""
        outputs = entry.get("outputs")
        if isinstance(outputs, dict):
            names = [r.get("path") for r in outputs.values() if isinstance(r, dict)]
        elif isinstance(outputs, list):
            names = outputs
        else:
            return []
        root = self.out_dir.resolve()
        paths = []
        for name in names:
            if isinstance(name, str) and name and not os.path.isabs(name):
                path = (self.out_dir / name).resolve()
                if path.is_relative_to(root) and path != root:
                    paths.append(path)
        return paths

    def _relative(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.out_dir.resolve()).as_posix()
        except ValueError:
            return os.fspath(path.resolve())   # outside the folder: recorded, never deleted

    # ------------------------------------------------------------------------------ items

    def _journal_matches(self, item: str, outputs: Mapping[str, Path]) -> bool:
        checksums: dict[str, str] = {}
        for recorded in self.done.get(item, ()):
            if set(recorded) != set(outputs):
                continue
            matches = True
            for name, path in outputs.items():
                record = recorded[name]
                if not path.exists() or path.stat().st_size != record.get("size"):
                    matches = False
                    break
                if name not in checksums:
                    checksums[name] = file_checksum(path)
                if checksums[name] != record.get("blake2b"):
                    matches = False
                    break
            if matches:
                return True
        return False

    def is_finished(self, item: str, outputs: Mapping[str, Path],
                    validate: Optional[Callable[[Path], None]] = None) -> bool:
        """True if ``item``'s outputs are complete: journaled under this config with matching
        sizes and checksums, or (never journaled as done, but marked pending by an earlier run of
        this config) present and accepted by ``validate``, which raises on a bad file.

        False means the caller is to redo the item: its existing outputs are removed and it is
        journaled as pending, so that a run killed after publishing it adopts it next time."""
        outputs = {name: Path(path) for name, path in outputs.items()}
        if not self.fresh:
            if self._journal_matches(item, outputs):
                return True
            if (item in self._pending and item not in self.done
                    and all(p.exists() for p in outputs.values())):
                try:
                    for path in outputs.values():
                        if validate is not None:
                            validate(path)
                except (OSError, ValueError):
                    pass
                else:
                    self.record_done(item, outputs, count=False)
                    return True
        self.mark_pending(item, outputs)
        return False

    def mark_pending(self, item: str, outputs: Mapping[str, Path]) -> None:
        """Remove ``item``'s outputs and journal that this run is going to produce them (what
        ``is_finished`` does when it answers False); call it for items handed out without
        ``is_finished``."""
        paths = [Path(p) for p in outputs.values()]
        for path in paths:   # removed first: a crash in between must not leave them adoptable
            path.unlink(missing_ok=True)
        self._write(self._pending_journal, {"id": item, "digest": self.digest, "pending": True,
                                            "outputs": [self._relative(p) for p in paths]})

    def record_done(self, item: str, outputs: Mapping[str, Path], count: bool = True) -> None:
        """Journal ``item`` as done with the size and checksum of each of its (published)
        outputs."""
        record = {}
        for name, path in outputs.items():
            path = Path(path)
            record[name] = {"path": self._relative(path), "size": path.stat().st_size,
                            "blake2b": file_checksum(path)}
        self._write(self._journal, {"id": item, "digest": self.digest, "outputs": record})
        self.done[item] = [record]
        self._pending.discard(item)
        if count:
            self.counts["done"] += 1

    @staticmethod
    def _write(journal, entry: dict) -> None:
        try:
            journal.write(json.dumps(entry) + "\n")
            journal.flush()
        except OSError as error:
            raise_if_disk_full(error, journal.name, published=True)
            raise

    def record_skipped(self, item: str, reason: str) -> None:
        """``item`` could not be done; listed in the manifest (once per id)."""
        if item in self._skipped_ids:
            return
        self._skipped_ids.add(item)
        self.counts["skipped"] += 1
        self.skipped.append({"id": item, "reason": reason})

    # ------------------------------------------------------------------------------ the end

    def close(self) -> None:
        """Close the journal and release the lock, without a summary (a run that failed).
        Safe to call twice."""
        for journal in (getattr(self, "_journal", None), getattr(self, "_pending_journal", None)):
            if journal is not None:
                journal.close()
        self._lock.release()

    def __enter__(self) -> "RunState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finish(self, extra: Optional[Mapping] = None) -> dict:
        """Write this rank's summary and release the lock; returns the summary."""
        try:
            self._journal.close()
            self._pending_journal.close()
            summary = {"rank": self.rank, "world": self.world, "host": socket.gethostname(),
                       "seconds": round(time.time() - self.started, 3), "counts": self.counts,
                       "skipped": self.skipped, **(extra or {})}
            atomic_write_json(self.state_dir / f"{self.command}.rank{self.rank}.summary.json",
                              summary)
        finally:
            self._lock.release()
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
            "counts": counts, "outputs_total": len(self._index(self._read_entries())[0]),
            "skipped": list(skipped.values()),
            "ranks": [{k: r[k] for k in ("rank", "host", "seconds", "counts")} for r in ranks],
            **(extra or {}),
        }
        atomic_write_json(self.manifest_path, manifest)
        return manifest
