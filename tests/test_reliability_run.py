"""Reliability of whole runs: a failing item never stops a dataset run, non-finite CAMs are
never written nor used, the engine's memory budget (streaming, then skipping), one run at a time
per folder (two real processes), and SIGTERM/SIGINT stop a run cleanly (real subprocesses)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from wsss_fast.cli import main
from wsss_fast.engine import CamEngine, ImageTooLarge
from wsss_fast.engine.memory import MIB, pass_bytes
from wsss_fast.io.cam_files import load_cam_file
from wsss_fast.io.locks import RunLock
from wsss_fast.io.run_state import STATE_DIR, OutputNotWritable
from wsss_fast.pipeline import (EvaluateOptions, ExtractOptions, SynthOptions, evaluate, extract,
                                synth)
from wsss_fast.pipeline.pseudo_label import PseudoLabelOptions, pseudo_label
from wsss_fast.pipeline.refine import RefineOptions, refine

TINY = {"embed_dim": "32", "depth": "2", "num_heads": "2"}
MODEL_FLAGS = ["--model", "mctformer_v2", "--random-init", "--device", "cpu",
               *[arg for key, value in TINY.items() for arg in ("--model-arg", f"{key}={value}")]]


def extract_options(data, out, **extra) -> ExtractOptions:
    return ExtractOptions(data=str(data), split="val", model="mctformer_v2", random_init=True,
                          model_args=[f"{k}={v}" for k, v in TINY.items()], device="cpu",
                          out=str(out), workers=0, quiet=True, **extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability") / "synth"
    return synth(SynthOptions(out=str(root), num_train=2, num_val=6, size=(64, 80), seed=5,
                              workers=0))


@pytest.fixture(scope="module")
def clean_cams(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "cams"
    result = extract(extract_options(data, out))
    assert result.counts["done"] == 6
    return out / "cams"


def _val_ids(data):
    return (Path(data) / "ImageSets" / "Segmentation" / "val.txt").read_text().split()


def _skipped(result) -> dict:
    return {entry["id"]: entry["reason"] for entry in result.manifest["skipped"]}


def temp_files(folder) -> list:
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- isolation


def test_an_item_that_raises_is_skipped_and_the_run_goes_on(data, tmp_path, monkeypatch):
    ids = _val_ids(data)
    calls = []
    original = CamEngine.extract

    def failing_second(self, images, labels=None):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("the model broke on this image")
        return original(self, images, labels)

    monkeypatch.setattr(CamEngine, "extract", failing_second)
    result = extract(extract_options(data, tmp_path / "out"))
    bad = sorted(ids)[1]
    assert _skipped(result) == {bad: "RuntimeError: the model broke on this image"}
    assert result.counts["done"] == 5 and result.exit_status == 0
    assert json.loads(result.manifest_path.read_text())["counts"]["skipped"] == 1
    assert not (tmp_path / "out" / "cams" / f"{bad}.npy").exists()
    monkeypatch.setattr(CamEngine, "extract", original)
    again = extract(extract_options(data, tmp_path / "out"))     # the rerun does only that one
    assert again.counts == {"assigned": 6, "done": 1, "already_done": 5, "skipped": 0}


def test_a_label_job_that_raises_is_skipped_and_the_run_goes_on(data, clean_cams, tmp_path,
                                                               monkeypatch):
    from wsss_fast.postprocess import pseudo_label as rules
    bad = sorted(_val_ids(data))[2]
    original = rules.constant_background
    seen = []

    def failing_third(cams, keys, threshold):
        seen.append(1)
        if len(seen) == 3:
            raise ZeroDivisionError("no")
        return original(cams, keys, threshold)

    monkeypatch.setattr(rules, "constant_background", failing_third)
    result = pseudo_label(PseudoLabelOptions(data=str(data), split="val", cams=str(clean_cams),
                                             out=str(tmp_path / "labels"), workers=0,
                                             quiet=True))
    assert _skipped(result) == {bad: "ZeroDivisionError: no"}
    assert result.counts["done"] == 5 and result.manifest_path.exists()


def test_an_unwritable_output_stops_the_run_and_releases_its_lock(data, clean_cams, tmp_path,
                                                                  monkeypatch, capsys):
    from wsss_fast.data import images
    out = tmp_path / "labels"

    def read_only(path, label):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "write_label_png", read_only)
    options = PseudoLabelOptions(data=str(data), split="val", cams=str(clean_cams), out=str(out),
                                 workers=0, quiet=True)
    with pytest.raises(OutputNotWritable, match="cannot write .*: Permission denied"):
        pseudo_label(options)
    assert not (out / "manifest-pseudo-label.json").exists()
    with RunLock(out / STATE_DIR / "pseudo-label.rank0.lock"):   # released by the failed run
        pass
    status = main(["pseudo-label", "--data", str(data), "--split", "val", "--cams",
                   str(clean_cams), "--out", str(out), "--workers", "0", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0 and "Permission denied" in err, err


# ----------------------------------------------------------------------------- non-finite CAMs


def test_non_finite_cams_are_skipped_never_written(data, tmp_path, monkeypatch):
    original = CamEngine.extract
    calls = []

    def nan_for_the_first(self, images, labels=None):
        results = original(self, images, labels)
        calls.append(1)
        if len(calls) == 1:
            results[0].high_res[results[0].keys[0], 3, 5] = float("nan")
        return results

    monkeypatch.setattr(CamEngine, "extract", nan_for_the_first)
    result = extract(extract_options(data, tmp_path / "out"))
    first = sorted(_val_ids(data))[0]
    reasons = _skipped(result)
    assert list(reasons) == [first]
    assert "non-finite values in 'high_res' (1 of" in reasons[first]
    assert not (tmp_path / "out" / "cams" / f"{first}.npy").exists()
    assert result.counts["done"] == 5


def _poisoned_copy(clean_cams, tmp_path, item):
    """A copy of the CAM folder where ``item``'s maps hold an inf (written around the guard)."""
    cams = tmp_path / "poisoned"
    cams.mkdir()
    for path in clean_cams.glob("*.npy"):
        payload = np.load(path, allow_pickle=True).item()
        if path.stem == item:
            payload["high_res"] = payload["high_res"].copy()
            payload["high_res"][0, 0, 0] = np.inf
            payload["cam"] = payload["cam"].clone()
            payload["cam"][0, 1, 1] = float("nan")
        np.save(cams / path.name, payload, allow_pickle=True)
    return cams


