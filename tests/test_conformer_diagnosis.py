"""examples/conformer_diagnosis.py: the locality measure separates a deep Conformer CNN branch
from a shallow ResNet CAM, and the script runs end to end on a tiny synthetic set."""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("conformer_diagnosis",
                                                  ROOT / "examples" / "conformer_diagnosis.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


diagnosis = _load()


def test_locality_is_a_share_and_lower_for_the_tiny_conformer_than_the_tiny_resnet():
    from wsss_fast.models.registry import create_model
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    conformer = create_model("transcam_tiny", num_classes=8).eval()
    resnet = create_model("resnet_cam_tiny", num_classes=8).eval()
    conformer_share, resnet_share = diagnosis.locality(conformer, x), diagnosis.locality(resnet, x)
    assert 0 < conformer_share < resnet_share <= 1
    # the whole image as the window: all of the gradient mass
    assert abs(diagnosis.locality(resnet, x, radius=256) - 1) < 1e-6


def test_the_script_runs_on_a_tiny_synthetic_set(tmp_path, capsys):
    from wsss_fast.models.registry import create_model
    from wsss_fast.pipeline.synth import SynthOptions, synth
    data = synth(SynthOptions(out=str(tmp_path / "data"), num_train=2, num_val=4, size=(96, 96),
                              workers=1))
    checkpoint = tmp_path / "transcam.pth"
    torch.save(create_model("transcam_tiny", num_classes=8).state_dict(), checkpoint)
    png = tmp_path / "maps.png"
    diagnosis.main([str(checkpoint), str(data), "--images", "4", "--size", "96",
                    "--png", str(png)])
    out = capsys.readouterr().out
    assert "conv head" in out and "transformer head" in out
    entropy_line = next(line for line in out.splitlines() if "per block" in line)
    assert len(entropy_line.split(":")[1].split()) == 6                    # one per block
    assert "random init" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
