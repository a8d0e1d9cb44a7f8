"""The registry convention shared by models, presets and methods."""

import sys
import pytest

from wsss_fast.registry import Registry, UnknownName, canonical_name



def test_custom_entry_first_does_not_hide_builtins():
    registry = Registry("thing", builtin_modules=("fake_builtin_things",))
    import importlib.abc
    import importlib.machinery

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "fake_builtin_things":
                return importlib.machinery.ModuleSpec(fullname, self)
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            registry.register("builtin_a", 1)
            registry.register("builtin_b", 2)

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        registry.register("mine", 3)        # before any lookup
        assert registry.get("builtin_a") == 1
        assert registry.names() == ["builtin_a", "builtin_b", "mine"]
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("fake_builtin_things", None)


def test_one_spelling_and_hyphen_lookup():
    registry = Registry("preset")
    registry.register("mctformer_v2", "v2")
    assert registry.get("mctformer-v2") == "v2"
    assert "MCTformer-V2" in registry
    with pytest.raises(ValueError, match="use lower case"):
        registry.register("mctformer-v1", "v1")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("mctformer_v2", "again")
    registry.register("mctformer_v2", "replaced", override=True)
    assert registry["mctformer_v2"] == "replaced"


def test_unknown_name_lists_known():
    registry = Registry("model")
    registry.register("a", 1)

    @registry.register("b")
    def builder():
        return 2

    with pytest.raises(UnknownName, match=r"unknown model 'c'; known: a, b"):
        registry.get("c")
    assert registry.get("b") is builder
    assert canonical_name(" Token-CAM ") == "token_cam"
    with pytest.raises(UnknownName):
        canonical_name(3)