def test_downstream_stages_refuse_non_finite_cam_files_per_item(data, clean_cams, tmp_path):
    bad = sorted(_val_ids(data))[3]
    cams = _poisoned_copy(clean_cams, tmp_path, bad)
    common = dict(data=str(data), split="val", cams=str(cams), workers=0, quiet=True)
    labels = pseudo_label(PseudoLabelOptions(out=str(tmp_path / "pl"), **common))
    walked = refine(RefineOptions(out=str(tmp_path / "rw"), device="cpu", **common))
    for result in (labels, walked):
        reasons = _skipped(result)
        assert list(reasons) == [bad] and "non-finite values in" in reasons[bad], reasons
        assert result.counts["done"] == 5
    scores = evaluate(EvaluateOptions(data=str(data), split="val", cams=str(cams), workers=0,
                                      out=str(tmp_path / "eval")))
    skipped = {entry["id"]: entry["reason"] for entry in scores.report["skipped"]}
    assert list(skipped) == [bad] and "non-finite values in" in skipped[bad]


# ----------------------------------------------------------------------------- memory budget


def _tiny_model():
    from wsss_fast.models.mctformer import mctformer_v2
    torch.manual_seed(3)
    return mctformer_v2(num_classes=20, embed_dim=32, depth=2, num_heads=2)


def _image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC))


