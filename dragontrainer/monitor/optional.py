"""Sinks backed by an optional package (TensorBoard, MLflow) share one `auto|on|off` rule."""

from __future__ import annotations

from collections.abc import Callable

from dragontrainer.errors import RecipeError


def sink_wanted(field: str, choice: str, available: Callable[[], bool], extra: str) -> bool:
    """`auto`: when the package is installed; `on`: required (a one-line error names the extra to
    install); `off`: never."""
    if choice == "off" or (choice == "auto" and not available()):
        return False
    if not available():
        raise RecipeError(
            f"recipe field {field}: 'on' needs the {extra} package (pip install 'dragontrainer[{extra}]'), "
            "or set it to auto/off"
        )
    return True
