"""The model and preset registries: built-ins are never hidden by a custom entry registered first,
one spelling across methods, models and presets, and the model entries' defaults."""

import subprocess
import sys
import textwrap

import pytest

from wsss_fast.engine.presets import PRESETS, Preset, get_preset, register_preset
from wsss_fast.models.registry import (MODELS, ModelEntry, create_model, list_models,
                                       model_preset, register_model)
from wsss_fast.registry import UnknownName, canonical_name

# Every training method and, for those that name a family, the family it trains.
METHODS = ("mctformer_v1", "mctformer_v2", "mctformer_plus", "mctformer_v2_doei", "transcam",
           "bnr", "token_cam", "irn_cam", "edam")
NOT_A_FAMILY = {"bnr": "transcam"}   # BNR trains TransCAM's model with another loss


def test_custom_entries_registered_first_hide_no_builtin():
    """In a fresh interpreter (no model module imported yet): a custom model and a custom preset
    first, then the built-ins still resolve."""
    script = textwrap.dedent("""
        import sys
        from torch import nn
        from wsss_fast.models.registry import (ModelEntry, create_model, list_models,
                                               model_preset, register_model)
        from wsss_fast.engine.presets import Preset, get_preset, register_preset

        assert "wsss_fast.models.mctformer" not in sys.modules   # built-ins not loaded yet
        register_model("mine", ModelEntry(lambda num_classes=2: nn.Linear(1, num_classes),
                                          "token_cam"))
        register_preset(Preset("my_preset", scales=(1.0, 2.0)))
        model = create_model("mctformer_v2", num_classes=3, embed_dim=64, depth=1, num_heads=1)
        assert type(model).__name__ == "MCTformer", type(model)
        assert {"mine", "mctformer_v2", "mctformer_v2_tiny", "edam"} <= set(list_models())
        assert model_preset("token_cam") == "token_cam"
        assert model_preset("mine") == "token_cam"
        assert get_preset("token_cam").name == "token_cam"
        assert get_preset("my-preset").scales == (1.0, 2.0)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("method_name", METHODS)
def test_methods_models_and_presets_use_one_spelling(method_name):
    from wsss_fast.train.methods import get_method

    method = get_method(method_name)
    entry = MODELS.get(method.model)
    preset = canonical_name(method.preset)
    assert preset in PRESETS
    assert entry.preset == preset
    assert entry.family == NOT_A_FAMILY.get(method_name, method_name) == preset


def test_every_model_names_a_registered_preset():
    for name in list_models():
        assert MODELS.get(name).preset in PRESETS, name
        assert name == canonical_name(name)
    assert set(PRESETS.names()) >= {"mctformer_v1", "mctformer_v2", "mctformer_plus",
                                    "mctformer_v2_doei", "transcam", "token_cam", "irn_cam",
                                    "edam"}
    for name in PRESETS.names():
        assert get_preset(name).name == name


def test_preset_defaults_to_the_family_and_can_be_overridden():
    assert ModelEntry(create_model, "mctformer-v2").preset == "mctformer_v2"
    assert ModelEntry(create_model, "mctformer_v2", preset="token-cam").preset == "token_cam"
    assert model_preset("mctformer_v2_tiny") == "mctformer_v2"
    assert model_preset("resnet50_cam") == "irn_cam"


def test_hyphen_spellings_resolve():
    assert model_preset("mctformer-v2-tiny") == "mctformer_v2"
    assert get_preset("mctformer-v2") == get_preset("mctformer_v2") == PRESETS.get("mctformer_v2")
    assert get_preset("Token-CAM").name == "token_cam"


def test_registration_errors():
    with pytest.raises(UnknownName, match=r"unknown model 'nope'; known: affinitynet, affinitynet_tiny, edam, edam_tiny"):
        create_model("nope")
    with pytest.raises(UnknownName, match=r"unknown preset 'nope'; known: edam, irn_cam"):
        get_preset("nope")
    with pytest.raises(ValueError, match="register a ModelEntry"):
        register_model("plain_builder", create_model)
    with pytest.raises(ValueError, match="already registered"):
        register_model("mctformer_v2", MODELS.get("mctformer_v2"))
    with pytest.raises(ValueError, match="use lower case"):
        register_model("My-Model", MODELS.get("mctformer_v2"))
    with pytest.raises(ValueError, match="register a Preset"):
        register_preset({"name": "dict_preset"})
    with pytest.raises(ValueError, match="already registered"):
        register_preset(Preset("token_cam"))


def test_a_custom_model_is_created_and_removed():
    from torch import nn

    register_model("test_linear", ModelEntry(lambda num_classes=2: nn.Linear(3, num_classes),
                                             "irn_cam", defaults={"num_classes": 5}))
    try:
        assert create_model("test-linear").out_features == 5
        assert create_model("test_linear", num_classes=7).out_features == 7
        assert model_preset("test_linear") == "irn_cam"
    finally:
        MODELS.unregister("test_linear")
    assert "test_linear" not in list_models()
