"""Options dataclasses' fields with CLI metadata, and the argparse flags generated from them.

A field declared with ``option(...)`` carries its help text, choices, CLI spelling and value
check; the dataclass is the single definition of each option's default and valid values. The
generated flags default to ``argparse.SUPPRESS``, so only options given on the command line (or
in a ``--config`` file) reach the dataclass and every other option keeps the dataclass default.

Like ``registry``, this module sits below every other layer: it imports nothing from the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import numbers
import os
import re
import typing
from typing import Any, Callable, Optional, Sequence, Union

INT32_MAX = 2 ** 31 - 1


# --- Value checks -------------------------------------------------------------------------------
# A check takes an option's value as text (command line, YAML) or as a Python value and returns it
# converted, or raises ValueError saying what it expected and what it got. The flag generator makes
# it the argparse ``type``; ``option_problems`` runs the same check on options built in Python.

@dataclasses.dataclass(frozen=True)
class Number:
    """A finite number (or an integer: no fraction, no bool) within optional bounds."""

    integer: bool = False
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    above_minimum: bool = False       # > minimum instead of >=

    @property
    def expected(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low, high = (None if bound is None else str(int(bound)) if self.integer
                     else f"{bound:g}" for bound in (self.minimum, self.maximum))
        if low is not None and high is not None:
            return f"{kind} in {'(' if self.above_minimum else '['}{low}, {high}]"
        if low is not None:
            return f"{kind} {'>' if self.above_minimum else '>='} {low}"
        return f"{kind} <= {high}" if high is not None else kind

    def __call__(self, value):
        number = self._number(value)
        if number is None or (self.minimum is not None and (
                number < self.minimum or (self.above_minimum and number == self.minimum))) or (
                self.maximum is not None and number > self.maximum):
            raise ValueError(f"expected {self.expected}, got {value!r}")
        return number

    def _number(self, value):
        """``value`` as an int / finite float, or None."""
        if isinstance(value, bool):
            return None
        if isinstance(value, str):
            text = value.strip()
            if self.integer:
                if not re.fullmatch(r"[+-]?[0-9]+", text):
                    return None
                try:
                    return int(text)
                except ValueError:      # more digits than int() takes
                    return None
            try:
                number = float(text)
            except ValueError:
                return None
        elif isinstance(value, numbers.Integral):
            if self.integer:
                return int(value)
            try:
                number = float(value)
            except OverflowError:
                return None
        elif isinstance(value, numbers.Real) and not self.integer:
            number = float(value)
        else:
            return None
        return number if math.isfinite(number) else None


@dataclasses.dataclass(frozen=True)
class Text:
    """Non-empty text (a path is taken as its text)."""

    expected: str = "a non-empty text"

    def __call__(self, value):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise ValueError(f"expected {self.expected}, got {value!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Device:
    """A device name: auto, cpu, mps, cuda or cuda:N."""

    expected: str = "auto, cpu, cuda or cuda:N"

    def __call__(self, value):
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?",
                                                          value.strip()):
            raise ValueError(f"expected {self.expected}, got {value!r}")
        return value.strip()


@dataclasses.dataclass(frozen=True)
class KeyValue:
    """``KEY=VALUE`` with a non-empty key and a YAML value."""

    expected: str = "KEY=VALUE (VALUE in YAML)"

    def __call__(self, value):
        import yaml
        key, sep, text = value.partition("=") if isinstance(value, str) else ("", "", "")
        if not sep or not key.strip():
            raise ValueError(f"expected {self.expected}, got {value!r}")
        try:
            yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"expected {self.expected}, got {value!r} (VALUE is not valid "
                             f"YAML)") from None
        return value


integer = Number(integer=True, minimum=-INT32_MAX, maximum=INT32_MAX)
positive_int = Number(integer=True, minimum=1, maximum=INT32_MAX)
seed_int = Number(integer=True, minimum=0, maximum=2 ** 32 - 1)      # numpy's seed range
worker_count = Number(integer=True, minimum=0, maximum=1024)         # processes to start
finite_float = Number()
nonneg_float = Number(minimum=0)
positive_float = Number(minimum=0, above_minimum=True)
probability = Number(minimum=0, maximum=1)
text = Text()
device_name = Device()
key_value = KeyValue()

_DEFAULT_CHECKS = {int: integer, float: finite_float, str: text}


def argparse_type(check: Callable) -> Callable[[str], Any]:
    """``check`` as an argparse ``type``: its ValueError becomes argparse's message (with the
    flag in front). The check stays reachable as ``.check``."""
    def convert(value: str):
        try:
            return check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.check = check
    convert.__name__ = getattr(check, "__name__", type(check).__name__)
    return convert


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: Optional[str] = None,
           choices: Union[Sequence, typing.Callable, None] = None, group: Optional[str] = None,
           metavar: Optional[Union[str, tuple]] = None, nargs: Union[int, str, None] = None,
           repeat: bool = False, cli: bool = True, fingerprint: bool = True,
           check: Optional[Callable] = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with CLI metadata. ``flag``: the CLI spelling (default ``--name``; a
    ``bool`` defaulting to True becomes ``--no-name``); ``repeat``: the flag may be given several
    times (a list); ``cli=False``: Python-only; ``fingerprint=False``: does not change results
    (a resumed run may change it); ``check``: the value check (of each element of a list;
    default by type: ``integer``, ``finite_float``, ``text``), the argparse type of the flag and
    what ``option_problems`` runs for options built in Python."""
    metadata = {"help": help, "flag": flag,
                "choices": choices if callable(choices) or not choices else tuple(choices),
                "group": group, "metavar": metavar, "nargs": nargs, "repeat": repeat,
                "cli": cli, "fingerprint": fingerprint, "check": check}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(hint) -> tuple[type, Optional[type]]:
    """``(container or scalar type, element type)`` of a field annotation, Optional removed."""
    origin = typing.get_origin(hint)
    if origin is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return origin, (args[0] if args else str)
    if origin is dict or hint is dict:
        return dict, str
    return hint, None


