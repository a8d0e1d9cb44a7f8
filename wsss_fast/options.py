"""Options dataclasses' fields with CLI metadata, and the argparse flags generated from them.

A field declared with ``option(...)`` carries its help text, choices and CLI spelling; the
dataclass is the single definition of each option's default. The generated flags default to
``argparse.SUPPRESS``, so only options given on the command line (or in a ``--config`` file)
reach the dataclass and every other option keeps the dataclass default.

Like ``registry``, this module sits below every other layer: it imports nothing from the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, Optional, Sequence, Union


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: Optional[str] = None,
           choices: Union[Sequence, typing.Callable, None] = None, group: Optional[str] = None,
           metavar: Optional[Union[str, tuple]] = None, nargs: Union[int, str, None] = None,
           repeat: bool = False, cli: bool = True, fingerprint: bool = True,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with CLI metadata. ``flag``: the CLI spelling (default ``--name``; a
    ``bool`` defaulting to True becomes ``--no-name``); ``repeat``: the flag may be given several
    times (a list); ``cli=False``: Python-only; ``fingerprint=False``: does not change results
    (a resumed run may change it)."""
    metadata = {"help": help, "flag": flag,
                "choices": choices if callable(choices) or not choices else tuple(choices),
                "group": group, "metavar": metavar, "nargs": nargs, "repeat": repeat,
                "cli": cli, "fingerprint": fingerprint}
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
    hints = typing.get_type_hints(options_type)
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
            if meta.get("repeat"):
                kwargs.update(action="append", type=element)
            else:
                kwargs.update(nargs=meta.get("nargs") or "+", type=element)
        else:
            kwargs["type"] = kind
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


def choice_problems(options) -> list[str]:
    """One message per field whose value is not among its declared (fixed) choices: the CLI's
    argparse check, for options built in Python."""
    problems = []
    for field in dataclasses.fields(options):
        choices = field.metadata.get("choices")
        value = getattr(options, field.name)
        if choices and not callable(choices) and value is not None and value not in choices:
            problems.append(f"{_flag(field)} {value!r}: expected one of "
                            f"{', '.join(map(str, choices))}")
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
        for name in ("data", "split", "labels", "classes"):
            setattr(self, name, path_or_none(getattr(self, name)))
