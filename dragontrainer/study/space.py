"""The search space: parsing and validating `space.yaml`, log scales, coarse-to-fine narrowing, border warnings.

    optim.lr: {low: 1.0e-3, high: 1.0}          # log scale (learning rate)
    model.dropout: {low: 0.0, high: 0.5}        # linear; 0 is a hard limit, so no border warning there
    model.depth: {low: 1, high: 3, int: true}
    optim.name: {choices: [sgd, adam]}

Learning rate, weight decay and penalty strength, and any range spanning more than a factor of 10, are
sampled on a log scale unless `log: false` is given (the reference texts: "search on a log scale").
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dragontrainer.errors import RecipeError
from dragontrainer.recipe import Recipe, read_yaml_mapping, schema_keys, unknown_key_message

LOG_KEYS = {"optim.lr", "optim.weight_decay", "regularize.strength"}
SPEC_KEYS = {"low", "high", "log", "int", "choices"}
NOT_SEARCHABLE = ("run.", "data.fold")  # folders are the search's; cross-validation is --folds
BORDER = 0.1  # the outer 10% of a range (in log space where log) is its border


@dataclass(frozen=True)
class Param:
    """One searched recipe key: a numeric range (log or linear, float or int) or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[Any] | None = None
    hard_low: float | None = None  # the schema's own limits: no border warning, no widening past them
    hard_high: float | None = None
    open_low: bool = False  # the limit itself is excluded (lr > 0): widening stops short of it
    open_high: bool = False

    @property
    def numeric(self) -> bool:
        return self.choices is None

    def position(self, value: float) -> float:
        """Where a value lies in the range: 0 at low, 1 at high (in log space when log)."""
        lo, hi, v = (math.log(self.low), math.log(self.high), math.log(value)) if self.log else (
            self.low, self.high, value)  # fmt: skip
        return 0.5 if hi == lo else (v - lo) / (hi - lo)

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"[{fmt(self.low, self.integer)}, {fmt(self.high, self.integer)}]" + (" log" if self.log else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt(value: float | None, integer: bool = False) -> str:
    """1e-04, 9.6e-06, 0.25, 3: short and exact enough to type back into a space file."""
    if value is None:
        return "—"
    if integer:
        return str(int(value))
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        mantissa, _, exponent = f"{value:.1e}".partition("e")
        return f"{mantissa.removesuffix('.0')}e{exponent}"
    return f"{value:.3g}"


# ------------------------------------------------------------------------------------- parsing


def load_space(path: str | Path | Mapping[str, Any], base: Recipe) -> list[Param]:
    """Read and validate a space (file or mapping) against the recipe schema before any trial starts."""
    origin = str(path) if isinstance(path, (str, Path)) else "space"
    raw = read_yaml_mapping(Path(path)) if isinstance(path, (str, Path)) else dict(path)
    if not raw:
        raise RecipeError(
            f"{origin}: the space is empty; give dotted.key: {{low: ..., high: ...}} or {{choices: [...]}}"
        )
    known = schema_keys()
    params = []
    for key, spec in raw.items():
        where = f"{origin}: {key}"
        if key not in known:
            raise RecipeError(f"{origin}: {unknown_key_message(str(key), known)}")
        if known[key] is not None:
            raise RecipeError(f"{where}: is a section; search one of its keys (e.g. {key}.{first_leaf(known[key])})")
        if str(key).startswith(NOT_SEARCHABLE):
            raise RecipeError(f"{where}: cannot be searched (run folders belong to the search; use --folds for folds)")
        params.append(parse_param(str(key), spec, where, base))
    return params


def first_leaf(section: type[BaseModel]) -> str:
    return next(iter(section.model_fields))


def parse_param(key: str, spec: Any, where: str, base: Recipe) -> Param:
    if not isinstance(spec, Mapping):
        raise RecipeError(f"{where}: expected {{low: ..., high: ...}} or {{choices: [...]}}, got {spec!r}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown setting {sorted(unknown)[0]!r}; expected low, high, log, int or choices")
    hard_low, hard_high = schema_limits(key)
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or {"low", "high"} & set(spec):
            raise RecipeError(f"{where}: choices must be a non-empty list (and without low/high), got {choices!r}")
        for choice in choices:
            check_value(base, key, choice, where)
        return Param(key, choices=list(choices))
    if "low" not in spec or "high" not in spec:
        raise RecipeError(f"{where}: a range needs both low and high")
    low, high = spec["low"], spec["high"]
    integer = bool(spec.get("int", False))
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
            raise RecipeError(f"{where}: {name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not low < high:
        raise RecipeError(f"{where}: low ({low}) must be below high ({high})")
    log = spec.get("log")
    if log is None:
        log = low > 0 and (key in LOG_KEYS or high / low > 10)
    elif log and low <= 0:
        raise RecipeError(f"{where}: a log scale needs low > 0, got {low}")
    for value in (low, high):
        check_value(base, key, int(value) if integer else float(value), where)
    cast = int if integer else float
    open_low, open_high = open_limits(key)
    return Param(key, cast(low), cast(high), bool(log), integer, None, hard_low, hard_high, open_low, open_high)


def check_value(base: Recipe, key: str, value: Any, where: str) -> None:
    try:
        base.with_overrides({key: value})
    except RecipeError as exc:
        raise RecipeError(f"{where}: {value!r} is not a valid value ({exc})") from None


def field_rules(key: str) -> list[Any]:
    section: type[BaseModel] = Recipe
    *parents, leaf = key.split(".")
    for part in parents:
        section = section.model_fields[part].annotation  # type: ignore[assignment]
    field = section.model_fields[leaf]
    rules = list(field.metadata)
    for member in typing.get_args(field.annotation):  # `Annotated[float, Field(...)] | Literal[...]`
        if typing.get_origin(member) is typing.Annotated:
            for extra in typing.get_args(member)[1:]:
                rules += getattr(extra, "metadata", [extra])
    return rules


def open_limits(key: str) -> tuple[bool, bool]:
    """Whether the schema's lower / upper limit is itself excluded (gt / lt)."""
    rules = field_rules(key)
    return any(getattr(r, "gt", None) is not None for r in rules), any(
        getattr(r, "lt", None) is not None for r in rules
    )


def schema_limits(key: str) -> tuple[float | None, float | None]:
    """The schema's ge/gt and le/lt bounds of a numeric key (None when unbounded)."""
    low = high = None
    for rule in field_rules(key):
        low = getattr(rule, "ge", None) if getattr(rule, "ge", None) is not None else low
        low = getattr(rule, "gt", None) if getattr(rule, "gt", None) is not None else low
        high = getattr(rule, "le", None) if getattr(rule, "le", None) is not None else high
        high = getattr(rule, "lt", None) if getattr(rule, "lt", None) is not None else high
    return low, high


# ------------------------------------------------------------------------- coarse to fine


def narrow(space: Sequence[Param], top: Sequence[dict[str, Any]]) -> list[Param]:
    """The next stage's ranges: every numeric range shrunk around the top trials' values (a margin of a
    quarter of their spread plus 5% of the old range on each side, in log space where log), never past
    the old range. Choices stay as they are."""
    narrowed = []
    for param in space:
        values = [t[param.key] for t in top if param.key in t]
        if not param.numeric or not values:
            narrowed.append(param)
            continue
        to, back = (math.log, math.exp) if param.log else (float, float)
        lo, hi = to(min(values)), to(max(values))
        old_lo, old_hi = to(param.low), to(param.high)
        margin = 0.25 * (hi - lo) + 0.05 * (old_hi - old_lo)
        low, high = back(max(old_lo, lo - margin)), back(min(old_hi, hi + margin))
        low = param.low if math.isclose(low, param.low, rel_tol=1e-9) else max(low, param.low)
        high = param.high if math.isclose(high, param.high, rel_tol=1e-9) else min(high, param.high)
        if param.integer:
            low, high = math.floor(low), math.ceil(high)
            if low == high:  # an integer range needs two values to be a range
                low, high = (low - 1, high) if low > param.low else (low, high + 1)
        narrowed.append(replace(param, low=low, high=high))
    return narrowed


# ------------------------------------------------------------------------------- borders


def widened(param: Param, side: str) -> tuple[float, float]:
    """The range stretched by its own width (a factor high/low in log space) past the border side; past
    a limit of the schema it stops at the limit, or halfway to it when the limit is excluded (dropout < 1)."""
    low, high = param.low, param.high
    if side == "low":
        low = low / (high / low) if param.log else low - (high - low)
        if param.hard_low is not None and low <= param.hard_low:
            low = (param.hard_low + param.low) / 2 if param.open_low else param.hard_low
    else:
        high = high * (high / low) if param.log else high + (high - low)
        if param.hard_high is not None and high >= param.hard_high:
            high = (param.hard_high + param.high) / 2 if param.open_high else param.hard_high
    if param.integer:
        low, high = math.ceil(low), math.floor(high)
    return low, high


def border_side(param: Param, value: float) -> str | None:
    """'low' or 'high' when the value lies in the outer 10% of the range on a side that is not a hard
    limit of the schema (dropout's 0, a probability's 1)."""
    position = param.position(value)
    if position <= BORDER and not at_limit(param.low, param.hard_low):
        return "low"
    if position >= 1 - BORDER and not at_limit(param.high, param.hard_high):
        return "high"
    return None


def at_limit(edge: float, limit: float | None) -> bool:
    return limit is not None and math.isclose(edge, limit, rel_tol=1e-9, abs_tol=1e-12)


def border_warnings(space: Sequence[Param], ranked: Sequence[dict[str, Any]], top_k: int) -> list[str]:
    """Plain-words warnings for numeric parameters whose best value (or most of the top-k values) lies at
    the border of the range, with the widened range to try next. `ranked`: params of trials, best first."""
    warnings = []
    top = list(ranked[:top_k])
    if not top:
        return warnings
    for param in space:
        if not param.numeric or param.key not in top[0]:
            continue
        best = top[0][param.key]
        sides = [border_side(param, t[param.key]) for t in top if param.key in t]
        side = border_side(param, best)
        if side is not None:
            subject = f"the best {param.key} ({fmt(best, param.integer)}) lies"
        else:  # most of the top-k (a real subset), on the side of the range where the best is
            near = "low" if param.position(best) < 0.5 else "high"
            if len(ranked) <= top_k or sides.count(near) <= len(sides) / 2:
                continue
            side = near
            subject = f"{sides.count(side)} of the top {len(sides)} {param.key} values lie"
        low, high = widened(param, side)
        if (low, high) == (param.low, param.high):
            continue
        warnings.append(
            f"warning: {subject} at the border of its range {param.describe().removesuffix(' log')}: "
            f"widen it to [{fmt(low, param.integer)}, {fmt(high, param.integer)}]"
        )
    return warnings
