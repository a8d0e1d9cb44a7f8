"""Reliability under hostile use, at the IO level: broken checkpoints and CAM files, huge images,
journals that must not adopt stale outputs, one run per output folder, signals and orphaned
workers, full disks."""

import errno
import fcntl
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc

import cv2
import numpy as np
import pytest
import torch

from wsss_fast.data import images
from wsss_fast.data.images import ImageDecodeError, image_size, read_image, read_label_png
from wsss_fast.io import atomic
from wsss_fast.io.atomic import DiskFull, atomic_write, atomic_write_bytes, atomic_write_group
from wsss_fast.io.cam_files import (CamFileError, NonFiniteCams, check_finite_cams, load_cam_file,
                                    save_cam_file)
from wsss_fast.io.checksums import bytes_checksum, file_checksum
from wsss_fast.io.interrupts import Interrupted, handle_interrupts
from wsss_fast.io.locks import RunLock, RunLocked
from wsss_fast.io.run_state import STATE_DIR, ConfigConflict, RunState
from wsss_fast.models.checkpoint import (CheckpointError, CheckpointMismatch, load_checkpoint,
                                         read_state_dict, read_torch_file, torch_file_bytes)

# ----------------------------------------------------------------------------- checkpoints


class _NotATensor:
    pass


def _one_line_about(error, path):
    text = str(error.value)
    assert "\n" not in text and str(path) in text, text
    assert "weights_only" not in text and "Traceback" not in text, text
    return text


def test_broken_torch_files_give_one_line_naming_file_and_problem(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(64, 64)}}, good)
    data = good.read_bytes()
    cases = {
        "truncated.pth": (data[: len(data) // 2], "truncated checkpoint"),
        "cut_tail.pth": (data[:-5], "truncated checkpoint"),
        "empty.pth": (b"", "empty file"),
        "random.pth": (np.random.default_rng(0).bytes(4096), "not a torch file"),
        "text.pth": (b"version https://git-lfs.github.com/spec/v1\n", "not a torch file"),
    }
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as error:
            read_state_dict(tmp_path / name)
        assert problem in _one_line_about(error, tmp_path / name)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": _NotATensor()}, unsafe)
    with pytest.raises(CheckpointError, match=r"cannot be read safely as a checkpoint \(it "
                                              r"holds a pickled .*_NotATensor object; only") as error:
        read_state_dict(unsafe)
    _one_line_about(error, unsafe)
    with pytest.raises(CheckpointError, match="is a directory") as error:
        read_state_dict(tmp_path)
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="must be a dict, got list"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="no tensors in the checkpoint"):
        read_state_dict(tmp_path / "meta.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(tmp_path / "missing.pth")
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(legacy)["w"], torch.ones(3))
    (tmp_path / "legacy_cut.pth").write_bytes(legacy.read_bytes()[:150])
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint"):
        read_state_dict(tmp_path / "legacy_cut.pth")


def test_truncated_or_foreign_training_state_is_a_checkpoint_error(tmp_path):
    state = tmp_path / "train_state.pth"
    torch.save({"config": {}, "model": {"w": torch.ones(128, 128)}, "optimizer": {}}, state)
    required = ("config", "model", "optimizer")
    assert set(read_torch_file(state, "training state", required)) == set(required)
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="not a training state .missing 'config', "
                                              "'optimizer'; it holds 'model'"):
        read_torch_file(tmp_path / "checkpoint.pth", "training state", required)
    with open(state, "r+b") as handle:
        handle.truncate(state.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="train_state.pth: truncated training state"):
        read_torch_file(state, "training state", required)


