"""Schemas of the files a run folder holds, so a corrupted or hand-edited file is one clear line.

`resume`, `eval`, `predict` and `report` read these files; each is validated here (pydantic, as the
recipe is) before its values reach the code, and every failure names the file and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dragontrainer.errors import RunError, shorten

Model = TypeVar("Model", bound=BaseModel)


class DataInfo(BaseModel):
    """data.json: what eval/predict need without reloading the data."""

    model_config = ConfigDict(extra="allow")

    classes: list[str] = Field(min_length=1)
    image_shape: tuple[int, int, int]
    flip_safe: bool = True
    class_weights: list[float] | None = None


class TrainCounters(BaseModel):
    """The loop's counters (TrainState) in a checkpoint's state.json."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(ge=0)
    step_in_epoch: int = Field(ge=0)
    global_step: int = Field(ge=0)
    lr: float
    lr_scale: float = Field(gt=0)
    best_epoch: int = Field(ge=0)
    rollbacks: int = Field(0, ge=0)
    stop_reason: str | None = None


class MeterCounters(BaseModel):
    loss_sum: float
    correct: int = Field(ge=0)
    seen: int = Field(ge=0)
    seconds: float = Field(ge=0)


class CheckpointState(BaseModel):
    """state.json of `last` (everything to continue exactly) or `best` (counters and metrics)."""

    model_config = ConfigDict(extra="allow")

    train: TrainCounters
    meter: MeterCounters | None = None
    callbacks: dict[str, dict[str, Any]] = {}
    rng: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None


def read_json(path: Path, schema: type[Model]) -> Model:
    """A JSON file of the run folder, validated; any problem is a RunError naming the file."""
    return schema.model_validate(checked_json(path, schema))


def checked_json(path: Path, schema: type[BaseModel]) -> dict[str, Any]:
    """The file's mapping as written (one read), after validating it against `schema`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: not readable JSON ({shorten(exc, 120)})") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(value).__name__}")
    try:
        schema.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "the file"
        raise RunError(f"{path}: {where}: {shorten(error['msg'], 120)}") from None
    return value


def read_tensors(path: Path, required: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A safetensors file of the run folder (never a pickle); truncated or garbage is a RunError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RunError(f"{path}: not a readable safetensors file ({shorten(exc, 120)})") from None
    missing = [name for name in required if name not in tensors]
    if missing:
        raise RunError(f"{path}: lacks tensor(s) {', '.join(missing)}")
    return tensors
