"""transcam_report's command line: the official comparison is skipped, with a message, without a
checkout, and a path that is not one is refused in one line."""

import pytest

from benchmarks import transcam_report


def test_without_a_checkout_the_official_comparison_is_skipped(capsys, tmp_path):
    out = tmp_path / "report.md"
    assert transcam_report.main(["--skip-cnn", "--output", str(out)]) == 0
    assert "no --transcam-repo given, skipping" in capsys.readouterr().err
    assert out.read_text().startswith("# TransCAM and CNN CAM presets")


def test_a_path_without_the_official_script_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no infer_TransCAM.py there"):
        transcam_report.main(["--transcam-repo", str(tmp_path), "--skip-cnn"])


def test_bad_cnn_image_size_is_refused():
    with pytest.raises(SystemExit, match="WIDTHxHEIGHT"):
        transcam_report.parse_size("500-375")
