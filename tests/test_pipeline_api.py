"""The Python API under the CLI (README "Python API"): synthetic data → extract, resumably →
evaluate, called as functions; the one dataset-job runner with a stage of its own; and errors
that carry their cause instead of an exit status."""

import dataclasses
import json

import pytest
import torch

from wsss_fast.cli import main
from wsss_fast.pipeline import (EvaluateOptions, ExtractOptions, InputError, JobSpec,
                                OptionsError, PipelineError, SynthOptions, evaluate, extract,
                                run_dataset_job, synth)
from wsss_fast.pipeline.job import item_path
from wsss_fast.pipeline.options import DatasetOptions


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from wsss_fast.models.registry import create_model, save_model
    root = tmp_path_factory.mktemp("api")
    data = synth(SynthOptions(out=root / "data", num_train=4, num_val=3, size=(64, 64),
                              workers=0))
    torch.manual_seed(0)
    save_model(create_model("mctformer_v2_tiny", num_classes=8), root / "v2.pth")
    return root, data


def _options(root, data, **changes):
    options = ExtractOptions(data=data, split="val", model="mctformer_v2_tiny",
                             checkpoint=root / "v2.pth", out=root / "cams", device="cpu",
                             workers=0, quiet=True)
    return dataclasses.replace(options, **changes)


def test_extract_resumes_then_evaluate(synthetic):
    root, data = synthetic
    first = extract(_options(root, data))
    assert first.counts["done"] == 3 and first.exit_status == 0
    assert first.manifest == json.loads(first.manifest_path.read_text())
    cams = sorted((first.out_dir / "cams").glob("*.npy"))
    assert len(cams) == 3
    stamps = [p.stat().st_mtime_ns for p in cams]
    again = extract(_options(root, data))            # a second call does nothing new
    assert again.counts["done"] == 0 and again.counts["already_done"] == 3
    assert [p.stat().st_mtime_ns for p in cams] == stamps
    result = evaluate(EvaluateOptions(data=data, split="val", cams=first.out_dir / "cams",
                                      workers=0))
    assert result.images == 3 and result.exit_status == 0
    assert 0.0 <= result.report["best_miou"] <= 1.0
    assert result.report["best_threshold"] in result.report["thresholds"]


def test_missing_checkpoint_raises_with_its_cause(synthetic, capsys):
    root, data = synthetic
    missing = root / "missing.pth"
    with pytest.raises(InputError, match="missing.pth") as info:
        extract(_options(root, data, checkpoint=missing, out=root / "bad"))
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert isinstance(info.value, PipelineError) and isinstance(info.value, ValueError)
    # The CLI maps it to one line and status 2.
    assert main(["extract", "--data", str(data), "--split", "val", "--model",
                 "mctformer_v2_tiny", "--checkpoint", str(missing), "--out", str(root / "bad"),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pth" in err[0]


def test_bad_options_raise_options_errors(synthetic):
    root, data = synthetic
    with pytest.raises(OptionsError, match="--out"):
        extract(_options(root, data, out=None))
    with pytest.raises(OptionsError, match="--method 'bogus'"):   # the CLI's choices, in Python
        extract(_options(root, data, method="bogus"))
    with pytest.raises(OptionsError, match="--batch-size"):
        extract(_options(root, data, batch_size=0))
    with pytest.raises(OptionsError, match="--cams"):
        evaluate(EvaluateOptions(data=data, split="val"))
    with pytest.raises(InputError, match="not a folder"):
        extract(dataclasses.replace(_options(root, data), data=root / "nowhere"))


def test_run_dataset_job_with_a_stage_of_its_own(synthetic, tmp_path):
    """A per-item stage written against the runner: resume, skipped items, exit status."""
    root, data = synthetic
    out = tmp_path / "sizes"
    calls = []

    def setup(dataset, context):
        def outputs(item):
            return {"size": item_path(out / "sizes", item, ".txt")}

        def work(todo, state):
            for item in todo:
                calls.append(item)
                if item == dataset.ids[0]:
                    state.record_skipped(item, "first image refused")
                    continue
                path = outputs(item)["size"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(str(dataset.sample(item).image_path))
                state.record_done(item, outputs(item))

        return JobSpec(config={"stage": "sizes"}, outputs=outputs, work=work)

    first = run_dataset_job("sizes", DatasetOptions(data=data, split="val"), out, setup)
    assert first.counts == {"assigned": 3, "done": 2, "already_done": 0, "skipped": 1}
    assert first.manifest["skipped"][0]["reason"] == "first image refused"
    assert first.exit_status == 0
    second = run_dataset_job("sizes", DatasetOptions(data=data, split="val"), out, setup)
    assert second.counts["already_done"] == 2 and second.counts["skipped"] == 1
    assert len(calls) == 4                           # only the refused image was retried