def test_a_pass_over_the_budget_streams_with_the_same_cams():
    model = _tiny_model()
    kwargs = {"cls_layers": 3, "refine": True, "attention_type": "fused"}
    dense = pass_bytes(model, 2, 256, 320, kwargs, streaming=False)
    streaming = pass_bytes(model, 2, 256, 320, kwargs, streaming=True)
    assert streaming < dense
    budget = (dense + streaming) / 2 / MIB                    # dense does not fit, streaming does
    image, label = _image(256, 320), np.eye(20, dtype=np.float32)[[3, 7]].sum(0)
    reference = CamEngine(model, "mctformer_v2", max_memory_mib=1e6)
    capped = CamEngine(model, "mctformer_v2", max_memory_mib=budget)
    assert [p.affinity for p in reference.check_memory((320, 256))] == ["dense"]
    assert [p.affinity for p in capped.check_memory((320, 256))] == ["streaming"]
    calls = []
    original = model.cam_maps
    model.cam_maps = lambda x, **kw: calls.append(kw["affinity"]) or original(x, **kw)
    torch.testing.assert_close(capped(image, label).high_res, reference(image, label).high_res,
                               rtol=0, atol=1e-4)
    assert calls == ["streaming", "dense"]


def test_an_image_over_the_budget_even_streaming_is_skipped_and_the_next_ones_done(tmp_path):
    model = _tiny_model()
    kwargs = {"cls_layers": 3, "refine": True, "attention_type": "fused"}
    big = pass_bytes(model, 2, 1024, 1536, kwargs, streaming=True)
    small = pass_bytes(model, 2, 256, 320, kwargs, streaming=False)
    budget_mib = (small + big) / 2 / MIB
    with pytest.raises(ImageTooLarge):
        CamEngine(model, "mctformer_v2", max_memory_mib=budget_mib).check_memory((1536, 1024))
    images = tmp_path / "images"
    images.mkdir()
    for name, (height, width) in {"a": (256, 320), "b": (1024, 1536), "c": (256, 320),
                                  "d": (192, 256)}.items():
        PIL.Image.fromarray(_image(height, width, seed=len(name))).save(images / f"{name}.png")
    (tmp_path / "labels.json").write_text(json.dumps({k: ["cat"] for k in "abcd"}))
    result = extract(ExtractOptions(
        data=str(images), labels=str(tmp_path / "labels.json"), model="mctformer_v2",
        random_init=True, model_args=[f"{k}={v}" for k, v in TINY.items()], device="cpu",
        out=str(tmp_path / "out"), workers=0, quiet=True, scales=(1.0,),
        max_memory_mib=budget_mib, batch_size=2))
    reasons = _skipped(result)
    assert list(reasons) == ["b"]
    gb = f"{big / 1e9:.2g}"
    assert reasons["b"] == (f"image 1536×1024 is too large (1.6 MP, needs ~{gb} GB of a "
                            f"{budget_mib * MIB / 1e9:.2g} GB budget; raise --max-memory-mib "
                            f"or downscale)")
    assert result.counts["done"] == 3
    assert sorted(p.stem for p in (tmp_path / "out" / "cams").glob("*.npy")) == ["a", "c", "d"]


