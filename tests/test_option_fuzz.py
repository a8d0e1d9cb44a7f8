"""Option fuzzer: every option of every subcommand, read from the real parsers, gets a seeded
sample of bad values on the command line and in a ``--config`` YAML file. Each must be refused
before any work: exit status 2, one line on stderr naming the option, no traceback, nothing
written to ``--out``. Good values must still parse (no false refusals), and options built in
Python get the same checks (``option_problems``).

A new option is fuzzed automatically from its check; a new kind of check needs its bad and good
values in ``BAD_TEXT`` / ``GOOD_TEXT`` below (``test_every_value_option_has_a_known_check``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import random
import subprocess
import sys
import typing

import pytest
import yaml

from wsss_fast.cli import COMMANDS, build_parser, main
from wsss_fast.options import Device, KeyValue, Number, Text, flag_of, option_problems
from wsss_fast.pipeline import (EvaluateOptions, ExtractOptions, PrototypesOptions,
                                PseudoLabelOptions, RefineOptions, SynthOptions, TrainConfig)
from wsss_fast.pipeline.evaluate import check_thresholds

SEED = 12
OPTIONS_OF = {"extract": ExtractOptions, "pseudo-label": PseudoLabelOptions,
              "refine": RefineOptions, "evaluate": EvaluateOptions, "prototypes": PrototypesOptions,
              "synth": SynthOptions, "train": TrainConfig}
UNIVERSAL_BAD = ["", "abc", "nan", "inf", "-inf", "1e400", "1.5"]

# Bad and good command-line values of each kind of check (Number's follow from its bounds).
BAD_TEXT = {
    Text: ["", "   "],
    Device: ["", "gpu", "cuda:x", "cuda:-1", "cpu0", "1.5"],
    KeyValue: ["", "abc", "=1", " =1", "k=[1,"],
    type(check_thresholds): ["", "abc", "0:1:0", "0:1:-0.1", "1:0:0.1", "0:1", "0:nan:0.1",
                             "0:inf:0.1", "0,2", "0.5,0.1", "0:1:1e-9", "0:1e400:0.1",
                             "-0.1,0.2"],
}
GOOD_TEXT = {
    Text: ["x", "some/path.yaml"],
    Device: ["cpu", "auto", "cuda:1"],
    KeyValue: ["num_heads=2", "sizes=[1, 2]", "name=abc"],
    type(check_thresholds): ["0:0.6:0.01", "0.1,0.2,0.5", "0.3"],
}


def _number_bad(check: Number) -> list[str]:
    bad = list(UNIVERSAL_BAD)
    if check.integer:
        bad += ["2.0", "1e3", "0x10", "true", "1" + "0" * 40]
    if check.minimum is not None:
        bad.append(repr(check.minimum if check.above_minimum else
                        check.minimum - (1 if check.integer else 0.5)))
    if check.maximum is not None:
        bad.append(str(int(check.maximum) + 1) if check.integer else repr(check.maximum * 2 + 1))
    return [v for v in bad if not _accepts(check, v)]


def _number_good(check: Number) -> list[str]:
    low = check.minimum if check.minimum is not None else -3
    high = check.maximum if check.maximum is not None else low + 10
    if check.integer:
        return [str(int(low)), str(int(high)), f" {int(low + high) // 2} "]
    inside = (low + high) / 2
    return [repr(inside), f"{inside:e}", *([] if check.above_minimum else [repr(float(low))])]


def _accepts(check, text) -> bool:
    try:
        check(text)
        return True
    except ValueError:
        return False


@functools.lru_cache(maxsize=None)
def subparsers() -> dict:
    return build_parser()[1]


def value_options():
    """``[(command, action)]`` of every option that takes a value, from the real parsers."""
    return [(command, action) for command, parser in subparsers().items()
            for action in parser._actions
            if action.option_strings and action.nargs != 0 and action.dest != "help"]


def flag_options():
    return [(command, action) for command, parser in subparsers().items()
            for action in parser._actions
            if action.option_strings and action.nargs == 0 and action.dest != "help"]


def check_of(action):
    return getattr(action.type, "check", None)


def bad_texts(action) -> list[str]:
    check = check_of(action)
    if action.choices is not None:
        bad = ["bogus", "", f"{next(iter(action.choices))}x"]
        if check is not None:
            bad += [v for v in _bad_of(check) if v not in action.choices]
        return bad
    return _bad_of(check)


def _bad_of(check) -> list[str]:
    if isinstance(check, Number):
        return _number_bad(check)
    return list(BAD_TEXT[type(check)])


def good_texts(action) -> list[str]:
    if action.choices is not None:
        return [str(c) for c in list(action.choices)[:3]]
    check = check_of(action)
    if isinstance(check, Number):
        return _number_good(check)
    return list(GOOD_TEXT[type(check)])


def argv_with(action, value: str) -> list[str]:
    """The tokens giving ``value`` to ``action``: with good values around it for a list, with
    ``=`` when the value would look like a flag."""
    flag = action.option_strings[-1]
    count = action.nargs if isinstance(action.nargs, int) else 1
    values = good_texts(action)[:1] * (count - 1) + [value]
    if value.startswith("-") and count == 1:
        return [f"{flag}={value}"]
    return [flag, *values]


def assert_refused(code, err: str, *names: str, out=None):
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert all(name in lines[0] for name in names), (names, lines[0])
    if out is not None:
        assert not os.path.exists(out), f"{out} was created"


def out_argv(command, out) -> list[str]:
    has_out = any("--out" in a.option_strings for a in subparsers()[command]._actions)
    return ["--out", str(out)] if has_out else []


def test_every_subcommand_and_value_option_is_fuzzed():
    options = value_options()
    assert {command for command, _ in options} == set(COMMANDS)
    assert len(options) > 100


def test_every_value_option_has_a_known_check():
    """No option reaches the run unchecked: each has a check (or fixed choices) that the fuzzer
    knows bad and good values of."""
    unknown = [(command, action.option_strings[-1]) for command, action in value_options()
               if action.choices is None and not isinstance(check_of(action), Number)
               and type(check_of(action)) not in BAD_TEXT]
    assert not unknown, f"options without a known check (add a check, or its values here): " \
                        f"{unknown}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # demo's default --out is relative
    return tmp_path


def test_bad_command_line_values_are_refused_up_front(in_tmp, capsys):
    rng = random.Random(SEED)
    tried = 0
    for index, (command, action) in enumerate(value_options()):
        pool = bad_texts(action)
        assert pool, (command, action.option_strings)
        for value in rng.sample(pool, min(2, len(pool))):
            out = in_tmp / f"out{index}"
            argv = [command, *out_argv(command, out), *argv_with(action, value)]
            code = main(argv)
            flag = action.option_strings[-1]
            err = capsys.readouterr().err
            assert_refused(code, err, flag, out=out)
            if value.strip() and not value.startswith("-"):
                assert repr(value) in err or value in err, (argv, err)   # the value is named
            tried += 1
    assert tried > 250


def test_good_command_line_values_parse(capsys):
    """No false refusals: each option's good values parse, and the options dataclass built from
    them (what the stage receives) has no problems."""
    parsers = subparsers()
    for command, action in value_options():
        for value in good_texts(action):
            argv = argv_with(action, value)
            args = parsers[command].parse_args(argv)
            assert getattr(args, action.dest) is not None, argv
            if command in OPTIONS_OF and action.dest in {
                    f.name for f in dataclasses.fields(OPTIONS_OF[command])}:
                given = {k: v for k, v in vars(args).items()
                         if k in {f.name for f in dataclasses.fields(OPTIONS_OF[command])}}
                options = OPTIONS_OF[command](**given)
                assert option_problems(options) == [], (argv, option_problems(options))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv,dest,expected", [
    (["extract", "--scales", "0.5", "1", "1.5e0"], "scales", [0.5, 1.0, 1.5]),
    (["extract", "--workers", "+3"], "workers", 3),
    (["train", "--lr", "5e-4"], "lr", 5e-4),
    (["train", "--clip-grad", "0"], "clip_grad", 0.0),
    (["evaluate", "--thresholds", "0:0.6:0.01"], "thresholds", "0:0.6:0.01"),
    (["pseudo-label", "--threshold", "1"], "threshold", 1.0),
    (["synth", "--size", "64", "96"], "size", [64, 96]),
    (["refine", "--device", "cuda:0"], "device", "cuda:0"),
])
def test_typical_values_parse_to_their_types(argv, dest, expected):
    parsers = subparsers()
    value = getattr(parsers[argv[0]].parse_args(argv[1:]), dest)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("argv,config,name", [
    (["extract", "--scales", "0"], None, "--scales"),
    (["extract", "--scales", "1", "-1"], None, "--scales"),
    (["extract", "--scales", "nan"], None, "--scales"),
    (["extract", "--scales", "inf"], None, "--scales"),
    (["evaluate", "--thresholds", "0:1:0"], None, "--thresholds"),
    (["pseudo-label", "--threshold", "1.5"], None, "--threshold"),
    (["refine", "--beta", "0"], None, "--beta"),
    (["train", "--lr", "0"], None, "--lr"),
    (["train", "--epochs", "1.5"], None, "--epochs"),
    (["extract"], "scales: [abc, 1]", "scales"),
    (["extract"], "dtype: fp64", "dtype"),
    (["extract"], "workers: 1.5", "workers"),
    (["train"], "workers: true", "workers"),
    (["train"], "lr: [0.1]", "lr"),
    (["evaluate"], "thresholds: 0:1:0", "thresholds"),
])
def test_the_examples_of_issue_12_are_refused(in_tmp, capsys, argv, config, name):
    """Independent of the checks declared on the fields: these values must be refused."""
    out = in_tmp / "out"
    if config is not None:
        (in_tmp / "run.yaml").write_text(config + "\n")
        argv = argv + ["--config", str(in_tmp / "run.yaml")]
    assert_refused(main(argv + ["--out", str(out)]), capsys.readouterr().err, name, out=out)


def _yaml_bad(action) -> list:
    """Bad YAML values of ``action``: the wrong kind, and its bad texts as YAML scalars."""
    check = check_of(action)
    if action.nargs == 0:
        return ["yes please", 1, [True], {"a": 1}]
    takes_list = isinstance(action, argparse._AppendAction) or action.nargs not in (None, "?")
    bad = [{"": 1}, ["abc"], [[1, 2]], 3] if isinstance(check, KeyValue) else [{"a": 1}]
    if not takes_list:
        bad += [[good_texts(action)[0]], True]
    texts = [t for t in bad_texts(action) if t.strip()]
    bad += [yaml.safe_load(t) for t in texts[:4] if _yaml_scalar(t)]
    if isinstance(action.nargs, int):
        bad.append([good_texts(action)[0]] * (action.nargs + 1))
    if isinstance(check, Number):
        bad += [math.nan, math.inf, -1e400]
    return bad


def _yaml_scalar(text: str) -> bool:
    try:
        return not isinstance(yaml.safe_load(text), (list, dict, type(None)))
    except yaml.YAMLError:
        return False


def test_bad_yaml_values_are_refused_naming_the_key(in_tmp, capsys):
    rng = random.Random(SEED)
    config = in_tmp / "run.yaml"
    tried = 0
    for index, (command, action) in enumerate(value_options() + flag_options()):
        if action.dest == "config":
            continue
        key = action.option_strings[-1].lstrip("-").replace("-", "_")
        for value in rng.sample(_yaml_bad(action), min(2, len(_yaml_bad(action)))):
            out = in_tmp / f"yaml_out{index}"
            config.write_text(yaml.safe_dump({key: value}))
            code = main([command, "--config", str(config), *out_argv(command, out)])
            assert_refused(code, capsys.readouterr().err, str(config), f": {key}:", out=out)
            tried += 1
    assert tried > 200


def test_command_line_value_wins_over_yaml_and_yaml_goes_through_the_types(in_tmp):
    _, parsers = build_parser()
    config = in_tmp / "run.yaml"
    config.write_text("lr: 5e-4\nworkers: 0\nresize_long: [64, 96]\nno_color_jitter: true\n"
                      "model_args: {depth: 2, name: 'true'}\nmethod: mctformer_v2\n")
    from wsss_fast.cli import _load_config
    train = parsers["train"]
    train.set_defaults(**_load_config(str(config), train))
    args = train.parse_args(["--workers", "2"])
    assert args.lr == 5e-4 and args.workers == 2 and args.resize_long == [64, 96]
    assert args.color_jitter is False and args.method == "mctformer_v2"
    config_ = TrainConfig(**{k: v for k, v in vars(args).items()
                             if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    assert config_.model_args == {"depth": 2, "name": "true"}
    assert config_.resize_long == (64, 96) and option_problems(config_) == []


def _kind(hint):
    """A field annotation's container or scalar type, Optional removed."""
    if typing.get_origin(hint) is typing.Union:
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    return typing.get_origin(hint) or hint


