"""The wsss-fast CLI end to end on small on-disk datasets: extract, resume, bad input,
pseudo-labels, refinement, evaluation, YAML configs and exit statuses."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch

from wsss_fast.cli import main
from wsss_fast.io.cam_files import load_cam_file

CLASSES = ("square", "disc", "bar")
TINY_MODEL = ["--model", "mctformer_v2", "--model-arg", "num_heads=2", "--device", "cpu"]


def _scene(rng, height, width, present):
    """An image with one rectangle per present class (class colour + noise) and its GT."""
    image = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
    gt = np.zeros((height, width), np.uint8)
    for k in present:
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        h, w = rng.integers(height // 4, height // 2), rng.integers(width // 4, width // 2)
        image[y:y + h, x:x + w] = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][k])
        gt[y:y + h, x:x + w] = k + 1
    return image, gt


def make_voc(root, count=8, seed=0, sizes=((48, 64), (64, 48), (40, 40))):
    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    labels, ids = {}, []
    for i in range(count):
        item = f"2026_{i + 1:06d}"
        height, width = sizes[i % len(sizes)]
        present = sorted(rng.choice(3, size=1 + i % 2, replace=False).tolist())
        image, gt = _scene(rng, height, width, present)
        PIL.Image.fromarray(image).save(root / "JPEGImages" / f"{item}.jpg", quality=95)
        PIL.Image.fromarray(gt).save(root / "SegmentationClass" / f"{item}.png")
        vector = np.zeros(3, np.float32)
        vector[present] = 1
        labels[int(item.replace("_", ""))] = vector
        ids.append(item)
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    return ids


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    ids = make_voc(root)
    return root, ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from wsss_fast.models.registry import create_model
    torch.manual_seed(0)
    model = create_model("mctformer_v2", num_classes=3, embed_dim=32, depth=2, num_heads=2,
                         img_size=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_v2.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _extract_args(root, checkpoint, out, *extra):
    return ["extract", "--data", str(root), "--split", "train", *TINY_MODEL, "--checkpoint",
            str(checkpoint), "--out", str(out), "--workers", "0", "--quiet", *extra]


def _read_manifest(out, command="extract"):
    import json
    return json.loads((out / f"manifest-{command}.json").read_text())


def test_extract_writes_valid_cams_and_resumes_without_redoing(voc, checkpoint, tmp_path):
    root, ids = voc
    out = tmp_path / "out"
    assert main(_extract_args(root, checkpoint, out, "--overlays")) == 0
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    for item in ids:
        record = load_cam_file(out / "cams" / f"{item}.npy")
        height, width = np.asarray(PIL.Image.open(root / "JPEGImages" / f"{item}.jpg")).shape[:2]
        np.testing.assert_array_equal(record.keys,
                                      np.flatnonzero(labels[int(item.replace("_", ""))]))
        assert record.high_res.shape == (record.keys.size, height, width)
        assert record.low_res.shape == (record.keys.size, -(-height // 4), -(-width // 4))
        assert np.isfinite(record.high_res).all() and record.high_res.max() == pytest.approx(1, abs=1e-4)
        for k in record.keys:
            assert (out / "overlays" / f"{item}_{CLASSES[k]}.png").exists()
    manifest = _read_manifest(out)
    assert manifest["counts"]["done"] == len(ids) and manifest["counts"]["skipped"] == 0
    assert manifest["config"]["preset"]["name"] == "mctformer_v2"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cams").iterdir()}
    assert main(_extract_args(root, checkpoint, out, "--overlays")) == 0
    assert _read_manifest(out)["counts"]["already_done"] == len(ids)
    assert {p: p.stat().st_mtime_ns for p in (out / "cams").iterdir()} == stamps
    # The same folder with another configuration is refused, not mixed.
    assert main(_extract_args(root, checkpoint, out, "--scales", "1.0", "0.5")) == 2


def test_extract_matches_the_python_engine(voc, checkpoint, tmp_path):
    from wsss_fast.engine import CamEngine
    from wsss_fast.models.registry import create_model
    root, ids = voc
    out = tmp_path / "out"
    assert main(_extract_args(root, checkpoint, out, "--format", "mctformer")) == 0
    engine = CamEngine(create_model("mctformer_v2", num_classes=3, checkpoint=checkpoint,
                                    num_heads=2), "mctformer-v2")
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    for item in ids[:3]:
        expected = engine(str(root / "JPEGImages" / f"{item}.jpg"),
                          labels[int(item.replace("_", ""))]).as_dict()
        saved = np.load(out / "cams" / f"{item}.npy", allow_pickle=True).item()
        assert sorted(saved) == sorted(expected)
        for k in expected:
            np.testing.assert_allclose(saved[k], expected[k], rtol=0, atol=1e-6)


def _folder_with_bad_inputs(root):
    """A folder dataset: good images and every kind of bad input the pipeline must survive."""
    rng = np.random.default_rng(1)
    root.mkdir()
    good = {}
    for i in range(3):
        image, _ = _scene(rng, 48, 56, [i])
        PIL.Image.fromarray(image).save(root / f"good{i}.jpg")
        good[f"good{i}"] = CLASSES[i]
    gray = rng.integers(0, 255, (40, 40)).astype(np.uint8)
    PIL.Image.fromarray(gray).save(root / "gray.png")
    PIL.Image.fromarray(rng.integers(0, 255, (40, 44, 4)).astype(np.uint8)).save(root / "rgba.png")
    import cv2
    cv2.imwrite(str(root / "deep.png"), rng.integers(0, 65535, (36, 40, 3)).astype(np.uint16))
    data = (root / "good0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    PIL.Image.new("RGB", (1, 1)).save(root / "tiny.png")
    PIL.Image.new("RGB", (10000, 10)).save(root / "sliver.png")
    PIL.Image.new("RGB", (40, 40)).save(root / "unlabelled.png")
    PIL.Image.new("RGB", (40, 40)).save(root / "negative.png")
    rows = ["id,labels"] + [f"{k},{v}" for k, v in good.items()]
    rows += ["gray,disc", "rgba,bar", "deep,square", "truncated,disc", "empty,disc",
             "text,disc", "tiny,disc", "sliver,bar", "negative,", "ghost,disc"]
    (root.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_bad_inputs_are_reported_and_skipped(tmp_path, checkpoint):
    root = _folder_with_bad_inputs(tmp_path / "images")
    out = tmp_path / "out"
    args = ["extract", "--data", str(root), "--dataset", "folder", "--labels",
            str(tmp_path / "labels.csv"), "--classes", str(_classes_file(tmp_path)),
            *TINY_MODEL, "--checkpoint", str(checkpoint), "--out", str(out), "--workers", "2",
            "--quiet", "--scales", "1.0", "0.5"]
    assert main(args) == 0
    manifest = _read_manifest(out)
    skipped = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"truncated", "empty", "text", "tiny", "sliver", "unlabelled",
                            "ghost"}, skipped
    for item in ("good0", "good1", "good2", "gray", "rgba", "deep"):
        record = load_cam_file(out / "cams" / f"{item}.npy")
        assert record.keys.size == 1 and np.isfinite(record.high_res).all()
    assert load_cam_file(out / "cams" / "negative.npy").keys.size == 0
    assert "truncated" in skipped["truncated"].lower()
    assert "patch" in skipped["tiny"] or "small" in skipped["tiny"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert manifest["counts"]["done"] == 7


def _classes_file(folder):
    path = folder / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def test_exit_status_when_nothing_can_be_done(tmp_path, checkpoint, capsys):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff")
    (root / "b.jpg").write_text("nope")
    (tmp_path / "labels.csv").write_text("id,labels\na,disc\nb,disc\n")
    args = ["extract", "--data", str(root), "--labels", str(tmp_path / "labels.csv"),
            "--classes", str(_classes_file(tmp_path)), *TINY_MODEL, "--checkpoint",
            str(checkpoint), "--out", str(tmp_path / "out"), "--workers", "0", "--quiet"]
    assert main(args) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args[args.index("--out") + 1] = str(blocker / "out")
    assert main(args) == 2
    assert "cannot write to the output folder" in capsys.readouterr().err


def test_yaml_config_sets_defaults_and_rejects_unknown_keys(voc, checkpoint, tmp_path):
    root, ids = voc
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {root}\nsplit: train\nmodel: mctformer_v2\n"
                      f"model-arg: [num_heads=2]\ncheckpoint: {checkpoint}\n"
                      f"out: {tmp_path / 'out'}\nworkers: 0\nfp16: true\n")
    assert main(["extract", "--config", str(config), "--quiet", "--device", "cpu"]) == 0
    raw = np.load(tmp_path / "out" / "cams" / f"{ids[0]}.npy", allow_pickle=True).item()
    assert raw["high_res"].dtype == np.float16
    config.write_text("data: x\nbogus_option: 1\n")
    assert main(["extract", "--config", str(config)]) == 2


def test_yaml_values_get_the_command_line_checks_and_cli_options_win(voc, checkpoint, tmp_path,
                                                                     capsys):
    root, ids = voc
    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    for bad, key in (("scales: [abc, 1]", "scales"), ("workers: 1.5", "workers"),
                     ("dtype: fp64", "dtype"), ("scales: 0", "scales"),
                     ("fp16: yes please", "fp16"),
                     ("out: [a, b]", "out"), ("model_arg: {num_heads: [}", None)):
        config.write_text(f"data: {root}\nout: {out}\n{bad}\n")
        assert main(["extract", "--config", str(config)]) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], bad
        assert str(config) in err[0] and (key is None or f": {key}:" in err[0]), err
        assert not out.exists()
    # Values of the right kind: YAML's own types, a mapping for KEY=VALUE options, the
    # dataclass field names (flip) next to the flags' (no_flip); the command line wins.
    config.write_text(f"data: {root}\nsplit: train\nmodel: mctformer_v2\n"
                      f"model_args: {{num_heads: 2}}\ncheckpoint: {checkpoint}\nout: {out}\n"
                      f"workers: 3\nscales: [1.0, 0.5]\nflip: false\nquiet: true\n"
                      f"device: cpu\n")
    assert main(["extract", "--config", str(config), "--workers", "0", "--scales", "1"]) == 0
    manifest = _read_manifest(out)
    assert manifest["config"]["model_args"] == {"num_heads": 2}
    assert manifest["config"]["preset"]["scales"] == [1.0]
    assert manifest["config"]["preset"]["flip"] is False


def _subprocess_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_kill_9_mid_run_then_resume(tmp_path, checkpoint):
    root = tmp_path / "voc"
    ids = make_voc(root, count=40, seed=3, sizes=((96, 128), (128, 96)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "wsss_fast", *_extract_args(root, checkpoint, out)[:-1],
               "--scales", "1.0", "1.5", "2.0"]
    process = subprocess.Popen(command, env=_subprocess_env(), stderr=subprocess.DEVNULL)
    cams = out / "cams"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cams.glob("*.npy"))) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in cams.glob("*.npy")}
    assert 3 <= len(finished) < len(ids), "the run was not killed mid-way"
    for name in finished:                       # every visible file is complete
        load_cam_file(cams / name)
    assert main(_extract_args(root, checkpoint, out)[:-1] + ["--quiet", "--scales", "1.0",
                                                             "1.5", "2.0"]) == 0
    manifest = _read_manifest(out)
    assert manifest["counts"]["already_done"] >= len(finished) - 1
    assert manifest["counts"]["done"] + manifest["counts"]["already_done"] == len(ids)
    for name, stamp in finished.items():        # finished work is not redone
        assert (cams / name).stat().st_mtime_ns == stamp
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    reference = tmp_path / "clean"
    assert main(_extract_args(root, checkpoint, reference)[:-1] + [
        "--quiet", "--scales", "1.0", "1.5", "2.0"]) == 0
    for item in ids:
        a, b = load_cam_file(cams / f"{item}.npy"), load_cam_file(reference / "cams" /
                                                                  f"{item}.npy")
        np.testing.assert_array_equal(a.high_res, b.high_res)


def test_two_gloo_ranks_equal_one_process(tmp_path, checkpoint):
    root = tmp_path / "voc"
    ids = make_voc(root, count=7, seed=5)
    single, double = tmp_path / "single", tmp_path / "double"
    base = _extract_args(root, checkpoint, single)
    subprocess.run([sys.executable, "-m", "wsss_fast", *base], env=_subprocess_env(),
                   check=True, capture_output=True)
    base[base.index("--out") + 1] = str(double)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "wsss_fast", *base],
                            env=_subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    one = sorted(p.name for p in (single / "cams").iterdir())
    two = sorted(p.name for p in (double / "cams").iterdir())
    assert one == two == sorted(f"{i}.npy" for i in ids)
    for name in one:
        a = np.load(single / "cams" / name, allow_pickle=True).item()
        b = np.load(double / "cams" / name, allow_pickle=True).item()
        np.testing.assert_array_equal(a["keys"], b["keys"])
        np.testing.assert_array_equal(a["high_res"], b["high_res"])
        assert torch.equal(a["cam"], b["cam"])
    manifest = _read_manifest(double)
    assert manifest["world"] == 2 and manifest["counts"]["done"] == len(ids)
    assert sorted(r["counts"]["done"] for r in manifest["ranks"]) == [3, 4]
    journals = [line for p in (double / ".wsss-fast").glob("extract.rank*.jsonl")
                for line in p.read_text().splitlines()]
    assert len(journals) == len(ids)            # no duplicates across ranks
