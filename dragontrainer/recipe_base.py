"""The recipe's building blocks: the section base class and the validators several sections share."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_registered(kind: str, name: str) -> str:
    """Validate a component name against its registry (imported lazily: registries import this module)."""
    from dragontrainer.registry import ALL_REGISTRIES, all_components

    all_components()
    registry = ALL_REGISTRIES[kind]
    if name not in registry:
        raise ValueError(registry.unknown_message(name))
    return name


def yaml_switch(value: Any) -> Any:
    """YAML reads `on`/`off` as booleans: take them back as the words the schema uses."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def _ordered_range(low: float, high: float, name: str) -> None:
    if low > high:
        raise ValueError(f"{name}: low {low} must not exceed high {high}")