def _bad_python_values(field, kind) -> list:
    check = field.metadata.get("check")
    if kind is bool:
        return ["yes", 1] if check is None else ["yes", (1.0, 2.0), (0.1, 0.1, 0.1, 0.9)]
    if kind in (tuple, list):
        return ["1.0", (math.nan,), ("abc",), {"a": 1}]
    if kind is dict:
        return [{1: 2}, {"": 1}]
    if isinstance(check, Number):
        bad = [math.nan, math.inf, "abc", True, [1]]
        if check.integer:
            bad.append(1.5)
        if check.minimum is not None:
            bad.append(check.minimum - 1)
        return bad
    if field.metadata.get("choices") and not callable(field.metadata["choices"]):
        return ["bogus", 3]
    return ["", ["a"], 3]


@pytest.mark.parametrize("options_type", sorted(set(OPTIONS_OF.values()), key=str))
def test_options_built_in_python_get_the_same_checks(options_type):
    assert option_problems(options_type()) == []     # the defaults are valid
    hints = typing.get_type_hints(options_type)
    for field in dataclasses.fields(options_type):
        kind = _kind(hints[field.name])
        # A flag's value is named by the field (the flag --no-flip says the opposite).
        name = field.name if kind is bool else flag_of(options_type, field.name)
        for value in _bad_python_values(field, kind):
            options = options_type()
            setattr(options, field.name, value)
            problems = option_problems(options)
            assert len(problems) == 1 and name in problems[0], (field.name, value, problems)


