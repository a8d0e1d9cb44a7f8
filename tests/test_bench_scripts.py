"""The benchmark scripts of issue 13: benchmarks.scaling at a tiny size, benchmarks.compare_official
(skip without a checkout, refusal of a wrong one, and a tiny run against the official MCTformer
when a checkout is named by $WSSS_FAST_MCTFORMER_REPO), benchmarks.gpu_check without a GPU and
its goal arithmetic, brief_training's command, and benchmarks.bf16_report --full-size --quick."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, scaling

REPO = Path(__file__).resolve().parent.parent


def run_module(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_gpu_check_without_a_gpu_prints_one_line_and_exits_0(tmp_path):
    done = run_module("benchmarks.gpu_check", "--report", str(tmp_path / "report.md"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "gpu-check: skipped: no CUDA device here (torch.cuda.is_available() is False)"]
    assert not (tmp_path / "report.md").exists()


def test_gpu_goal_arithmetic_by_hand():
    # ViT-S at 224²: P = 196, T = 216 with 20 class tokens
    f = gpu_check.pass_flops(224, 224, 20, stats_pass=True)
    t, d = 216, 384
    assert (f["patches"], f["tokens"]) == (196, t)
    assert f["linear"] == 12 * (2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d)
    assert f["attention"] == 12 * 2 * (2 * t * t * d)
    assert f["stats"] == 12 * 2 * t * t * d
    report = gpu_check.goal_arithmetic()
    assert "**91.2 images/s**" in report           # 82,081 images / 900 s
    assert "COCO train2014, 82,081 images" in report


def test_gpu_check_goal_only_writes_the_arithmetic(tmp_path):
    assert gpu_check.main(["--goal-only", "--report", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "Not run on a GPU yet" in text and "TFLOP/s" in text


# ----------------------------------------------------------------------------- compare_official


def test_compare_official_skips_without_a_checkout():
    done = run_module("benchmarks.compare_official")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compare_official: skipped:")


def test_compare_official_refuses_a_folder_that_is_not_the_checkout(tmp_path):
    done = run_module("benchmarks.compare_official", "--mctformer-repo", str(tmp_path))
    assert done.returncode != 0
    assert "is not a mctformer checkout (missing models.py" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("WSSS_FAST_MCTFORMER_REPO"),
                    reason="set WSSS_FAST_MCTFORMER_REPO to a checkout of xulianuwa/MCTformer")
def test_compare_official_matches_the_official_generator_on_a_small_model(tmp_path):
    from wsss_fast.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("mctformer_v2", num_classes=3, embed_dim=64, depth=2, num_heads=1)
    torch.save({"model": model.state_dict()}, tmp_path / "small.pth")
    done = run_module("benchmarks.compare_official", "--mctformer-repo",
                      os.environ["WSSS_FAST_MCTFORMER_REPO"], "--mctformer-checkpoint",
                      str(tmp_path / "small.pth"), "--quick", "--work", str(tmp_path / "work"),
                      "--report", str(tmp_path / "report.md"), timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "report.md").read_text()
    diff = float(text.split("max |ours − official| over the normalized maps = ")[1].split()[0])
    assert diff <= 1e-4, text


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("WSSS_FAST_TRANSCAM_REPO"),
                    reason="set WSSS_FAST_TRANSCAM_REPO to a checkout of liruiwen/TransCAM")
def test_compare_official_runs_transcam_through_the_one_official_runner(tmp_path):
    done = run_module("benchmarks.compare_official", "--transcam-repo",
                      os.environ["WSSS_FAST_TRANSCAM_REPO"], "--quick", "--work",
                      str(tmp_path / "work"), "--report", str(tmp_path / "report.md"),
                      timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "report.md").read_text()
    assert "## TransCAM: official `infer_TransCAM.py`" in text
    diff = float(text.split("Max |ours - official| over the saved CAM dicts: ")[1].split()[0]
                 .rstrip("."))
    assert diff <= 1e-4, text


# ----------------------------------------------------------------------------- brief training


def test_train_briefly_spans_the_epochs_its_steps_need_and_reuses_a_checkpoint(tmp_path,
                                                                                monkeypatch):
    from benchmarks import brief_training

    data = tmp_path / "data"
    (data / "ImageSets" / "Segmentation").mkdir(parents=True)
    (data / "ImageSets" / "Segmentation" / "train.txt").write_text(
        "".join(f"2026_{i:06d}\n" for i in range(320)))
    calls = []
    monkeypatch.setattr(brief_training.subprocess, "run", lambda cmd, check: calls.append(cmd))
    for steps, epochs in ((24, "1"), (40, "1"), (41, "2"), (80, "2"), (81, "3")):
        brief_training.train_briefly(data, tmp_path / f"out{steps}", "mctformer_v2",
                                     "mctformer_v2", steps, batch_size=8)
        cmd = calls[-1]
        assert cmd[cmd.index("--epochs") + 1] == epochs
        assert cmd[cmd.index("--max-steps") + 1] == str(steps)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint.pth").write_bytes(b"")
    count = len(calls)
    got = brief_training.train_briefly(data, tmp_path / "done", "mctformer_v2", "mctformer_v2", 9)
    assert got == tmp_path / "done" / "checkpoint.pth" and len(calls) == count


# ----------------------------------------------------------------------------- bf16_report


def test_bf16_report_full_size_quick_trains_extracts_both_dtypes_and_compares(tmp_path):
    done = run_module("benchmarks.bf16_report", "--quick", "--full-size", "--skip", "speed",
                      "attention", "--work", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "--model mctformer_v2_tiny" in out and "--max-steps 2" in out, out
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:4]]
            for line in out.splitlines() if line.startswith(("| fp32 |", "| bf16 |"))}
    assert set(rows) == {"fp32", "bf16"}, out
    assert all(0 <= miou <= 100 and seconds > 0 for miou, seconds in rows.values()), out
    stats = out.split("normalized-CAM |bf16 - fp32|: mean ")[1]
    mean = float(stats.split()[0])
    p99 = float(stats.split("99th percentile ")[1].split(",")[0])
    worst = float(stats.split("max ")[1].split(";")[0])
    # bf16 must have changed the maps (0 would mean the dtype never reached the forward), and
    # the statistics must be ordered.
    assert 0 < mean <= worst <= 1 and p99 <= worst, out
    assert "Structure of the fp32 maps: seed mIoU" in out and "for all background" in out, out


# ----------------------------------------------------------------------------- scaling


def test_model_memory_terms_by_hand():
    m = scaling.model_bytes("single", 224)
    p, t = 196, 216
    assert m["dense"] == p * p * 4
    assert m["streaming"] == 2 * 12 * t * 384 * 4
    assert m["materializing"] == 2 * 12 * 6 * t * t * 4
    # the preset batches image and flip: scale 2.0 of 640×480 is the largest pass
    assert scaling.largest_patches("preset", 640) == 80 * 60
    assert scaling.model_bytes("preset", 640)["dense"] == 2 * (80 * 60) ** 2 * 4


def test_scaling_script_at_a_tiny_size(tmp_path):
    out = tmp_path / "scaling"
    done = run_module("benchmarks.scaling", "--quick", "--sizes", "48", "--presets",
                      "--no-extract", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.with_suffix(".md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 48² one pass"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "9"                              # 3×3 patches
    assert all(float(c) > 0 for c in cells[2:6])        # every variant ran and was timed
    assert out.with_suffix(".png").stat().st_size > 1000
