"""Content checksums: blake2b for outputs (fast; detects any change of the bytes) and sha256 for
inputs that go into a run's config fingerprint (the digest people compare by hand)."""

from __future__ import annotations

import hashlib
import os
from typing import Union

PathLike = Union[str, os.PathLike]
_CHUNK = 1 << 20


def _hash_file(path: PathLike, digest) -> str:
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def bytes_checksum(data: bytes) -> str:
    """blake2b-128 of ``data`` as hex: what ``file_checksum`` gives for a file holding it."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_checksum(path: PathLike) -> str:
    """blake2b-128 of a file's bytes as hex (the journal's per-output checksum)."""
    return _hash_file(path, hashlib.blake2b(digest_size=16))


def file_digest(path: PathLike) -> str:
    """sha256 of a file as hex (checkpoints go into the config fingerprint)."""
    return _hash_file(path, hashlib.sha256())
