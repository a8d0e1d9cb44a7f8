"""examples/findings.py: the aggregation over seeds (mean ± std, the spread rule, the tables), the
backbone lookup of --init-dir, and (slow) a tiny resumable run."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_findings():
    spec = importlib.util.spec_from_file_location("findings", ROOT / "examples" / "findings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


findings = _load_findings()


def test_mean_std_is_the_sample_deviation():
    mean, std = findings.mean_std([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
    mean, std = findings.mean_std([0.4])
    assert mean == 0.4 and math.isnan(std)


def test_compare_exceeds_the_spread_only_beyond_the_larger_deviation_with_agreeing_seeds():
    baseline = {0: 0.50, 1: 0.52, 2: 0.48}                      # mean 0.50, std 0.02
    clear = findings.compare(baseline, {0: 0.55, 1: 0.58, 2: 0.56})
    assert clear["delta"] == pytest.approx(0.19 / 3)
    assert clear["spread"] == pytest.approx(0.02)
    assert clear["seed_deltas"] == pytest.approx([0.05, 0.06, 0.08])
    assert clear["exceeds_spread"] is True
    within = findings.compare(baseline, {0: 0.51, 1: 0.49, 2: 0.53})   # Δ 0.01 < 0.02
    assert within["exceeds_spread"] is False
    # |Δ| = 0.14 > spread 0.1, but seed 1 goes the other way: not separated.
    mixed = findings.compare({0: 0.40, 1: 0.60, 2: 0.50}, {0: 0.62, 1: 0.58, 2: 0.72})
    assert mixed["delta"] == pytest.approx(0.14) and mixed["spread"] == pytest.approx(0.1)
    assert mixed["exceeds_spread"] is False
    worse = findings.compare(baseline, {0: 0.40, 1: 0.41, 2: 0.39})
    assert worse["delta"] < 0 and worse["exceeds_spread"] is True


def test_compare_uses_the_common_seeds_and_needs_two():
    both = findings.compare({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.6, 1: 0.7})
    assert both["seeds"] == [0, 1] and both["baseline"][0] == pytest.approx(0.55)
    one = findings.compare({0: 0.5, 1: 0.6}, {1: 0.9})
    assert one["seeds"] == [1] and one["exceeds_spread"] is None


def _results(rows):
    return {row: {s: {"seed_miou": m, "cooccurrence_iou": c, "threshold": 0.3}
                  for s, (m, c) in enumerate(values)} for row, values in rows.items()}


def test_tables_report_mean_std_and_the_verdicts():
    results = _results({"transcam": [(0.50, 0.40), (0.52, 0.42), (0.48, 0.38)],
                        "bnr": [(0.55, 0.41), (0.58, 0.40), (0.56, 0.42)]})
    pair = findings.Pair("BNR vs TransCAM", "transcam", "bnr")
    table = findings.pairs_table(results, [pair])
    miou_line, cooc_line = table.splitlines()[2:]
    assert "| 0 1 2 | seed mIoU | 50.0 ± 2.0 | 56.3 ± 1.5 | +6.3 | +5.0, +6.0, +8.0 |" in miou_line
    assert miou_line.endswith("**yes** (+6.3) |")
    assert "40.0 ± 2.0 | 41.0 ± 1.0 | +1.0" in cooc_line and "| no (+1.0, spread 2.0) |" in cooc_line
    methods = findings.methods_table(results)
    assert "| `bnr` | 0 1 2 | 56.3 ± 1.5 | 0.30 | 41.0 ± 1.0 | 55.0, 58.0, 56.0 |" in methods
    missing = findings.pairs_table({}, [pair])
    assert "n/a (no seed finished)" in missing


def test_rows_of_puts_a_shared_checkpoint_row_first():
    lpcam = findings.Pair("LPCAM", "irn_cam", "lpcam")
    assert findings.rows_of([lpcam]) == ["irn_cam", "lpcam"]
    assert findings.rows_of(findings.PAIRS) == [
        "transcam", "bnr", "mctformer_v2", "mctformer_v2+doei", "mctformer_v2_doei", "irn_cam",
        "lpcam", "edam"]
    assert sorted(findings.RUN_ORDER) == sorted(findings.rows_of(findings.PAIRS))


def test_init_file_picks_each_family_backbone(tmp_path):
    for name in ("vit.pt", "resnet.pt", "resnet38.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert findings.init_file(tmp_path, "edam").name == "resnet38.pt"
    assert findings.init_file(tmp_path, "lpcam").name == "resnet.pt"   # irn_cam's backbone
    assert findings.init_file(tmp_path, "mctformer_v2+doei").name == "vit.pt"
    assert findings.init_file(None, "bnr") is None
    with pytest.raises(SystemExit, match="no conformer"):
        findings.init_file(tmp_path, "bnr")


def test_write_report_reads_finished_seeds_and_variants(tmp_path):
    out = tmp_path / "run"
    values = {"mctformer_v2": (0.50, 0.52), "mctformer_v2+doei": (0.49, 0.50)}
    for row, per_seed in values.items():
        for seed, miou in enumerate(per_seed):
            folder = out / f"seed{seed}" / row
            folder.mkdir(parents=True)
            (folder / "result.json").write_text(json.dumps(
                {"seed_miou": miou, "cooccurrence_iou": miou - 0.1, "threshold": 0.2}))
    default, name = list(findings.DOEI_VARIANTS)[:2]
    folder = findings.variant_dir(out / "seed0", name)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(
        {"seed_miou": 0.6, "cooccurrence_iou": 0.5, "threshold": 0.2}))
    report = tmp_path / "findings.md"
    pairs = [p for p in findings.PAIRS if p.method == "mctformer_v2+doei"]
    text = findings.write_report(out, report, pairs, [0, 1, 2], "full", None, 1.0)
    assert report.read_text() == text == (out / "findings.md").read_text()
    assert "| 0 1 | seed mIoU | 51.0 ± 1.4 | 49.5 ± 0.7 | -1.5 |" in text
    assert f"| {name} | 0 | 60.0 | +10.0 | n/a (< 2 seeds) |" in text
    assert "**Not finished**" in text and "`mctformer_v2` (seeds 2)" in text
    assert f"| {default} | 0 1 | 49.5 ± 0.7 | -1.5 | **yes** (-1.5) |" in text  # the row


@pytest.mark.slow
def test_tiny_run_writes_the_report_and_a_rerun_reuses_every_seed(tmp_path):
    scale = findings.DemoScale(num_train=16, num_val=4, image_size=(64, 64),
                               train_overrides={"epochs": 1, "batch_size": 8, "crop": 64})
    pairs = [p for p in findings.PAIRS if p.method == "mctformer_v2+doei"]
    report = tmp_path / "findings.md"
    kwargs = dict(seeds=[0, 1], pairs=pairs, scale=scale, scale_name="tiny", report=report,
                  workers=0)
    text = findings.run(tmp_path / "run", **kwargs)
    assert "| 0 1 | seed mIoU |" in text
    results = sorted((tmp_path / "run").glob("seed*/**/result.json"))
    assert len(results) == 2 * (2 + len(findings.DOEI_VARIANTS) - 1)   # default: the row
    stamps = {p: p.stat().st_mtime_ns for p in results}
    checkpoints = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("seed*/*/train/*.pth")}
    assert len(checkpoints) == 2 * 2        # checkpoint + state per seed
    assert findings.run(tmp_path / "run", **kwargs).split("this invocation")[0] == \
        text.split("this invocation")[0]
    assert {p: p.stat().st_mtime_ns for p in results} == stamps
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints


def test_init_dir_passes_the_backbone_to_training(tmp_path):
    from wsss_fast.train.config import TrainConfig
    backbone = tmp_path / "vit.pt"
    if "init" not in TrainConfig.__dataclass_fields__:       # before `train --init` exists
        with pytest.raises(SystemExit, match="train --init"):
            findings._scale_with_init(findings.FULL, backbone, "mctformer_v2")
        return
    scale = findings._scale_with_init(findings.FULL, backbone, "mctformer_v2")
    assert scale.train_overrides["init"] == str(backbone)
    assert findings._scale_with_init(findings.FULL, None, "bnr") is findings.FULL


def test_pretrained_runs_from_the_shipped_backbones_and_the_report_says_so(tmp_path,
                                                                          monkeypatch):
    calls = []
    monkeypatch.setattr(findings, "run", lambda out, **kwargs: calls.append(kwargs) or "")
    assert findings.main(["--out", str(tmp_path / "run"), "--pretrained", "--pairs", "bnr"]) == 0
    assert calls[-1]["init_dir"] == findings.PRETRAINED_DIR
    assert [p.method for p in calls[-1]["pairs"]] == ["bnr"]
    assert findings.main(["--out", str(tmp_path / "run"), "--pairs", "bnr"]) == 0
    assert calls[-1]["init_dir"] is None
    with pytest.raises(SystemExit):
        findings.main(["--out", str(tmp_path), "--pretrained", "--init-dir", str(tmp_path)])
    out = tmp_path / "report"
    (out / "data").mkdir(parents=True)
    pairs = [p for p in findings.PAIRS if p.method == "bnr"]
    shipped = findings.write_report(out, None, pairs, [0], "full", findings.PRETRAINED_DIR, 1.0)
    assert "the shipped backbones, pretrained/" in shipped.splitlines()[0]
    assert "--seeds 0 --pretrained --out OUT" in shipped
    other = findings.write_report(out, None, pairs, [0], "full", tmp_path, 1.0)
    assert f"--init-dir {tmp_path} --out OUT" in other and "--pretrained" not in other
