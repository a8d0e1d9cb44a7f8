"""The ABI numbers and limits shared with the built code, read from their one source,
``csrc/common/abi.h`` (DESIGN §3). Python keeps no copy: the C++ extension and the CUDA library
compile the same header and report what they were built with, so a build older than the header
is detected as stale."""

from __future__ import annotations

import functools
import os
import re

_SOURCE_HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "csrc", "common", "abi.h")
# A wheel has no csrc/: setup.py's build_py puts a copy of the header beside this module.
_PACKAGED_HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "abi.h")
HEADER = _SOURCE_HEADER if os.path.exists(_SOURCE_HEADER) else _PACKAGED_HEADER
_DEFINE = re.compile(r"^\s*#\s*define\s+WSSS_FAST_([A-Z0-9_]+)\s+\(?(-?\d+)\)?\s*(?:/[/*].*)?$")


def constants() -> dict[str, int]:
    """``{NAME: value}`` of every ``#define WSSS_FAST_<NAME> <integer>`` in ``HEADER``."""
    return _read(HEADER)


@functools.lru_cache(maxsize=None)
def _read(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as header:
            lines = header.read().splitlines()
    except OSError as exc:
        raise RuntimeError(f"wsss_fast: cannot read the ABI header {path} ({exc})") from None
    found = {}
    for line in lines:
        match = _DEFINE.match(line)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


def value(name: str) -> int:
    """``WSSS_FAST_<name>`` from ``csrc/common/abi.h``; KeyError names the header when absent."""
    table = constants()
    if name not in table:
        raise KeyError(f"WSSS_FAST_{name} is not defined in {HEADER}")
    return table[name]


def codes(prefix: str, names: tuple[str, ...]) -> dict[str, int]:
    """``{name: WSSS_FAST_<PREFIX>_<NAME>}``, e.g. ``codes("NORM", ("none", "max"))``."""
    return {name: value(f"{prefix}_{name.upper()}") for name in names}