@functools.lru_cache(maxsize=None)
def _hints(options_type) -> dict:
    """The field annotations of a dataclass (resolved once: the CLI builds its parser often)."""
    return typing.get_type_hints(options_type)


def _check_of(field: dataclasses.Field, element: type, kind: type = None) -> Optional[Callable]:
    """The value check of ``field`` (of its elements for a list; ``KEY=VALUE`` for a mapping),
    declared or by type."""
    if field.metadata.get("check"):
        return field.metadata["check"]
    return key_value if kind is dict else _DEFAULT_CHECKS.get(element)


def flag_of(options_type, name: str) -> str:
    """The CLI flag of field ``name`` (used in error messages)."""
    for field in dataclasses.fields(options_type):
        if field.name == name:
            return _flag(field)
    return f"--{name.replace('_', '-')}"


def _flag(field: dataclasses.Field) -> str:
    if field.metadata.get("flag"):
        return field.metadata["flag"]
    if field.default is True:
        return f"--no-{field.name.replace('_', '-')}"
    return f"--{field.name.replace('_', '-')}"


def _help(field: dataclasses.Field) -> str:
    text = field.metadata.get("help", "")
    default = field.default
    shown = not (default is None or default is dataclasses.MISSING or isinstance(default, bool))
    if shown and "default" not in text:
        text = f"{text} (default {default})" if text else f"default {default}"
    return text


def add_options_arguments(parser: argparse.ArgumentParser, options_type,
                          skip: Sequence[str] = ()) -> None:
    """Add one flag per CLI field of the dataclass ``options_type`` to ``parser`` (in field
    order, in the argument group named by each field's metadata)."""
    hints = _hints(options_type)
    groups: dict[str, Any] = {}
    for field in dataclasses.fields(options_type):
        meta = field.metadata
        if not meta.get("cli", False) or field.name in skip:
            continue
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        kind, element = _base_type(hints[field.name])
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS,
                                  "help": _help(field)}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if kind is bool:
            kwargs["action"] = "store_false" if field.default is True else "store_true"
        elif kind in (tuple, list, dict):
            check = _check_of(field, element, kind)
            if meta.get("repeat"):
                kwargs.update(action="append", type=argparse_type(check))
            else:
                kwargs.update(nargs=meta.get("nargs") or "+", type=argparse_type(check))
        else:
            kwargs["type"] = argparse_type(_check_of(field, kind))
        choices = meta.get("choices")
        if callable(choices):   # e.g. the names of a registry, known once its modules load
            choices = tuple(choices())
        if choices:
            kwargs["choices"] = choices
        target.add_argument(_flag(field), **kwargs)


def options_from_args(options_type, args: argparse.Namespace, **extra):
    """The options dataclass of the fields present in ``args`` (the others keep their
    defaults)."""
    names = {f.name for f in dataclasses.fields(options_type)}
    given = {name: value for name, value in vars(args).items() if name in names}
    return options_type(**{**given, **extra})


