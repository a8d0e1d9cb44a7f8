"""Output files: atomic writes, CAM file formats, resumable run state, sharding, the registry."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from wsss_fast.distributed import shard
from wsss_fast.io.atomic import atomic_write, atomic_write_bytes, remove_stale_temps
from wsss_fast.io.cam_files import CamFileError, load_cam_file, save_cam_file
from wsss_fast.io.run_state import ConfigConflict, OutputNotWritable, RunState


def _temps(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_write_publishes_only_complete_files(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"first")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"first"
    assert _temps(tmp_path) == []


def test_stale_temps_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    import socket
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".x.npy.{host}-{dead}.tmp"
    live = tmp_path / f".y.npy.{host}-{os.getpid()}.tmp"
    other_host = tmp_path / f".z.npy.otherhost-{dead}.tmp"
    for path in (stale, live, other_host):
        path.write_bytes(b"")
    assert remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and live.exists() and other_host.exists()


@pytest.mark.parametrize("fmt", ["irn", "mctformer"])
@pytest.mark.parametrize("fp16", [False, True])
def test_cam_file_round_trip(tmp_path, fmt, fp16):
    rng = np.random.default_rng(0)
    keys = np.array([2, 7])
    high, low = rng.random((2, 13, 17), np.float32), rng.random((2, 4, 5), np.float32)
    path = tmp_path / "x.npy"
    save_cam_file(path, keys, high, low, fmt=fmt, fp16=fp16)
    record = load_cam_file(path)
    np.testing.assert_array_equal(record.keys, keys)
    np.testing.assert_allclose(record.high_res, high, atol=1e-3 if fp16 else 0)
    if fmt == "irn":
        np.testing.assert_allclose(record.low_res, low, atol=1e-3 if fp16 else 0)
        raw = np.load(path, allow_pickle=True).item()   # what IRN's scripts read
        assert isinstance(raw["cam"], torch.Tensor) and isinstance(raw["high_res"], np.ndarray)
        np.testing.assert_array_equal(np.pad(raw["keys"] + 1, (1, 0)), [0, 3, 8])
    else:
        assert sorted(np.load(path, allow_pickle=True).item()) == [2, 7]


def test_cam_file_without_classes_and_errors(tmp_path):
    path = tmp_path / "empty.npy"
    save_cam_file(path, [], np.zeros((0, 5, 6)), np.zeros((0, 2, 2)))
    record = load_cam_file(path)
    assert record.keys.size == 0 and record.high_res.shape == (0, 5, 6)
    with pytest.raises(ValueError, match=r"high_res must be \(len\(keys\)=2"):
        save_cam_file(path, [1, 2], np.zeros((3, 5, 6)), np.zeros((3, 2, 2)))
    full = tmp_path / "full.npy"
    size = save_cam_file(full, [1], np.ones((1, 30, 30)), np.ones((1, 8, 8)))
    with open(full, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(CamFileError, match="full.npy: unreadable"):
        load_cam_file(full)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(CamFileError, match="expected a pickled dict"):
        load_cam_file(tmp_path / "array.npy")


def _outputs(folder, item):
    return {"cam": folder / f"{item}.npy"}


def test_run_state_resume_adopt_and_redo(tmp_path):
    config = {"model": "m", "scales": [1.0]}
    # "f" is an output that no run of this config marked pending (e.g. an old configuration's).
    save_cam_file(tmp_path / "f.npy", [0], np.ones((1, 4, 4)), np.ones((1, 1, 1)))
    state = RunState(tmp_path, "extract", config)
    assert not any(state.is_finished(i, _outputs(tmp_path, i)) for i in "abcde")  # all pending
    for item in ("a", "b"):
        save_cam_file(tmp_path / f"{item}.npy", [0], np.ones((1, 4, 4)), np.ones((1, 1, 1)))
        state.record_done(item, _outputs(tmp_path, item))
    # "c" published but not journaled (killed in between): adopted after validation.
    save_cam_file(tmp_path / "c.npy", [0], np.ones((1, 4, 4)), np.ones((1, 1, 1)))
    # "d" truncated behind our back; "e" never written.
    save_cam_file(tmp_path / "d.npy", [0], np.ones((1, 4, 4)), np.ones((1, 1, 1)))
    state.record_done("d", _outputs(tmp_path, "d"))
    with open(tmp_path / "d.npy", "r+b") as handle:
        handle.truncate(40)
    state.finish()
    with open(tmp_path / ".wsss-fast" / "extract.rank0.jsonl", "a") as journal:
        journal.write('{"id": "torn", "outp')          # a line torn by kill -9
    resumed = RunState(tmp_path, "extract", config)
    done = {i: resumed.is_finished(i, _outputs(tmp_path, i), validate=load_cam_file)
            for i in "abcdef"}
    assert done == {"a": True, "b": True, "c": True, "d": False, "e": False, "f": False}
    assert not (tmp_path / "d.npy").exists()     # the bad file is removed, to be redone
    assert not (tmp_path / "f.npy").exists()
    resumed.close()
    with pytest.raises(ConfigConflict, match="differs in: scales"):
        RunState(tmp_path, "extract", {"model": "m", "scales": [1.0, 0.5]})
    fresh = RunState(tmp_path, "extract", {"model": "m", "scales": [0.5]}, overwrite=True)
    assert not fresh.is_finished("a", _outputs(tmp_path, "a"))


def test_run_state_manifest_merges_ranks(tmp_path):
    config = {"k": 1}
    for rank in range(2):
        state = RunState(tmp_path, "extract", config, rank=rank, world=2)
        state.counts["assigned"] = 3
        atomic_write_bytes(tmp_path / f"{rank}.bin", b"x")
        state.record_done(f"id{rank}", {"f": tmp_path / f"{rank}.bin"})
        state.record_skipped(f"bad{rank}", "unreadable")
        state.finish()
    manifest = state.write_manifest()
    on_disk = json.loads((tmp_path / "manifest-extract.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["counts"] == {"assigned": 6, "done": 2, "already_done": 0, "skipped": 2}
    assert [s["id"] for s in manifest["skipped"]] == ["bad0", "bad1"]
    assert manifest["config"] == config and "torch" in manifest["versions"]


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputNotWritable, match="cannot write to the output folder"):
        RunState(blocker / "out", "extract", {})


@pytest.mark.parametrize("count,world", [(0, 3), (7, 1), (7, 2), (10, 3), (2, 5)])
def test_shard_is_a_partition_without_padding(count, world):
    ids = [f"{i:04d}" for i in reversed(range(count))]
    shards = [shard(ids, rank, world) for rank in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard(ids, world, world)


def test_registry_reads_architecture_from_checkpoint(tmp_path):
    from wsss_fast.models.registry import create_model, list_models
    assert {"mctformer_v1", "mctformer_v2", "transcam", "token_cam"} <= set(list_models())
    model = create_model("mctformer_v2", num_classes=5, embed_dim=32, depth=2, num_heads=2,
                         img_size=64)
    path = tmp_path / "m.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = create_model("mctformer_v2", num_classes=5, checkpoint=path, num_heads=2)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.train_grid == 4 and loaded.depth == 2
    with pytest.raises(ValueError, match="has 5 outputs but the dataset has 20"):
        create_model("mctformer_v2", num_classes=20, checkpoint=path, num_heads=2)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")
    conformer = create_model("transcam", num_classes=4, channel_ratio=1, embed_dim=32, depth=3,
                             num_heads=2)
    torch.save(conformer.state_dict(), path)
    again = create_model("transcam", num_classes=4, checkpoint=path, num_heads=2)
    assert again.num_classes == 5 and again.depth == 3


# ------------------------------------------------------------------------ gallery drawing

def test_outline_draws_only_the_mask_boundary():
    from wsss_fast.io.overlays import outline
    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    drawn = outline(image, mask, colour=(255, 0, 0))
    red = drawn[..., 0] == 255
    ring = mask.copy()
    ring[3:5, 3:5] = False                        # the 4x4 square's 12 border pixels
    assert np.array_equal(red, ring)
    assert not image.any()                        # the input is left as it was
    with pytest.raises(ValueError, match="differ in size"):
        outline(image, mask[:4])


def test_labelled_grid_layout_centres_tiles_and_writes_titles():
    from wsss_fast.io.overlays import labelled_grid
    big = np.full((20, 30, 3), 200, np.uint8)
    small = np.full((10, 10, 3), 100, np.uint8)
    grid = labelled_grid([[big, small], [small, big]], [["a"], ["b", "tau 0.30"]],
                         [["row 1"], ["row 2", "cls"]], gap=2)
    header = 14 * 2 + 4
    assert grid.shape[0] == header + 2 + 2 * (20 + 2)
    title_width = grid.shape[1] - 2 * (30 + 2) - 2
    assert title_width > 20
    top, left = header + 2, title_width + 2 + 30 + 2       # row 1, second cell
    cell = grid[top:top + 20, left:left + 30]
    assert (cell[5:15, 10:20] == 100).all() and (cell[:5] == 40).all()   # centred, padded
    assert (grid[:header, title_width + 2:title_width + 32] > 150).any()  # title text drawn
    with pytest.raises(ValueError, match="labelled_grid"):
        labelled_grid([[big]], [["a"], ["b"]], [["r"]])
