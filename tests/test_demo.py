"""The demo (``wsss-fast demo``) at a tiny size: every stage runs, the report holds the measured
numbers, an inference plug-in row reuses its trained method's checkpoint, and a rerun resumes."""

import json

import numpy as np
import pytest

from wsss_fast.demo import (DEMO_METHODS, INFERENCE_PLUGINS, STAGES, TIMING, DemoRun, DemoScale,
                            MethodResult, StageTimes, irnet_source, report_table, row_tasks,
                            run_demo, stage_table)

TINY = DemoScale(num_train=16, num_val=4, image_size=(64, 64),
                 train_overrides={"epochs": 1, "batch_size": 8, "crop": 64})
# The default stages, named: the shipped backbones and the learned (IRNet) walk.
OPTIONAL_STAGES = dict(pretrained=True, learned_rw=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # Two rows at once (worker processes); the rerun below runs them one after another.
    report = run_demo(out, workers=0, methods=("mctformer_v2", "mctformer_v2+doei"), scale=TINY,
                      jobs=2, **OPTIONAL_STAGES)
    return out, report


def test_report_holds_the_measured_numbers(demo):
    out, report = demo
    results = {r["method"]: r for r in json.loads((out / "report.json").read_text())["results"]}
    assert list(results) == ["mctformer_v2", "mctformer_v2+doei"]
    for method, result in results.items():
        evaluation = json.loads((out / method / "eval_seeds" / "evaluation.json").read_text())
        assert result["seed_miou"] == evaluation["best_miou"]
        assert result["threshold"] == evaluation["best_threshold"]
        for stage in ("crf", "rw"):
            measured = json.loads((out / method / f"eval_{stage}" / "evaluation.json").read_text())
            assert result[f"{stage}_miou"] == measured["at_best"]["miou"]["nanmean"]
            assert 0.0 <= result[f"{stage}_miou"] <= 1.0
        assert result["seconds_per_image"] > 0
        assert "image-gradient" not in result["note"]      # the learned walk made +RW
        manifest = json.loads((out / method / "walk" / "manifest-refine.json").read_text())
        assert manifest["config"]["checkpoint"] == str((out / "irnet" /
                                                        "checkpoint.pth").resolve())
        assert manifest["config"]["save_scores"] and manifest["counts"]["skipped"] == 0
        # +RW's threshold: the best of the walked maps' sweep, as the seed's; then the CRF
        sweep = json.loads((out / method / "eval_walk" / "evaluation.json").read_text())
        assert sweep["mode"] == "cams" and sweep["images"] == TINY.num_val
        assert result["rw_threshold"] == sweep["best_threshold"]
        labels = json.loads((out / method / "walk_crf" / "manifest-pseudo-label.json")
                            .read_text())["config"]
        assert labels["cams"] == str((out / method / "walk" / "scores").resolve())
        assert labels["threshold"] == round(result["rw_threshold"], 4) and labels["crf"] == "irn"
        assert f"| {100 * result['rw_miou']:.1f} | {result['rw_threshold']:.2f} |" in \
            report.read_text()
        assert f"| {method} | {100 * result['seed_miou']:.1f} |" in report.read_text()
    # One IRNet for the learned rows, trained on the first one's confident regions.
    assert irnet_source(out) == "mctformer_v2"
    assert json.loads((out / "irnet" / "train.json").read_text())["finished"]
    assert not (out / "mctformer_v2+doei" / "confident").exists()
    assert "confident regions of mctformer_v2" in report.read_text()
    for name in ("sweep_curves.png", "gallery.png"):
        assert (out / name).stat().st_size > 0


def test_each_row_records_its_step_times(demo):
    out, report = demo
    saved = json.loads((out / "report.json").read_text())
    assert saved["jobs"] == 2 and len(saved["invocations"]) == 1
    expected = {"mctformer_v2": {"train", "extract", "evaluate", "crf", "irnet", "rw"},
                "mctformer_v2+doei": {"extract", "evaluate", "crf", "rw"}}   # no training
    for method, stages in expected.items():
        timing = json.loads((out / method / TIMING).read_text())
        assert set(timing) == stages and all(t["done"] and t["seconds"] > 0
                                             for t in timing.values())
        assert saved["stage_seconds"][method] == {k: t["seconds"] for k, t in timing.items()}
    v2 = saved["stage_seconds"]["mctformer_v2"]
    assert saved["results"][0]["train_seconds"] == v2["train"]
    text = report.read_text()
    assert "this folder took 1 invocation" in text
    assert "| row | train | extract | evaluate | crf | irnet | rw | total |" in text
    assert f"| mctformer_v2 | {v2['train']:.0f} |" in text


def test_gallery_rows_show_present_classes_and_the_png_has_a_cell_per_method(demo):
    import cv2
    from wsss_fast.data.images import read_label_png
    from wsss_fast.demo import gallery_rows
    out, _ = demo
    rows = gallery_rows(out / "data", 6)
    assert rows and len(set(rows)) == len(rows)
    for item, k in rows:
        assert (read_label_png(out / "data" / "SegmentationClass" / f"{item}.png") == k + 1).any()
    classes = [k for _, k in rows]
    assert len(set(classes[:2])) == len(classes[:2])      # a new class while there is one
    gallery = cv2.imread(str(out / "gallery.png"))      # a PNG any reader opens
    assert gallery.shape[0] > len(rows) * 64 and gallery.shape[1] > 4 * 64   # image, GT, 2 rows


def test_plugin_row_reuses_the_trained_checkpoint(demo):
    out, report = demo
    trained, model, settings = INFERENCE_PLUGINS["mctformer_v2+doei"]
    assert not (out / "mctformer_v2+doei" / "train").exists()
    manifest = json.loads((out / "mctformer_v2+doei" / "extract" /
                           "manifest-extract.json").read_text())
    assert manifest["config"]["model"] == model
    assert manifest["config"]["checkpoint"].endswith(f"{trained}/train/checkpoint.pth")
    # The plug-in changes the maps: the two rows' CAMs differ.
    ids = (out / "data" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    base = np.load(out / trained / "extract" / "cams" / f"{ids[0]}.npy", allow_pickle=True).item()
    plug = np.load(out / "mctformer_v2+doei" / "extract" / "cams" / f"{ids[0]}.npy",
                   allow_pickle=True).item()
    assert not np.allclose(base["high_res"], plug["high_res"])
    assert f"- mctformer_v2+doei: {trained}'s checkpoint" in report.read_text()


def test_rerun_resumes_without_retraining(demo):
    out, _ = demo
    checkpoint = out / "mctformer_v2" / "train" / "checkpoint.pth"
    before = checkpoint.stat().st_mtime_ns
    first = json.loads((out / "report.json").read_text())
    run_demo(out, workers=0, methods=("mctformer_v2", "mctformer_v2+doei"), scale=TINY,
             jobs=1, **OPTIONAL_STAGES)
    assert checkpoint.stat().st_mtime_ns == before
    again = json.loads((out / "report.json").read_text())
    for a, b in zip(first["results"], again["results"]):
        assert a["seed_miou"] == b["seed_miou"] and a["rw_miou"] == b["rw_miou"]
        assert a["train_seconds"] == b["train_seconds"] or a["method"] == "mctformer_v2+doei"
        assert a["seconds_per_image"] == b["seconds_per_image"] > 0   # not the rerun's no-op
    # The rerun found every step done: the steps keep the times they took when they ran.
    assert again["stage_seconds"] == first["stage_seconds"]
    assert [run["jobs"] for run in again["invocations"]] == [2, 1]
    assert "this folder took 2 invocations; the earlier ones: " in (out / "report.md").read_text()


def test_stage_times_add_an_interrupted_part_and_keep_a_finished_step(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import wsss_fast.demo as demo_module
    clock = iter([0.0, 5.0, 10.0, 13.0, 20.0, 21.0])
    monkeypatch.setattr(demo_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    with pytest.raises(KeyboardInterrupt):
        with StageTimes(tmp_path).stage("train"):
            raise KeyboardInterrupt   # 5 s in
    assert json.loads((tmp_path / TIMING).read_text()) == {"train": {"seconds": 5.0,
                                                                     "done": False}}
    with StageTimes(tmp_path).stage("train"):   # the resumption: 3 s more
        pass
    with StageTimes(tmp_path).stage("train"):   # found done: not timed again
        pass
    with StageTimes(tmp_path).stage("extract"):
        pass
    assert StageTimes(tmp_path).seconds() == {"train": 8.0, "extract": 1.0}
    with pytest.raises(ValueError, match="unknown stage 'walk'"):
        with StageTimes(tmp_path).stage("walk"):
            pass


def test_stage_table_has_a_total_per_row_and_per_stage():
    table = stage_table({"a": {"train": 10.0, "rw": 2.0}, "b": {"extract": 4.0}}).splitlines()
    assert table[0] == "| row | train | extract | rw | total |"
    assert table[2:] == ["| a | 10 | — | 2 | 12 |", "| b | — | 4 | — | 4 |",
                         "| total | 10 | 4 | 2 | 16 |"]
    assert set(STAGES) >= {"train", "prototypes", "extract", "evaluate", "crf", "irnet", "rw"}


def _dependencies(methods, learned_rw=True):
    run = DemoRun(None, None, TINY, 0, 0, "cpu", (), learned_rw=learned_rw)
    return {name: set(depends) for name, _, depends in row_tasks(methods, run)}


def test_rows_wait_for_the_checkpoint_and_the_irnet_they_use(monkeypatch):
    # Every demo row walks over the IRNet now; a row outside LEARNED_RW (EDAM's, as before it
    # joined) keeps the image-gradient walk and waits for nothing.
    import wsss_fast.demo as demo
    monkeypatch.setattr(demo, "LEARNED_RW", tuple(m for m in demo.LEARNED_RW if m != "edam"))
    tasks = _dependencies(["edam", "token_cam", "mctformer_v2+doei", "mctformer_v2"])
    # The IRNet trains on the first learned-walk row; every learned walk waits for it.
    assert tasks["irnet"] == {"seeds:token_cam"}
    assert tasks["seeds:mctformer_v2+doei"] == {"seeds:mctformer_v2"}   # v2's checkpoint
    for method in ("mctformer_v2+doei", "token_cam", "mctformer_v2"):
        assert tasks[f"walk:{method}"] == {f"seeds:{method}", "irnet"}
    assert tasks["walk:edam"] == {"seeds:edam"} and not tasks["seeds:edam"]
    # Every demo row has its tasks (LPCAM's row is no training method of its own).
    every = _dependencies(list(DEMO_METHODS))
    assert {f"seeds:{m}" for m in DEMO_METHODS} <= set(every) and not every["seeds:lpcam"]
    # Without its trained method in the demo, the plug-in row trains it itself.
    assert not _dependencies(["mctformer_v2+doei"])["seeds:mctformer_v2+doei"]
    assert "irnet" not in _dependencies(["token_cam", "mctformer_v2"], learned_rw=False)


def test_jobs_must_be_a_positive_integer(tmp_path):
    with pytest.raises(ValueError, match="jobs must be an integer >= 1, got 0"):
        run_demo(tmp_path, jobs=0, scale=TINY)
    assert not any(tmp_path.iterdir())
    from wsss_fast.cli import main
    assert main(["demo", "--jobs", "0", "--out", str(tmp_path / "x")]) == 2


def test_report_table_marks_missing_values_and_lists_notes():
    table = report_table([MethodResult("a", seed_miou=0.5, threshold=0.3, seconds_per_image=0.1,
                                       train_seconds=12.0, rw_miou=0.6, rw_threshold=0.55),
                          MethodResult("b", note="reuses a")])
    rows = table.splitlines()
    assert rows[2].startswith("| a | 50.0 | 0.30 |") and rows[2].endswith("| 0.100 | 12 |")
    assert "| 60.0 | 0.55 | 0.100 |" in rows[2]        # +RW and its own threshold
    assert "| b | n/a |" in rows[3] and rows[3].endswith("| — |")
    assert rows[-1] == "- b: reuses a"


def test_cli_walk_flags():
    from wsss_fast.cli import build_parser
    parser, _ = build_parser(only="demo")
    assert parser.parse_args(["demo"]).learned_rw                 # the learned walk by default
    assert parser.parse_args(["demo", "--learned-rw"]).learned_rw
    assert not parser.parse_args(["demo", "--gradient-rw"]).learned_rw
    assert not parser.parse_args(["demo", "--no-learned-rw"]).learned_rw
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--learned-rw", "--gradient-rw"])


def test_edam_warm_phase_fits_every_scale():
    """The demo's EDAM entry trains a warm phase; shorter scales keep its share of the epochs."""
    from wsss_fast.demo import FULL, PRETRAINED_TRAIN, QUICK, train_overrides
    from wsss_fast.train import TrainConfig
    entry = PRETRAINED_TRAIN["edam"]
    assert 0 < entry["warm_epochs"] < entry["epochs"]
    full = train_overrides("edam", FULL, pretrained=True)
    assert {k: full[k] for k in entry} == entry and full["init"].endswith("resnet38.pt")
    quick = train_overrides("edam", QUICK, pretrained=True)
    assert (quick["epochs"], quick["warm_epochs"]) == (2, 1)
    tiny = train_overrides("edam", TINY, pretrained=True)
    assert tiny["epochs"] == 1 and not {"warm_epochs", "lr_after_warm"} & set(tiny)
    for overrides in (full, quick, tiny):
        config = TrainConfig.from_recipe("synthetic", method="edam", data="d", out="o",
                                         **overrides)
        assert config.problems() == []
    assert "warm_epochs" not in train_overrides("edam", FULL, pretrained=False)