def test_non_finite_weights_are_refused_naming_first_key_and_count(tmp_path):
    weights = {"blocks.0.weight": torch.ones(4, 4), "blocks.1.weight": torch.ones(10),
               "head.weight": torch.ones(3), "steps": torch.tensor([5])}
    weights["blocks.1.weight"][[2, 7]] = float("nan")
    weights["head.weight"][0] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save({"model": weights}, path)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    text = _one_line_about(error, path)
    assert "'blocks.1.weight' has 2 NaN/inf values of 10 and 1 more tensor" in text
    assert read_state_dict(path, check_finite=False)["blocks.1.weight"].isnan().sum() == 2
    model = torch.nn.Linear(4, 4)
    broken = {k: v.clone() for k, v in model.state_dict().items()}
    broken["bias"][1] = float("-inf")
    with pytest.raises(CheckpointError, match="'bias' has 1 NaN/inf values of 4"):
        load_checkpoint(model, broken)
    # a mismatch is still a CheckpointMismatch, which is a CheckpointError
    with pytest.raises(CheckpointMismatch, match="missing keys"):
        load_checkpoint(model, {"weight": torch.ones(4, 4)})


# ----------------------------------------------------------------------------- CAM files


def test_non_finite_cams_are_refused_on_read_and_write(tmp_path):
    high = np.ones((2, 4, 8), np.float32)
    high[1, 0, :3] = np.nan
    payload = {"keys": np.array([0, 3]), "cam": torch.ones(2, 1, 2), "high_res": high}
    path = tmp_path / "nan.npy"
    np.save(path, payload, allow_pickle=True)
    with pytest.raises(NonFiniteCams, match=r"nan.npy: non-finite values in 'high_res' "
                                            r"\(3 of 64\)"):
        load_cam_file(path)
    assert issubclass(NonFiniteCams, CamFileError)
    with pytest.raises(NonFiniteCams, match=r"out.npy: non-finite values in 'high_res'"):
        save_cam_file(tmp_path / "out.npy", [0, 3], high, np.ones((2, 1, 2)))
    assert not (tmp_path / "out.npy").exists()
    low = torch.ones(1, 2, 2)
    low[0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteCams, match=r"img7: non-finite values in 'low_res' \(1 of 4\)"):
        check_finite_cams("img7", high_res=torch.ones(1, 8, 8), low_res=low)
    check_finite_cams("img7", high_res=np.zeros((0, 5, 5)), low_res=None)   # no classes: fine
    with pytest.raises(NonFiniteCams, match="'high_res'"):   # beyond float16's range: inf
        save_cam_file(tmp_path / "big.npy", [0], np.full((1, 2, 2), 1e6), np.ones((1, 1, 1)),
                      fp16=True)


# ----------------------------------------------------------------------------- images