def test_cross_option_errors_are_one_line_and_write_nothing(in_tmp, capsys):
    out = in_tmp / "never"
    cases = [
        (["pseudo-label", "--data", "d", "--cams", "c", "--rule", "confident", "--crf", "none"],
         "--rule confident"),
        (["refine", "--data", "d", "--cams", "c", "--preset", "psa", "--bg-threshold", "0.2"],
         "--bg-threshold"),
        (["train", "--method", "mctformer_v2", "--data", "d", "--resume", "--overwrite"],
         "resume"),
        (["train", "--method", "mctformer_v2", "--data", "d", "--resize-long", "96", "64"],
         "--resize-long"),
        (["extract", "--data", str(in_tmp), "--model", "mctformer_v2", "--method", "lpcam",
          "--random-init", "--device", "cpu"], "--prototypes"),
    ]
    for argv, name in cases:
        assert_refused(main(argv + ["--out", str(out)]), capsys.readouterr().err, name, out=out)


def test_refusals_through_python_m_wsss_fast(tmp_path):
    """The same as a user sees it: a subprocess per command line, run side by side."""
    config = tmp_path / "run.yaml"
    config.write_text("thresholds: '0:1:0'\n")
    runs = [(["extract", "--scales", "nan", "--out", str(tmp_path / "a")], "--scales"),
            (["evaluate", "--config", str(config), "--out", str(tmp_path / "b")], "thresholds")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, "-m", "wsss_fast", *argv], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for argv, _ in runs]
    for process, (argv, name) in zip(processes, runs):
        stdout, stderr = process.communicate(timeout=120)
        assert_refused(process.returncode, stderr, name, out=argv[-1])
        assert stdout == ""