def _checked(field: dataclasses.Field, hint, value):
    """``(value converted, None)`` or ``(value, problem)`` for one field of options built in
    Python (the CLI's argparse checks, plus the kind of value)."""
    kind, element = _base_type(hint)
    flag = _flag(field)
    if value is None:
        optional = typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)
        return value, (None if optional else f"{flag}: expected a value, got None")
    try:
        if kind is bool:     # named by the field: its flag (--no-flip) says the opposite
            flag = field.name
            check = field.metadata.get("check")
            if check is not None:
                return check(value), None
            if not isinstance(value, bool):
                raise ValueError(f"expected True or False, got {value!r}")
            return value, None
        if kind is dict:
            if isinstance(value, typing.Mapping):
                if not all(isinstance(k, str) and k.strip() for k in value):
                    raise ValueError(f"expected names as keys, got {value!r}")
                return dict(value), None
            kind = list            # ["KEY=VALUE", ...], parsed by the dataclass
        if kind in (tuple, list):
            if isinstance(value, (str, bytes, typing.Mapping)) or not isinstance(
                    value, typing.Iterable):
                raise ValueError(f"expected a list of values, got {value!r}")
            values = list(value)
            nargs = field.metadata.get("nargs")
            if isinstance(nargs, int) and len(values) != nargs:
                raise ValueError(f"expected {nargs} values, got {value!r}")
            if not values and not field.metadata.get("repeat"):
                raise ValueError("expected at least one value, got none")
            check = _check_of(field, element, _base_type(hint)[0])
            converted = [check(v) for v in values] if check else values
            return (converted if kind is list else tuple(converted)), None
        check = _check_of(field, kind)
        value = check(value) if check else value
    except ValueError as error:
        return value, f"{flag}: {error}"
    choices = field.metadata.get("choices")
    if choices and not callable(choices) and value not in choices:
        return value, f"{flag} {value!r}: expected one of {', '.join(map(str, choices))}"
    return value, None


def normalize_options(options) -> None:
    """Convert, in place, the fields of ``options`` whose values pass their checks (e.g. paths
    to text, a list of scales to a tuple of floats); the others are left for
    ``option_problems`` to report."""
    hints = _hints(type(options))
    for field in dataclasses.fields(options):
        value, problem = _checked(field, hints[field.name], getattr(options, field.name))
        if problem is None:
            setattr(options, field.name, value)


def option_problems(options) -> list[str]:
    """One message per field whose value fails its check or is not among its (fixed) choices:
    what the CLI's argparse types refuse, for options built in Python."""
    hints = _hints(type(options))
    problems = []
    for field in dataclasses.fields(options):
        _, problem = _checked(field, hints[field.name], getattr(options, field.name))
        if problem:
            problems.append(problem)
    return problems


def fingerprint_fields(options_type) -> list[str]:
    """The fields that change results (``option(..., fingerprint=True)``, the default)."""
    return [f.name for f in dataclasses.fields(options_type)
            if f.metadata.get("fingerprint", True)]


def parse_key_values(pairs, option_flag: str = "--model-arg") -> dict:
    """``["k=v", ...]`` (a repeatable CLI option; or a mapping, copied) -> ``{k: YAML value of
    v}``."""
    import yaml
    if pairs is None:
        return {}
    if isinstance(pairs, typing.Mapping):
        return dict(pairs)
    parsed = {}
    for pair in [pairs] if isinstance(pairs, str) else pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key:
            raise ValueError(f"{option_flag} {pair!r}: expected KEY=VALUE")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def path_or_none(value) -> Optional[str]:
    return None if value is None else os.fspath(value)


@dataclasses.dataclass
class DatasetOptions:
    """Which images: shared by every stage that reads a dataset."""

    data: Optional[str] = option(None, "dataset root (VOC2012 folder, COCO root, or a folder of "
                                 "images)", metavar="ROOT", group="dataset")
    dataset: str = option("auto", "layout of --data (default: detected)",
                          choices=("auto", "voc", "coco", "folder"), group="dataset")
    split: Optional[str] = option(None, "split name (VOC: ImageSets/Segmentation/<split>.txt; "
                                  "COCO: train2014/val2014) or a path to a list file",
                                  group="dataset")
    labels: Optional[str] = option(None, "image-level labels: cls_labels.npy, CSV or JSON "
                                   "(default: the dataset's own)", metavar="FILE",
                                   group="dataset")
    classes: Optional[str] = option(None, "class names, one per line (default: the dataset's "
                                    "own)", metavar="FILE", group="dataset")

    def __post_init__(self):
        normalize_options(self)
