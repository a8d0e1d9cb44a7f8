"""Chaos: ``extract`` and ``pseudo-label`` runs killed (SIGKILL or SIGTERM) at seeded random
moments, from interpreter startup to the last item, each kill followed by a rerun of the same
command; the run that finally completes must give the clean run's outputs bit for bit
(CAM arrays, label PNG bytes), with no temporary file left, no duplicated done entry in the
journal and no process of any attempt still alive."""

import json
import random
import signal
import subprocess
import time

import pytest

from tests.test_reliability_run import (assert_no_duplicated_done_entries, assert_same_cams,
                                        assert_same_files, cli_command, journal_lines,
                                        run_env, temp_files, wait_for_no_survivors,
                                        MODEL_FLAGS)
from wsss_fast.pipeline import SynthOptions, synth

KILLS = 10
IMAGES = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos") / "synth"
    return synth(SynthOptions(out=str(root), num_train=2, num_val=IMAGES, size=(64, 80),
                              seed=11, workers=0))


def command_args(command, data, cams, out):
    if command == "extract":
        return cli_command("extract", "--data", str(data), "--split", "val", *MODEL_FLAGS,
                           "--out", str(out), "--workers", "2", "--quiet")
    return cli_command("pseudo-label", "--data", str(data), "--split", "val", "--cams",
                       str(cams), "--out", str(out), "--rule", "confident", "--crf", "irn",
                       "--workers", "2", "--quiet")


def first_item_seconds(args, out, command, tag):
    """Run ``args`` to completion; seconds from its start to its first journaled item (the
    startup: interpreter, imports, model, workers)."""
    process = subprocess.Popen(args, env=run_env(tag), stderr=subprocess.PIPE, text=True)
    start, first = time.perf_counter(), None
    while process.poll() is None:
        if first is None and journal_lines(out, command):
            first = time.perf_counter() - start
        time.sleep(0.005)
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.returncode == 0, stderr[-3000:]
    return first if first is not None else time.perf_counter() - start


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    """Clean runs (the references) and their startup times on this machine now."""
    root = tmp_path_factory.mktemp("chaos_clean")
    startup = {"extract": first_item_seconds(command_args("extract", data, None, root / "cams"),
                                             root / "cams", "extract", "chaos-clean")}
    startup["pseudo-label"] = first_item_seconds(
        command_args("pseudo-label", data, root / "cams" / "cams", root / "labels"),
        root / "labels", "pseudo-label", "chaos-clean")
    assert not wait_for_no_survivors("chaos-clean")
    return root, startup


def kill_at(args, out, command, moment, signum, tag):
    """Start ``args`` and send ``signum`` at ``moment``: ``("startup", seconds after the
    start)`` or ``("item", k, seconds)``: that long after its k-th journaled item. Unless it
    ended first; returns (exit status, stderr)."""
    before = len(journal_lines(out, command))
    process = subprocess.Popen(args, env=run_env(tag), stderr=subprocess.PIPE, text=True)
    start = time.perf_counter()
    try:
        while process.poll() is None:
            if moment[0] == "startup":
                due = time.perf_counter() - start >= moment[1]
            else:
                due = len(journal_lines(out, command)) - before >= moment[1]
                if due:
                    time.sleep(moment[2])
            if due:
                process.send_signal(signum)
                break
            time.sleep(0.005)
        process.wait(timeout=600)   # a loaded 2-core machine starts interpreters slowly
        return process.returncode, process.stderr.read()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


@pytest.mark.parametrize("kills", [5, pytest.param(10, marks=pytest.mark.slow)])
@pytest.mark.parametrize("command", ["extract", "pseudo-label"])
def test_killed_runs_resume_to_the_clean_outputs(data, clean, tmp_path, command, kills):
    """``kills`` attempts per command (5 + 5 in the default suite, 10 + 10 in the slow one):
    about a third during startup, the others after a random number of finished items."""
    root, startup = clean
    out = tmp_path / "out"
    args = command_args(command, data, root / "cams" / "cams", out)
    rng = random.Random(f"chaos-{command}-{kills}")
    tag = f"chaos-{command}-{tmp_path.name}"
    history = []
    for attempt in range(kills):
        remaining = IMAGES - len(journal_lines(out, command))
        if remaining < 2 or rng.random() < 1 / 3:
            moment = ("startup", round(rng.uniform(0.0, startup[command]), 2))
        else:
            moment = ("item", rng.randint(1, remaining - 1), round(rng.uniform(0.0, 0.05), 3))
        signum = rng.choice([signal.SIGKILL, signal.SIGTERM])
        before = len(journal_lines(out, command))
        status, stderr = kill_at(args, out, command, moment, signum, tag)
        history.append({"at": moment, "signal": signal.Signals(signum).name, "status": status,
                        "journaled": len(journal_lines(out, command)) - before})
        assert not wait_for_no_survivors(tag), f"attempt {attempt}: processes outlived it"
        if status == 0:
            continue   # it finished before the signal
        if signum == signal.SIGKILL:
            assert status == -signal.SIGKILL, stderr[-3000:]
        else:   # handled once the CLI runs (143, one line), the default action before that
            assert status in (143, -signal.SIGTERM), stderr[-3000:]
            if status == 143:
                assert "interrupted by SIGTERM — rerun the same command to resume" in stderr
                assert "Traceback" not in stderr, stderr[-3000:]
                assert not temp_files(out)
    final = subprocess.run(args, env=run_env(tag), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"\nchaos {command}: startup {startup[command]:.1f} s; {json.dumps(history)}; "
          f"final: {final.stderr.strip()}")
    assert any(h["status"] != 0 for h in history), f"no attempt was killed: {history}"
    if command == "extract":
        assert_same_cams(out / "cams", root / "cams" / "cams")
    else:
        assert_same_files(out / "labels", root / "labels" / "labels")
    manifest = json.loads((out / f"manifest-{command}.json").read_text())
    assert manifest["counts"]["skipped"] == 0 and manifest["outputs_total"] == IMAGES
    assert len(journal_lines(out, command)) == IMAGES
    assert_no_duplicated_done_entries(out, command)
    assert not temp_files(out)
    assert not wait_for_no_survivors(tag)