def flat_gray_jpeg(width, height):
    """A valid baseline JPEG of any size, of a few hundred KB even at 12000×12000: one grey
    channel whose 8×8 blocks all code "DC unchanged, end of block" in 2 bits."""
    def segment(marker, payload):
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload
    blocks = -(-width // 8) * -(-height // 8)
    one_code = bytes([1] + [0] * 15) + b"\x00"   # a single 1-bit code, for symbol 0
    return (b"\xff\xd8" + segment(0xDB, b"\x00" + b"\x01" * 64)
            + segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
            + segment(0xC4, b"\x00" + one_code) + segment(0xC4, b"\x10" + one_code)
            + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
            + bytes(-(-2 * blocks // 8)) + b"\xff\xd9")


class _DecoderCalled(Exception):
    pass


def _no_decoding(*args, **kwargs):
    raise _DecoderCalled


def test_huge_jpeg_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    small = tmp_path / "small.jpg"
    small.write_bytes(flat_gray_jpeg(40, 24))
    np.testing.assert_array_equal(read_image(small), np.full((24, 40, 3), 128, np.uint8))
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(flat_gray_jpeg(12000, 12000))
    reduced = cv2.imdecode(np.fromfile(huge, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    assert reduced.shape == (1500, 1500)      # a real 12000×12000 JPEG (decoded at 1/8 here)
    monkeypatch.setattr(images.cv2, "imdecode", _no_decoding)
    monkeypatch.delenv("WSSS_FAST_MAX_IMAGE_PIXELS", raising=False)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageDecodeError) as error:
            read_image(huge)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value) == (
        f"{huge}: too large: 144.0 MP (12000×12000) exceeds the 50 MP limit; set "
        f"WSSS_FAST_MAX_IMAGE_PIXELS (pixels, 0 = no limit) to read it")
    assert seconds < 0.5 and peak < 8 * huge.stat().st_size   # the file's bytes, no pixels
    with pytest.raises(ImageDecodeError, match=r"exceeds the 100 MP limit"):
        read_image(huge, max_pixels=100_000_000)
    # raised limits reach the decoder (stubbed here: it would allocate 430 MB)
    with pytest.raises(_DecoderCalled):
        read_image(huge, max_pixels=0)
    monkeypatch.setenv("WSSS_FAST_MAX_IMAGE_PIXELS", "2e8")
    with pytest.raises(_DecoderCalled):
        read_image(huge)
    monkeypatch.setenv("WSSS_FAST_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="WSSS_FAST_MAX_IMAGE_PIXELS='lots': expected a number"):
        read_image(huge)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp", ".tiff", ".ppm", ".pgm", ".jpg",
                                 ".gif", "lossless.webp", "16bit.png"])
def test_image_size_is_read_from_headers(tmp_path, ext):
    from PIL import Image
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    if ext == ".gif":
        data = io.BytesIO()
        Image.fromarray(pixels).save(data, format="GIF")
        data = data.getvalue()
    elif ext == "lossless.webp":
        data = cv2.imencode(".webp", pixels, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    elif ext == "16bit.png":
        data = cv2.imencode(".png", pixels.astype(np.uint16) * 257)[1].tobytes()
    else:
        image = pixels[:, :, 0] if ext == ".pgm" else pixels
        data = cv2.imencode(ext, image)[1].tobytes()
    assert image_size(data) == (53, 37)
    path = tmp_path / f"x{ext}"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match=r"too large: 0.0 MP \(53×37\) exceeds the "
                                               r"0.001 MP limit"):
        read_image(path, max_pixels=1000)
    assert read_image(path, max_pixels=53 * 37).shape == (37, 53, 3)


def test_label_png_pixel_limit(tmp_path):
    from wsss_fast.data.images import write_label_png
    path = tmp_path / "label.png"
    write_label_png(path, np.zeros((30, 40), np.uint8))
    assert read_label_png(path).shape == (30, 40)
    with pytest.raises(ImageDecodeError, match=r"label.png: too large: .*\(40×30\)"):
        read_label_png(path, max_pixels=1199)


# ----------------------------------------------------------------------------- journal


def _cam(folder, item, value=1.0):
    path = folder / "cams" / f"{item}.npy"
    save_cam_file(path, [0], np.full((1, 4, 4), value), np.ones((1, 1, 1)))
    return {"cam": path}


def _outputs(folder, item):
    return {"cam": folder / "cams" / f"{item}.npy"}


def _entries(folder, command="extract"):
    """Every line of the pending journals, then of the done journals."""
    return [json.loads(line) for journal in sorted((folder / STATE_DIR).glob(f"{command}.*.jsonl"))
            for line in journal.read_text().splitlines()]


def test_journal_records_digest_relative_paths_and_checksums(tmp_path):
    with RunState(tmp_path, "extract", {"k": 1}) as state:
        assert not state.is_finished("a", _outputs(tmp_path, "a"))
        state.record_done("a", _cam(tmp_path, "a"))
    pending, done = _entries(tmp_path)
    assert pending == {"id": "a", "digest": state.digest, "pending": True,
                       "outputs": ["cams/a.npy"]}
    cam = tmp_path / "cams" / "a.npy"
    assert done == {"id": "a", "digest": state.digest, "outputs": {"cam": {
        "path": "cams/a.npy", "size": cam.stat().st_size, "blake2b": file_checksum(cam)}}}


def test_same_size_corruption_is_redone(tmp_path):
    with RunState(tmp_path, "extract", {"k": 1}) as state:
        state.record_done("a", _cam(tmp_path, "a"))
        state.record_done("b", _cam(tmp_path, "b"))
    cam = tmp_path / "cams" / "a.npy"
    size = cam.stat().st_size
    data = bytearray(cam.read_bytes())
    value = data.rfind(np.float32(1.0).tobytes())
    data[value] ^= 0x01                  # one bit of one map value: still a valid CAM file
    cam.write_bytes(bytes(data))
    assert cam.stat().st_size == size
    assert load_cam_file(cam).high_res.max() > 1.0
    with RunState(tmp_path, "extract", {"k": 1}) as resumed:
        assert resumed.is_finished("b", _outputs(tmp_path, "b"), validate=load_cam_file)
        assert not resumed.is_finished("a", _outputs(tmp_path, "a"), validate=load_cam_file)
    assert not cam.exists()


def test_unjournaled_outputs_are_adopted_only_when_pending_under_this_config(tmp_path):
    config = {"scales": [1.0]}
    state = RunState(tmp_path, "extract", config)
    for item in "ab":
        assert not state.is_finished(item, _outputs(tmp_path, item))
    _cam(tmp_path, "a")                  # published, then killed before journaling
    _cam(tmp_path, "z")                  # never marked pending by any run
    state.close()
    with RunState(tmp_path, "extract", config) as resumed:
        assert resumed.is_finished("a", _outputs(tmp_path, "a"), validate=load_cam_file)
        assert not resumed.is_finished("b", _outputs(tmp_path, "b"), validate=load_cam_file)
        assert not resumed.is_finished("z", _outputs(tmp_path, "z"), validate=load_cam_file)
        assert not (tmp_path / "cams" / "z.npy").exists()
    # nothing is journaled as done under {"scales": [1.0]} except "a" (adopted): still blocks
    with pytest.raises(ConfigConflict):
        RunState(tmp_path, "extract", {"scales": [2.0]})


def test_pending_outputs_of_another_config_are_never_adopted(tmp_path):
    crashed = RunState(tmp_path, "extract", {"scales": [1.0]})
    assert not crashed.is_finished("a", _outputs(tmp_path, "a"))
    _cam(tmp_path, "a")                  # published under the old config, never journaled
    crashed.close()
    # nothing was journaled as done under the old config: the corrected command may run here
    with RunState(tmp_path, "extract", {"scales": [2.0]}) as corrected:
        assert not corrected.is_finished("a", _outputs(tmp_path, "a"), validate=load_cam_file)
    assert not (tmp_path / "cams" / "a.npy").exists()
    fingerprint = json.loads((tmp_path / STATE_DIR / "extract.config.json").read_text())
    assert fingerprint == {"scales": [2.0]}


def test_a_config_recorded_by_a_run_that_did_nothing_does_not_block(tmp_path):
    RunState(tmp_path, "extract", {"checkpoint": "typo.pth"}).close()   # failed at once
    with RunState(tmp_path, "extract", {"checkpoint": "right.pth"}) as state:
        state.record_done("a", _cam(tmp_path, "a"))
    with pytest.raises(ConfigConflict, match="differs in: checkpoint"):
        RunState(tmp_path, "extract", {"checkpoint": "other.pth"})


def test_old_journal_lines_without_digest_are_not_finished(tmp_path):
    _cam(tmp_path, "a")
    (tmp_path / STATE_DIR).mkdir()
    size = (tmp_path / "cams" / "a.npy").stat().st_size
    (tmp_path / STATE_DIR / "extract.rank0.jsonl").write_text(
        json.dumps({"id": "a", "outputs": {"cam": size}}) + "\n")
    (tmp_path / STATE_DIR / "extract.config.json").write_text(json.dumps({"k": 1}))
    with pytest.raises(ConfigConflict):   # that old work still counts as its config's
        RunState(tmp_path, "extract", {"k": 2})
    with RunState(tmp_path, "extract", {"k": 1}) as state:
        assert not state.is_finished("a", _outputs(tmp_path, "a"), validate=load_cam_file)


def test_an_entry_after_a_torn_line_is_not_lost(tmp_path):
    with RunState(tmp_path, "extract", {"k": 1}) as state:
        state.record_done("a", _cam(tmp_path, "a"))
    with open(tmp_path / STATE_DIR / "extract.rank0.jsonl", "a") as journal:
        journal.write('{"id": "b", "outp')          # killed mid-line
    with RunState(tmp_path, "extract", {"k": 1}) as state:
        state.record_done("c", _cam(tmp_path, "c"))
    with RunState(tmp_path, "extract", {"k": 1}) as state:
        assert state.is_finished("a", _outputs(tmp_path, "a"))
        assert state.is_finished("c", _outputs(tmp_path, "c"))


def test_disk_full_while_journaling_names_the_journal(tmp_path, monkeypatch):
    state = RunState(tmp_path, "extract", {"k": 1})
    outputs = _cam(tmp_path, "a")

    def full(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(state._journal, "write", full)
    with pytest.raises(DiskFull, match=r"no space left on the device while writing .*"
                                       r"extract.rank0.jsonl \(free some space"):
        state.record_done("a", outputs)
    state.close()


def _finished_run(folder, config, items="abc"):
    with RunState(folder, "extract", config) as state:
        for item in items:
            state.record_done(item, _cam(folder, item))
        state.finish()


def test_interrupted_overwrite_leaves_nothing_to_adopt(tmp_path, monkeypatch):
    old, new = {"scales": [1.0]}, {"scales": [2.0]}
    _finished_run(tmp_path, old)
    from wsss_fast.io import run_state
    real_write = run_state.atomic_write_json

    def interrupted_at_fingerprint(path, obj):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(run_state, "atomic_write_json", interrupted_at_fingerprint)
    with pytest.raises(Interrupted):
        RunState(tmp_path, "extract", new, overwrite=True)
    # the old outputs went first, then the journals; the old config is still recorded
    assert list((tmp_path / "cams").glob("*.npy")) == []
    assert _entries(tmp_path) == []
    monkeypatch.setattr(run_state, "atomic_write_json", real_write)
    _cam(tmp_path, "c")                  # e.g. a file no journal listed
    with RunState(tmp_path, "extract", new) as state:
        assert not any(state.is_finished(i, _outputs(tmp_path, i), validate=load_cam_file)
                       for i in "abc")
    # interrupted later, after its first item: a normal run of the new config resumes it
    _finished_run(tmp_path / "second", old)
    overwriting = RunState(tmp_path / "second", "extract", new, overwrite=True)
    assert not overwriting.is_finished("a", _outputs(tmp_path / "second", "a"))
    overwriting.record_done("a", _cam(tmp_path / "second", "a", value=2.0))
    overwriting.close()                  # killed
    _cam(tmp_path / "second", "b")       # an old-config output put back behind our back
    with RunState(tmp_path / "second", "extract", new) as state:
        done = {i: state.is_finished(i, _outputs(tmp_path / "second", i),
                                     validate=load_cam_file) for i in "abc"}
    assert done == {"a": True, "b": False, "c": False}
    assert load_cam_file(tmp_path / "second" / "cams" / "a.npy").high_res.max() == 2.0


def test_overwrite_clears_the_journals_of_every_old_rank(tmp_path):
    for rank in range(3):
        with RunState(tmp_path, "extract", {"k": 1}, rank=rank, world=3) as state:
            state.record_done(f"r{rank}", _cam(tmp_path, f"r{rank}"))
            state.finish()
    for rank in range(2):                # fewer ranks now: rank 0 also takes rank 2's journal
        RunState(tmp_path, "extract", {"k": 2}, rank=rank, world=2, overwrite=True).close()
    assert list((tmp_path / "cams").glob("*.npy")) == []
    assert not list((tmp_path / STATE_DIR).glob("extract.rank*.summary.json"))
    assert _entries(tmp_path) == []


def test_overwrite_never_deletes_outside_the_output_folder(tmp_path):
    outside = tmp_path / "keep.npy"
    outside.write_bytes(b"precious")
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / "extract.rank0.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"id": "x", "digest": "d", "outputs": {"cam": {"path": "../keep.npy", "size": 8}}},
        {"id": "y", "digest": "d", "pending": True, "outputs": [str(outside)]}]) + "\n")
    RunState(out, "extract", {}, overwrite=True).close()
    assert outside.read_bytes() == b"precious"


# ----------------------------------------------------------------------------- locks

_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from wsss_fast.io.run_state import RunState
    state = RunState(sys.argv[1], "extract", {"k": 1})
    print("locked", flush=True)
    time.sleep(120)
""")


def _start_holder(out):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_in_one_folder_is_refused_until_the_first_dies(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(RunLocked) as error:
            RunState(tmp_path, "extract", {"k": 1})
        text = str(error.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in text and "\n" not in text
        assert "`extract` rank 0" in text
        with RunState(tmp_path, "extract", {"k": 1}, rank=1, world=2):   # other rank: fine
            pass
        with RunState(tmp_path, "pseudo-label", {"k": 1}):                # other command: fine
            pass
    finally:
        holder.kill()
        holder.wait()
    state = RunState(tmp_path, "extract", {"k": 1})   # the kernel dropped the dead one's lock
    lock_file = tmp_path / STATE_DIR / "extract.rank0.lock"
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    state.record_done("a", _cam(tmp_path, "a"))
    state.finish()
    with open(lock_file) as probe:   # another open file description: free only once released
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lock_held_by_an_orphan_of_a_dead_run_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    path = tmp_path / "extract.rank0.lock"
    # an inherited descriptor keeps the flock although the process that took it is gone
    orphan = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, json, os, socket, time
        fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({{"pid": {dead}, "host": socket.gethostname()}}).encode())
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert orphan.stdout.readline().strip() == "locked"
        with RunLock(path) as lock:
            assert lock.held
            assert json.loads(path.read_text())["pid"] == os.getpid()
    finally:
        orphan.kill()
        orphan.wait()


def test_lock_taken_again_in_the_same_process_replaces_the_first(tmp_path):
    first = RunState(tmp_path, "extract", {"k": 1})   # e.g. kept alive by a traceback
    second = RunState(tmp_path, "extract", {"k": 1})
    assert not first._lock.held and second._lock.held
    first.close()                                     # does not release the second's lock
    assert second._lock.held
    second.close()


# ----------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_handle_interrupts_raises_interrupted_and_restores_handlers(signum, status):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as stop:
        with handle_interrupts():
            os.kill(os.getpid(), signum)
            time.sleep(5)
    assert stop.value.signum == signum and stop.value.exit_status == status
    assert str(stop.value) == f"interrupted by {signal.Signals(signum).name}"
    assert isinstance(stop.value, KeyboardInterrupt)
    assert signal.getsignal(signum) is before


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def _descendants(pid: int) -> set[int]:
    table = _process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pids) -> set[int]:
    table = _process_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


_POOL_RUN = textwrap.dedent("""
    import sys, time
    from wsss_fast.io.interrupts import Interrupted, handle_interrupts
    from wsss_fast.workers import run_in_workers

    def job(i):
        time.sleep(120)

    if __name__ == "__main__":
        try:
            with handle_interrupts():
                run_in_workers(job, [(i,) for i in range(6)], workers=2, progress=False)
        except Interrupted as stop:
            print(f"stopped: {stop}", file=sys.stderr)
            sys.exit(stop.exit_status)
""")

_LOADER_RUN = textwrap.dedent("""
    import sys, time
    from wsss_fast.data.dataset import WsssDataset
    from wsss_fast.data.loader import image_loader
    from wsss_fast.io.interrupts import Interrupted, handle_interrupts

    class SlowDataset(WsssDataset):
        def sample(self, id):
            time.sleep(120)
            return super().sample(id)

    if __name__ == "__main__":
        ids = [f"i{k}" for k in range(8)]
        dataset = SlowDataset("/nowhere", ["cat"], {i: f"/nowhere/{i}.jpg" for i in ids},
                              {}, {}, [])
        try:
            with handle_interrupts():
                for item in image_loader(dataset, ids, workers=2):
                    pass
        except Interrupted as stop:
            print(f"stopped: {stop}", file=sys.stderr)
            sys.exit(stop.exit_status)
""")

# The demo's rows: two independent tasks at once, a third waiting for the first.
_GRAPH_RUN = textwrap.dedent("""
    import sys, time
    from wsss_fast.io.interrupts import Interrupted, handle_interrupts
    from wsss_fast.workers import run_task_graph

    def job(seconds, inputs):
        if seconds == 0:
            raise ValueError("a row failed")
        time.sleep(seconds)

    if __name__ == "__main__":
        seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 120
        tasks = [("a", (120,), []), ("b", (seconds,), []), ("c", (120,), ["a"])]
        try:
            with handle_interrupts():
                run_task_graph(job, tasks, workers=2)
        except Interrupted as stop:
            print(f"stopped: {stop}", file=sys.stderr)
            sys.exit(stop.exit_status)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
""")


def _run_then_signal(tmp_path, script, signum):
    """Run ``script``, signal it once its two workers run their jobs; (exit status, stderr, the
    descendant processes still alive 10 s after it exited)."""
    expected = 3 if script is not _LOADER_RUN else 2   # a pool also has its fork server
    path = tmp_path / "run.py"
    path.write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(path)], env=env, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 60
    children = set()
    while time.time() < deadline:
        children = _descendants(process.pid)
        if len(children) >= expected or process.poll() is not None:
            break
        time.sleep(0.1)
    time.sleep(1.0)                      # let the workers pick up their (long) jobs
    children = _descendants(process.pid)
    assert process.poll() is None and len(children) >= expected, "workers did not start"
    process.send_signal(signum)
    try:
        process.wait(timeout=30)
    finally:
        process.kill()
    deadline = time.time() + 10
    while _alive(children) and time.time() < deadline:
        time.sleep(0.1)
    survivors = _alive(children)
    for pid in survivors:                # a failing run must not leak its orphans
        os.kill(pid, signal.SIGKILL)
    stderr = process.stderr.read()       # (orphans would have kept the pipe open)
    process.stderr.close()
    return process.returncode, stderr, survivors


@pytest.mark.parametrize("script", [_POOL_RUN, _LOADER_RUN, _GRAPH_RUN],
                         ids=["pool", "data_loader", "task_graph"])
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_workers_never_outlive_their_run(tmp_path, script, signum):
    status, stderr, survivors = _run_then_signal(tmp_path, script, signum)
    assert not survivors, f"orphaned workers {survivors}"
    if signum == signal.SIGTERM:         # handled: one line, the shell's status, no traceback
        assert status == 143, stderr[-2000:]
        assert "stopped: interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    else:
        assert status == -signal.SIGKILL


def test_a_failing_task_stops_the_task_graph_and_its_workers(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(_GRAPH_RUN)
    process = subprocess.Popen([sys.executable, str(path), "0"], stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    started, children = time.time(), set()
    while process.poll() is None:            # the workers it started, while it runs
        children |= _descendants(process.pid)
        time.sleep(0.05)
    seconds = time.time() - started
    stderr = process.stderr.read()
    process.stderr.close()
    deadline = time.time() + 10
    while _alive(children) and time.time() < deadline:
        time.sleep(0.1)
    survivors = _alive(children)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    # Raised at once with the task's own error, not after the 120 s task beside it.
    assert process.returncode == 2 and "error: a row failed" in stderr, stderr[-2000:]
    assert seconds < 60
    assert not survivors, f"orphaned workers {survivors}"


@pytest.mark.slow   # the same parent-death path as SIGKILL above
def test_unhandled_sigterm_still_takes_the_workers_down(tmp_path):
    script = _POOL_RUN.replace("with handle_interrupts():", "if True:")
    assert script != _POOL_RUN
    status, _, survivors = _run_then_signal(tmp_path, script, signal.SIGTERM)
    assert status == -signal.SIGTERM and not survivors, f"orphaned workers {survivors}"


# ----------------------------------------------------------------------------- disk full


class _FillingFile:
    """A file whose device fills up after ``room`` bytes."""

    def __init__(self, handle, room, code):
        self._handle, self._room, self._code = handle, room, code

    def write(self, data):
        if len(data) > self._room:
            raise OSError(self._code, os.strerror(self._code))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _fill_disk_after(monkeypatch, room, code=errno.ENOSPC):
    def filling_open(path, mode="r", *args, **kwargs):
        return _FillingFile(open(path, mode, *args, **kwargs), room, code)
    monkeypatch.setattr(atomic, "open", filling_open, raising=False)


def _temps(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EDQUOT, "disk quota exceeded")])
def test_disk_full_during_an_atomic_write(tmp_path, monkeypatch, code, words):
    target = tmp_path / "cams" / "a.npy"
    atomic_write_bytes(target, b"old")
    _fill_disk_after(monkeypatch, 100, code)
    with pytest.raises(DiskFull) as error:
        atomic_write_bytes(target, b"x" * 1000)
    assert str(error.value) == (f"{words} while writing {target}; the file was not written "
                                f"(free some space and rerun)")
    assert isinstance(error.value, OSError) and error.value.errno == code
    assert error.value.filename == str(target)
    with pytest.raises(DiskFull, match="model.pth"):   # torch.save wraps it in a RuntimeError
        with atomic_write(tmp_path / "model.pth") as handle:
            torch.save({"w": torch.ones(10000)}, handle)
    assert target.read_bytes() == b"old" and not (tmp_path / "model.pth").exists()
    assert _temps(tmp_path) == []


def test_atomic_write_group_is_all_or_nothing(tmp_path, monkeypatch):
    checkpoint, state = tmp_path / "checkpoint.pth", tmp_path / "train_state.pth"
    weights = torch_file_bytes({"model": {"w": torch.ones(100)}})
    atomic_write_group({checkpoint: weights,
                        state: torch_file_bytes({"checkpoint": bytes_checksum(weights)})})
    assert file_checksum(checkpoint) == read_torch_file(state)["checkpoint"]
    newer = torch_file_bytes({"model": {"w": torch.zeros(100)}})
    newer_state = {"checkpoint": bytes_checksum(newer), "optimizer": torch.ones(100000)}
    _fill_disk_after(monkeypatch, 100_000)   # the checkpoint fits, the state does not
    with pytest.raises(DiskFull, match="train_state.pth"):
        atomic_write_group({checkpoint: newer,
                            state: lambda handle: torch.save(newer_state, handle)})
    assert checkpoint.read_bytes() == weights          # neither was published
    assert file_checksum(checkpoint) == read_torch_file(state)["checkpoint"]
    assert _temps(tmp_path) == []
    monkeypatch.setattr(atomic, "open", open)
    # killed between the two renames: the pair is torn, and the recorded checksum tells
    renames = []
    real_replace = os.replace

    def killed_after_first(src, dst):
        if renames:
            raise Interrupted(signal.SIGKILL)
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed_after_first)
    with pytest.raises(Interrupted):
        atomic_write_group({checkpoint: newer, state: torch_file_bytes(newer_state)})
    assert file_checksum(checkpoint) != read_torch_file(state)["checkpoint"]
    assert _temps(tmp_path) == []
