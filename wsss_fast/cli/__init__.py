"""The ``wsss-fast`` command line: one subcommand per pipeline step.

Every subcommand takes ``--config FILE.yaml`` whose keys (option names with ``-`` or ``_``) set
that subcommand's defaults; options given on the command line win.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

import wsss_fast

# subcommand -> module in wsss_fast.cli (each defines add_arguments(parser) and run(args) -> int)
COMMANDS = {
    "synth": "synth", "extract": "extract", "pseudo-label": "pseudo_label", "refine": "refine",
    "evaluate": "evaluate", "bench": "bench", "train": "train", "demo": "demo",
    "prototypes": "prototypes",
}


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    except OSError as error:
        parser.error(f"--config {path}: {error.strerror}")
    except yaml.YAMLError as error:
        parser.error(f"--config {path}: not valid YAML ({error})")
    if not isinstance(config, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    # Keys are option names as spelled on the command line (model_arg, no_flip) or the
    # options dataclass field they set (model_args, flip).
    known = {}
    for action in parser._actions:
        known[action.dest] = (action.dest, False)
        for flag in action.option_strings:
            name = flag.lstrip("-").replace("-", "_")
            negated = isinstance(action, argparse._StoreFalseAction) and name != action.dest
            known.setdefault(name, (action.dest, negated))
    values = {str(key).replace("-", "_"): value for key, value in config.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        parser.error(f"--config {path}: unknown options {', '.join(unknown)}")
    defaults = {}
    for key, value in values.items():
        dest, negated = known[key]
        defaults[dest] = (not value) if negated else value
    return defaults


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
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
        child.add_argument("--config", metavar="FILE.yaml",
                           help="YAML file of option defaults for this command")
        module.add_arguments(child)
        child.set_defaults(_run=module.run)
        parsers[name] = child
    return parser, parsers


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        child = parsers[args.command]
        child.set_defaults(**_load_config(args.config, child))
        args = parser.parse_args(argv)
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
        return 2


def _reported_errors() -> tuple:
    """Errors that describe bad arguments or inputs: one line, no traceback (set
    WSSS_FAST_DEBUG=1 for it)."""
    from wsss_fast.io.run_state import ConfigConflict
    return (ValueError, OSError, ConfigConflict)
