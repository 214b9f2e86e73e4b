"""Recipes as text: YAML read safely (no duplicate keys, no alias bombs), `key=value` overrides, the
schema's dotted keys (unknown keys refused with the closest valid one) and validation errors in one line."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dragontrainer.errors import RecipeError, shorten

MAX_YAML_NODES = 20_000  # a recipe has a few hundred; alias expansion beyond this is a YAML bomb


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two refusals: duplicate keys (YAML silently keeps the last) and
    documents whose alias expansion exceeds MAX_YAML_NODES (billion laughs), checked on the composed
    node graph before anything is constructed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in lines:
                raise RecipeError(
                    f"duplicate key {shorten(key, 80)!r} (lines {lines[key]} and {key_node.start_mark.line + 1}); "
                    "keep one"
                )
            if isinstance(key, (str, int, float, bool)):
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node) -> int:
    """Nodes after alias expansion, computed on the graph (shared nodes counted per use) without expanding;
    a recursive alias is refused."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(current: yaml.Node) -> int:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise RecipeError("a YAML alias refers to itself (recursive structures are not recipes)")
        in_progress.add(key)
        children: list[yaml.Node] = []
        if isinstance(current, yaml.SequenceNode):
            children = current.value
        elif isinstance(current, yaml.MappingNode):
            children = [n for pair in current.value for n in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_NODES:
                break
        in_progress.discard(key)
        sizes[key] = total
        return total

    return size(node)


def load_yaml(text: str) -> Any:
    """Parse one YAML document safely: bounded size after aliases, no duplicate keys, no tags beyond safe."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node) > MAX_YAML_NODES:
            raise RecipeError(
                f"the document expands to more than {MAX_YAML_NODES:,} values through aliases (&anchor/*alias); "
                "write the recipe out plainly"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise RecipeError("the YAML is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML recipe file; a missing file, bad YAML or a non-mapping is a RecipeError."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        loaded = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML ({reason})") from None
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise RecipeError(
            f"{path}: expected a mapping of sections (data, model, optim, ...), got {type(loaded).__name__}"
        )
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=0.05"`` -> ``("optim.lr", 0.05)``; the value is read as YAML (numbers, lists, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {shorten(item)!r}: expected dotted.key=value, e.g. optim.lr=0.05")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecipeError as exc:
        raise RecipeError(f"override {shorten(key.strip(), 80)}: {exc}") from None
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for key ``"a.b"``, creating (or replacing) sections on the way."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def schema_keys(model: type[BaseModel] | None = None, prefix: str = "") -> dict[str, type[BaseModel] | None]:
    """Every dotted key of the schema (the whole recipe by default) -> its section class (None for a leaf)."""
    if model is None:
        from dragontrainer.recipe import Recipe  # the schema imports this module

        model = Recipe
    keys: dict[str, type[BaseModel] | None] = {}
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys[dotted] = annotation
            keys.update(schema_keys(annotation, prefix=f"{dotted}."))
        else:
            keys[dotted] = None
    return keys


def dotted_values(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe dump as {"optim.lr": 0.2, ...}: the form overrides, comparisons and trackers use."""
    items: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            items.update(dotted_values(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


OLD_NAMES = {"train.amp": "train.precision"}  # still read (their section's validator translates them)


def check_known_keys(data: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse any key the schema does not have, suggesting the closest valid one."""
    known = schema_keys()
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in OLD_NAMES:
            continue
        if dotted not in known:
            raise RecipeError(unknown_key_message(dotted, known))
        if known[dotted] is not None and isinstance(value, Mapping):
            check_known_keys(value, prefix=f"{dotted}.")


def unknown_key_message(dotted: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(dotted[:200], list(known), n=1, cutoff=0.6)
    if close:
        return f"unknown key {shorten(dotted, 100)}, did you mean {close[0]}?"
    section = dotted.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == section] or [k for k in known if "." not in k]
    return f"unknown key {shorten(dotted, 100)}; valid keys here: {', '.join(siblings)}"


def describe_validation_error(exc: ValidationError) -> str:
    """One line per pydantic error, joined: field, what is wrong (with the allowed range), the value."""
    parts = []
    for error in exc.errors()[:3]:
        loc = ".".join(str(p) for p in error["loc"] if not isinstance(p, int) or len(error["loc"]) == 1)
        message = error["msg"].removeprefix("Value error, ")
        message = message[0].lower() + message[1:] if message else message
        where = f"recipe field {loc}" if loc else "recipe"
        shown = error.get("input")
        already_named = "got" in message or repr(shown) in message
        got = "" if isinstance(shown, dict) or already_named else f", got {shorten(repr(shown))}"
        parts.append(f"{where}: {shorten(message, 300)}{got}")
    return "; ".join(parts)
