from __future__ import annotations

import pytest

from dragontrainer.errors import RecipeError
from dragontrainer.registry import Registry, all_components


def test_register_get_and_describe() -> None:
    things = Registry("test thing")

    @things.register("alpha")
    def alpha() -> int:
        """The first letter."""
        return 1

    assert things.get("alpha")() == 1
    assert things.describe() == {"alpha": "The first letter."}
    with pytest.raises(ValueError, match="registered twice"):
        things.register("alpha")(alpha)
    with pytest.raises(RecipeError, match="unknown test thing 'alpa'. Did you mean 'alpha'"):
        things.get("alpa")


def test_every_component_has_a_description() -> None:
    components = all_components()
    for kind in ("data source", "model", "optimizer", "schedule", "activation", "norm", "init", "augmentation"):
        assert components[kind], kind
    for kind, entries in components.items():
        for name, description in entries.items():
            assert description, f"{kind} {name} has no docstring"
