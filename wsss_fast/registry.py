"""One registry convention for models, presets and training methods.

Entries register at their definition site when their module is imported (timm's convention); a
registry knows the modules that hold its built-in entries and imports them before any lookup, so
registering a custom entry first never hides the built-ins. Names have one spelling, lower case
with underscores (``mctformer_v2``, ``mctformer_v2_tiny``); a lookup also accepts hyphens
(``mctformer-v2``) so that configs written with them keep working.

This module sits below every other layer: it imports nothing from the package.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Generic, Iterator, Optional, Sequence, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_+.]*$")


class UnknownName(ValueError):
    """A lookup of a name that no module registered."""


def canonical_name(name: str) -> str:
    """The registry spelling of ``name``: lower case, ``-`` read as ``_``."""
    if not isinstance(name, str):
        raise UnknownName(f"a registry name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Named entries of one kind (``"model"``, ``"preset"``, ``"method"``).

    ``builtin_modules`` are imported (once, lazily) before the first lookup or listing; each
    registers its own entries on import with ``registry.register(name, entry)`` or the
    ``@registry.register(name)`` decorator.
    """

    def __init__(self, kind: str, builtin_modules: Sequence[str] = ()):
        self.kind = kind
        self._builtin_modules = tuple(builtin_modules)
        self._entries: dict[str, T] = {}
        self._loaded = not self._builtin_modules
        self._loading = False

    def _load_builtins(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True   # a built-in module may look entries up while it registers
        try:
            for module in self._builtin_modules:
                importlib.import_module(module)
            self._loaded = True
        finally:
            self._loading = False

    def register(self, name: str, entry: Optional[T] = None, *, override: bool = False):
        """Add ``entry`` under ``name``; without ``entry``, a decorator that registers what it
        decorates. A name is registered once unless ``override``."""
        if entry is None:
            def decorator(obj: T) -> T:
                self.register(name, obj, override=override)
                return obj
            return decorator
        key = canonical_name(name)
        if key != name or not _NAME.match(key):
            raise ValueError(f"{self.kind} name {name!r}: use lower case, digits and '_' "
                             f"(e.g. {key!r})")
        if key in self._entries and not override:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[key] = entry
        return entry

    def get(self, name: str) -> T:
        self._load_builtins()
        key = canonical_name(name)
        if key not in self._entries:
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[key]

    def __contains__(self, name) -> bool:
        self._load_builtins()
        try:
            return canonical_name(name) in self._entries
        except UnknownName:
            return False

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load_builtins()
        return sorted(self._entries.items())

    def filter(self, predicate: Callable[[str, T], bool]) -> list[str]:
        return [name for name, entry in self.items() if predicate(name, entry)]

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register temporary ones)."""
        self._entries.pop(canonical_name(name), None)
