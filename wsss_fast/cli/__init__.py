"""The ``wsss-fast`` command line: one subcommand per pipeline step.

Every subcommand takes ``--config FILE.yaml`` whose keys (option names with ``-`` or ``_``) set
that subcommand's defaults; options given on the command line win. Values from both go through
the same checks (the options' argparse types and choices) before any work; a bad one is one line
on stderr naming the option, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Optional, Sequence

import wsss_fast
from wsss_fast.options import argparse_type, key_value, text

# subcommand -> module in wsss_fast.cli (each defines add_arguments(parser) and run(args) -> int)
COMMANDS = {
    "synth": "synth", "extract": "extract", "pseudo-label": "pseudo_label", "refine": "refine",
    "evaluate": "evaluate", "bench": "bench", "train": "train", "demo": "demo",
    "prototypes": "prototypes", "pretrain": "pretrain",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE`` on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_keys(parser: argparse.ArgumentParser) -> dict:
    """``{YAML key: (action, key names the flag)}``: keys are option names as spelled on the
    command line (model_arg, no_flip) or the options dataclass field they set (model_args,
    flip)."""
    keys = {}
    actions = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")]
    for action in actions:
        keys[action.dest] = (action, False)
    for action in actions:
        for flag in action.option_strings:
            keys.setdefault(flag.lstrip("-").replace("-", "_"), (action, True))
    return keys


def _kind_of(value) -> str:
    return ("a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict)
            else f"{str(value).lower()} (a boolean)" if isinstance(value, bool) else repr(value))


def _converted(action: argparse.Action, value):
    """One YAML scalar through the action's type and choices, as argparse treats the text of a
    command-line value; ValueError says what is wrong."""
    if isinstance(value, (list, dict, bool)):
        raise ValueError(f"expected a single value, got {_kind_of(value)}")
    text = value if isinstance(value, str) else str(value)
    if action.type is not None:
        try:
            converted = action.type(text)
        except argparse.ArgumentTypeError as error:
            raise ValueError(str(error)) from None
    else:
        converted = text
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {text!r}")
    return converted


def _config_value(action: argparse.Action, value, names_flag: bool):
    """The value a YAML entry gives ``action.dest``, checked like the command-line value."""
    if action.nargs == 0:                    # a flag: store_true / store_false
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {_kind_of(value)}")
        return (action.const if value else not action.const) if names_flag else value
    takes_list = isinstance(action, argparse._AppendAction) or action.nargs not in (None, "?")
    if not takes_list:
        return _converted(action, value)
    if isinstance(value, dict) and getattr(action.type, "check", None) is key_value:
        value = [f"{k}={json.dumps(v, default=str)}" for k, v in value.items()]
    items = value if isinstance(value, list) else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise ValueError(f"expected a list of {action.nargs} values, got {_kind_of(value)}")
    if not items and action.nargs == "+":
        raise ValueError("expected at least one value, got an empty list")
    return [_converted(action, item) for item in items]


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """``{dest: value}`` of the YAML file ``path``, each value checked by its option's type,
    choices and number of values (argparse does not check defaults)."""
    import yaml
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    except OSError as error:
        parser.error(f"--config {path}: {error.strerror}")
    except yaml.YAMLError as error:
        parser.error(f"--config {path}: not valid YAML ({' '.join(str(error).split())})")
    if not isinstance(config, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    keys = _config_keys(parser)
    values = {str(key).replace("-", "_"): value for key, value in config.items()}
    unknown = sorted(set(values) - set(keys))
    if unknown:
        parser.error(f"--config {path}: unknown options {', '.join(unknown)}")
    defaults = {}
    for key, value in values.items():
        if value is None:                    # an empty entry: the option's default
            continue
        action, names_flag = keys[key]
        try:
            defaults[action.dest] = _config_value(action, value, names_flag)
        except ValueError as error:
            parser.error(f"--config {path}: {key}: {error}")
    return defaults


def build_parser(only: Optional[str] = None) -> tuple[argparse.ArgumentParser, dict]:
    """The parser and ``{command: subparser}``; ``only``: add the options of that command alone
    (the one being run: the others are listed, without their options)."""
    parser = ArgumentParser(
        prog="wsss-fast", description="Fast CAMs, pseudo-labels and evaluation for weakly "
        "supervised semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"wsss-fast {wsss_fast.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"wsss_fast.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        child = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        child.add_argument("--config", metavar="FILE.yaml", type=argparse_type(text),
                           help="YAML file of option defaults for this command")
        if only in (None, name):
            module.add_arguments(child)
        child.set_defaults(_run=module.run)
        parsers[name] = child
    return parser, parsers


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else None)
    try:   # every option is checked here, before any work: argparse errors exit with status 2
        args = parser.parse_args(argv)
        if args.config:
            child = parsers[args.command]
            child.set_defaults(**_load_config(args.config, child))
            args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 2)
    from wsss_fast.io.interrupts import Interrupted, handle_interrupts
    try:
        with handle_interrupts():
            return int(args._run(args) or 0)
    except Interrupted as stop:   # workers stopped, temporary files removed, journals kept
        print(f"wsss-fast {args.command}: {stop} — rerun the same command to resume",
              file=sys.stderr)
        return stop.exit_status
    except _reported_errors() as error:
        if os.environ.get("WSSS_FAST_DEBUG"):
            raise
        print(f"wsss-fast {args.command}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_status", 2)   # 1: nothing to do (an empty dataset)


def _reported_errors() -> tuple:
    """Errors that describe bad arguments or inputs: one line, no traceback (set
    WSSS_FAST_DEBUG=1 for it)."""
    from wsss_fast.io.run_state import ConfigConflict
    return (ValueError, OSError, ConfigConflict)
