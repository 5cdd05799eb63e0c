"""The one registry every named, pluggable thing uses: duplicate names refused, built-ins imported on demand,
unknown names answered in one line that lists the known ones, plugin paths only where the registry allows them."""

from __future__ import annotations

import sys

import pytest
from argrpo.errors import UnknownNameError, UserError
from argrpo.registry import PluginImportError, Registry


def test_register_lookup_and_duplicates():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.lookup("a") is a and reg["a"] is a and "a" in reg and sorted(reg) == ["a"]
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", object())
    assert reg.lookup("a") is a  # the refused registration changed nothing
    with pytest.raises(ValueError, match="without ':'"):
        reg.add("pkg:thing", object())


def test_unknown_name_is_one_line_listing_the_known():
    reg = Registry("widget")
    reg.add("alpha", 1)
    reg.add("beta", 2)
    with pytest.raises(UnknownNameError) as info:
        reg.lookup("alpah")
    msg = str(info.value)
    assert msg == "unknown widget 'alpah'; registered: ['alpha', 'beta']"
    with pytest.raises(UnknownNameError, match=r"^run.yaml: widget: unknown widget 'x'; registered"):
        reg.lookup("x", where="run.yaml: widget")
    # callers that caught KeyError or ValueError before still do; the CLI sees a user error
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError) and isinstance(info.value, UserError)


def test_builtin_modules_are_imported_on_first_miss(tmp_path, monkeypatch):
    reg = Registry("widget", builtins={"lazy": "argrpo_test_lazy_widget", "gone": "argrpo_test_no_such_module"})
    (tmp_path / "argrpo_test_lazy_widget.py").write_text(
        "from tests_registry_target import REG\nREG.add('lazy', 42)\n")
    target = type(sys)("tests_registry_target")
    target.REG = reg
    monkeypatch.setitem(sys.modules, "tests_registry_target", target)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "lazy" not in reg and reg.names() == ["gone", "lazy"]  # known before their modules are imported
    assert reg.lookup("lazy") == 42
    with pytest.raises(UnknownNameError, match="unknown widget 'gone'"):
        reg.lookup("gone")  # its module does not exist: nothing registers that name


def test_builtin_with_a_missing_dependency_says_which(tmp_path, monkeypatch):
    reg = Registry("widget", builtins={"needy": "argrpo_test_needy_widget"})
    (tmp_path / "argrpo_test_needy_widget.py").write_text("import argrpo_test_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="widget 'needy' needs a package that is missing: argrpo_test_absent_dep"):
        reg.lookup("needy")


def test_plugin_paths_only_where_allowed(tmp_path, monkeypatch):
    (tmp_path / "argrpo_test_plugin.py").write_text("class Thing:\n    value = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    open_reg = Registry("widget", plugins=True)
    assert open_reg.lookup("argrpo_test_plugin:Thing.value") == 7
    with pytest.raises(PluginImportError, match="widget 'argrpo_test_plugin:Nope': module 'argrpo_test_plugin' has no"):
        open_reg.lookup("argrpo_test_plugin:Nope")
    with pytest.raises(PluginImportError, match="cannot import module 'argrpo_test_missing'.*PYTHONPATH"):
        open_reg.lookup("argrpo_test_missing:x")
    with pytest.raises(UnknownNameError, match=r"or name a plugin as 'package.module:attr'"):
        open_reg.lookup("nothing")
    closed = Registry("widget")
    with pytest.raises(UnknownNameError, match="unknown widget 'argrpo_test_plugin:Thing'"):
        closed.lookup("argrpo_test_plugin:Thing")


def test_the_package_registries_share_the_rules():
    """Each registry of the packages is a Registry and finds its built-ins by name without a prior import."""
    from argrpo.models.families import FAMILIES
    from argrpo.models.image_tokenizers import IMAGE_TOKENIZERS
    from argrpo.models.layout import LAYOUT_PRESETS
    from argrpo.models.policy import SIZE_PRESETS
    from argrpo.recipes.commands import COMMANDS
    from argrpo.rewards.base import REWARDS
    from argrpo.rewards.detectors.base import DETECTORS
    from argrpo.rollout.engines.base import ENGINES

    for reg in (REWARDS, DETECTORS, ENGINES, IMAGE_TOKENIZERS, LAYOUT_PRESETS, SIZE_PRESETS, FAMILIES, COMMANDS):
        assert isinstance(reg, Registry)
    assert DETECTORS.lookup("shapes").__name__ == "ShapesDetector"
    assert ENGINES.lookup("torch").__name__ == "TorchEngine"
    assert IMAGE_TOKENIZERS.lookup("vq").kind == "vq"
    assert COMMANDS.lookup("grpo").name == "grpo"
    assert {"geneval", "clip"} <= set(REWARDS.names())
    with pytest.raises(UnknownNameError, match=r"unknown layout preset 'simpelar'; registered: \['shapes', 'simplear'"):
        LAYOUT_PRESETS.lookup("simpelar")