def test_max_memory_mib_must_be_positive(data, tmp_path, capsys):
    status = main(["extract", "--data", str(data), "--split", "val", *MODEL_FLAGS, "--out",
                   str(tmp_path / "o"), "--max-memory-mib", "0", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "--max-memory-mib" in err and "> 0" in err and "'0'" in err


# ----------------------------------------------------------------------------- subprocesses


def cli_command(command: str, *args: str) -> list:
    return [sys.executable, "-m", "wsss_fast", command, *args]


def run_env(tag: str) -> dict:
    """The environment of a run under test: one thread, and a marker inherited by every process
    it starts (so that survivors can be found in /proc after it exited)."""
    return dict(os.environ, OMP_NUM_THREADS="1", WSSS_FAST_TEST_RUN=tag,
                PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH")])))


def processes_tagged(tag: str) -> set:
    """Live (non-zombie) processes whose environment carries ``WSSS_FAST_TEST_RUN=tag``."""
    marker = f"WSSS_FAST_TEST_RUN={tag}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if marker not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.add(int(entry))
    return found


def wait_for_no_survivors(tag: str, seconds: float = 10.0) -> set:
    deadline = time.time() + seconds
    while processes_tagged(tag) and time.time() < deadline:
        time.sleep(0.05)
    survivors = processes_tagged(tag)
    for pid in survivors:   # a failing test must not leak them
        os.kill(pid, signal.SIGKILL)
    return survivors


def journal_lines(out, command: str) -> list:
    """The done entries of rank 0's journal (a line torn by a SIGKILL is not one)."""
    path = Path(out) / STATE_DIR / f"{command}.rank0.jsonl"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def lock_holder(out, command: str):
    try:
        return json.loads((Path(out) / STATE_DIR / f"{command}.rank0.lock").read_text()).get("pid")
    except (OSError, ValueError):
        return None


def wait_until(condition, process, seconds: float = 120.0, step: float = 0.005) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(step)
    return False


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A larger synthetic split (24 images) for runs that are to be stopped half-way."""
    root = tmp_path_factory.mktemp("many") / "synth"
    return synth(SynthOptions(out=str(root), num_train=2, num_val=24, size=(64, 80), seed=9,
                              workers=0))


def test_a_second_concurrent_run_is_refused_and_a_dead_ones_lock_taken_over(many, tmp_path):
    out = tmp_path / "cams"
    args = cli_command("extract", "--data", str(many), "--split", "val", *MODEL_FLAGS,
                       "--out", str(out), "--workers", "0", "--quiet")
    first = subprocess.Popen(args, env=run_env("lock"), stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: lock_holder(out, "extract") == first.pid, first), \
            first.stderr.read()
        first.send_signal(signal.SIGSTOP)           # holds the lock, mid-run, until continued
        second = subprocess.run(args, env=run_env("lock"), capture_output=True, text=True,
                                timeout=120)
        line = second.stderr.strip()
        assert second.returncode == 2 and "\n" not in line, second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "already running" in line
        first.send_signal(signal.SIGKILL)           # dies holding it: the next run takes over
        first.wait(timeout=30)
    finally:
        first.kill()
        first.wait()
    assert lock_holder(out, "extract") == first.pid
    third = subprocess.run(args, env=run_env("lock"), capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr
    assert len(list((out / "cams").glob("*.npy"))) == 24


def test_train_holds_the_lock_of_its_out(data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from wsss_fast.io.locks import RunLock\n"
        "lock = RunLock(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"), str(out / STATE_DIR / "train.rank0.lock")],
        stdout=subprocess.PIPE, text=True, env=run_env("train-lock"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        status = main(["train", "--method", "mctformer_v2", "--data", str(data), "--out",
                       str(out), "--max-steps", "1", "--workers", "0", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert status == 2 and f"pid {holder.pid} on {socket.gethostname()}" in err, err
        assert "\n" not in err and not (out / "checkpoint.pth").exists()
    finally:
        holder.kill()
        holder.wait()


def _arrays(cams_dir) -> dict:
    arrays = {}
    for path in sorted(Path(cams_dir).glob("*.npy")):
        record = load_cam_file(path)
        arrays[path.stem] = (record.keys, record.high_res, record.low_res)
    return arrays


def assert_same_cams(actual_dir, expected_dir):
    actual, expected = _arrays(actual_dir), _arrays(expected_dir)
    assert sorted(actual) == sorted(expected)
    for item, (keys, high, low) in expected.items():
        assert np.array_equal(actual[item][0], keys), item
        assert np.array_equal(actual[item][1], high), item
        assert np.array_equal(actual[item][2], low), item


def assert_same_files(actual_dir, expected_dir, pattern="*.png"):
    actual = {p.relative_to(actual_dir): p.read_bytes() for p in Path(actual_dir).rglob(pattern)}
    expected = {p.relative_to(expected_dir): p.read_bytes()
                for p in Path(expected_dir).rglob(pattern)}
    assert sorted(actual) == sorted(expected)
    assert all(actual[name] == expected[name] for name in expected)


def assert_no_duplicated_done_entries(out, command):
    ids = [entry["id"] for entry in journal_lines(out, command)]
    assert len(ids) == len(set(ids)), f"duplicated done entries in {command}'s journal"


@pytest.fixture(scope="module")
def many_clean(many, tmp_path_factory):
    """Clean runs of extract and pseudo-label (CRF) over ``many``: the references."""
    root = tmp_path_factory.mktemp("many_clean")
    assert main(["extract", "--data", str(many), "--split", "val", *MODEL_FLAGS, "--out",
                 str(root / "cams"), "--workers", "0", "--quiet"]) == 0
    assert main(["pseudo-label", "--data", str(many), "--split", "val", "--cams",
                 str(root / "cams" / "cams"), "--out", str(root / "labels"), "--crf", "irn",
                 "--workers", "0", "--quiet"]) == 0
    return root


def stage_args(command, many, root, out):
    if command == "extract":
        return cli_command("extract", "--data", str(many), "--split", "val", *MODEL_FLAGS,
                           "--out", str(out), "--workers", "2", "--quiet")
    return cli_command("pseudo-label", "--data", str(many), "--split", "val", "--cams",
                       str(root / "cams" / "cams"), "--out", str(out), "--crf", "irn",
                       "--workers", "2", "--quiet")


@pytest.mark.parametrize("command,signum", [
    ("extract", signal.SIGTERM), ("pseudo-label", signal.SIGTERM),
    pytest.param("pseudo-label", signal.SIGINT, marks=pytest.mark.slow)])   # SIGTERM's path
def test_a_signal_stops_a_run_cleanly_and_the_rerun_completes_it(many, many_clean, tmp_path,
                                                                 command, signum):
    out = tmp_path / "out"
    tag = f"signal-{command}-{signum}-{os.getpid()}"
    args = stage_args(command, many, many_clean, out)
    process = subprocess.Popen(args, env=run_env(tag), stderr=subprocess.PIPE, text=True)
    try:
        started = wait_until(lambda: len(journal_lines(out, command)) >= 2, process)
        process.send_signal(signal.SIGSTOP)         # freeze it mid-run to check it is
        done_before = len(journal_lines(out, command))
        assert started and done_before < 24, "the run ended before it could be stopped"
        process.send_signal(signum)
        process.send_signal(signal.SIGCONT)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    stderr = process.stderr.read()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert f"wsss-fast {command}: interrupted by {name} — rerun the same command to resume" \
        in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not wait_for_no_survivors(tag), "processes outlived the interrupted run"
    assert not temp_files(out)
    kept = len(journal_lines(out, command))
    assert kept >= done_before
    assert not (out / f"manifest-{command}.json").exists()
    rerun = subprocess.run(args, env=run_env(tag), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    manifest = json.loads((out / f"manifest-{command}.json").read_text())
    assert manifest["counts"]["already_done"] >= kept - 1 and manifest["counts"]["skipped"] == 0
    if command == "extract":
        assert_same_cams(out / "cams", many_clean / "cams" / "cams")
    else:
        assert_same_files(out / "labels", many_clean / "labels" / "labels")
    assert_no_duplicated_done_entries(out, command)
    assert not wait_for_no_survivors(tag)


def test_an_interrupt_inside_a_deferred_block_is_raised_at_its_end():
    from wsss_fast.io.interrupts import Interrupted, deferred_interrupts, handle_interrupts
    reached = []
    with pytest.raises(Interrupted) as stop:
        with handle_interrupts():
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                reached.append("end of the block")
            reached.append("after the block")
    assert reached == ["end of the block"] and stop.value.exit_status == 143


def test_the_budget_estimate_covers_every_model_family():
    from wsss_fast.models.conformer import transcam_small
    from wsss_fast.models.resnet_cam import resnet50_cam
    from wsss_fast.engine.memory import plan_pass
    for model, kwargs in ((transcam_small(), {}), (resnet50_cam(num_classes=20), {}),
                          (_tiny_model(), {"refine": True})):
        small = plan_pass(model, 2, 256, 256, kwargs, budget_mib=1e6)
        large = plan_pass(model, 2, 512, 512, kwargs, budget_mib=1e6)
        assert 0 < small.bytes < large.bytes, type(model).__name__
