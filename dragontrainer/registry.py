"""Name -> factory registries: every technique is chosen by name from one of these.

A registry is a dict, a decorator, a lister and a helpful error (close matches + the full list).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from dragontrainer.errors import RecipeError

F = TypeVar("F", bound=Callable[..., Any])

ALL_REGISTRIES: dict[str, Registry[Any]] = {}


class Registry(Generic[F]):
    """A named collection of factories of one kind (``model``, ``optimizer``, ...)."""

    def __init__(self, kind: str) -> None:
        if kind in ALL_REGISTRIES:
            raise ValueError(f"registry {kind!r} exists already")
        self.kind = kind
        self._entries: dict[str, F] = {}
        ALL_REGISTRIES[kind] = self

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@MODELS.register("resnet")``. A second entry with the same name is a bug."""

        def add(factory: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return add

    def get(self, name: str) -> F:
        """The factory for ``name``, or a RecipeError naming close matches and every known name."""
        try:
            return self._entries[name]
        except KeyError:
            raise RecipeError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = ", ".join(self.names())
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {known}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        """Name -> the first line of the factory's docstring (what `dragon components` prints)."""
        return {name: _first_line(self._entries[name].__doc__) for name in self.names()}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _first_line(doc: str | None) -> str:
    """The docstring's first paragraph, on one line."""
    paragraph = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def all_components() -> dict[str, dict[str, str]]:
    """Every registry, kind -> {name: description}; imports the modules that fill them."""
    import dragontrainer.data.augment
    import dragontrainer.data.preprocess
    import dragontrainer.data.sources
    import dragontrainer.monitor.diagnose
    import dragontrainer.nn.activations
    import dragontrainer.nn.init
    import dragontrainer.nn.models
    import dragontrainer.nn.norms
    import dragontrainer.optim.optimizers
    import dragontrainer.optim.regularizers
    import dragontrainer.optim.schedules  # noqa: F401

    return {kind: reg.describe() for kind, reg in sorted(ALL_REGISTRIES.items())}


RECIPE_KEYS = {
    "data source": "data.source",
    "preprocess": "preprocess.name",
    "augmentation": "augment.<name>.p",
    "model": "model.name",
    "activation": "model.activation",
    "norm": "model.norm",
    "init": "model.init",
    "optimizer": "optim.name",
    "schedule": "schedule.name",
    "penalty": "regularize.penalty",
    "diagnosis rule": "finding key in findings.json",
}


def components_markdown() -> str:
    """The README's catalogue section, generated from the registries (a test keeps them equal)."""
    lines = []
    for kind, entries in all_components().items():
        key = RECIPE_KEYS.get(kind, kind)
        lines += [f"**{kind}** (`{key}`)", "", "| name | what it does |", "|---|---|"]
        lines += [f"| `{name}` | {description.replace('|', '/')} |" for name, description in entries.items()]
        lines.append("")
    return "\n".join(lines)
