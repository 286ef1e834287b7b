"""One registry for every name the config picks: registered entries and "package.module:function" imports."""
from __future__ import annotations

import pytest

from grpo_megatron.errors import UserError
from grpo_megatron.registry import Registry, UnknownNameError, import_object, is_import_path


def widget() -> str:
    return "made"


def test_registered_entries_by_name():
    registry = Registry("widget")
    registry.add("b", 2)
    registry.register("a")(1)
    assert registry.get("a") == 1 and registry.get("b") == 2 and registry.names() == ("a", "b")
    assert "a" in registry and "c" not in registry and f"{__name__}:widget" not in registry
    with pytest.raises(ValueError, match="^widget 'a' is already registered$"):
        registry.add("a", 3)


def test_an_import_path_resolves_to_the_object():
    registry = Registry("widget")
    assert is_import_path(f"{__name__}:widget") and not is_import_path("widget")
    assert registry.get(f"{__name__}:widget") is widget
    assert import_object("math:pi", "constant") == pytest.approx(3.14159265)


@pytest.mark.parametrize("name, message", [
    ("tests.test_registry:nothing", "widget 'tests.test_registry:nothing' cannot be imported (module "),
    ("no_such_module:f", "widget 'no_such_module:f' cannot be imported (No module named 'no_such_module')"),
    (":f", "widget ':f' cannot be imported ("),
])
def test_an_import_path_that_does_not_import_is_a_user_error(name, message):
    with pytest.raises(UnknownNameError) as caught:
        Registry("widget").get(name)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(message)
    assert str(caught.value).endswith("; give 'package.module:function' importable from the run's environment")


def test_an_unknown_name_lists_the_known_ones_and_the_hint():
    registry = Registry("widget", hint=" (add one with @register_widget)")
    registry.add("spin", 1)
    registry.add("roll", 2)
    registry.add("", 3)  # an empty name (rollout.function's default) is listed quoted
    with pytest.raises(UnknownNameError) as caught:
        registry.get("spun")
    assert str(caught.value) == "unknown widget 'spun'; known: '', roll, spin (add one with @register_widget)"
