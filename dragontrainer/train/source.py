"""What comes with a source run named in `model.weights` (a run folder): its fitted preprocessing
("use the same preprocessing as the pre-trained network") and its class names."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from safetensors.torch import load_file

from dragontrainer.data.preprocess import Preprocessor, create_preprocessor
from dragontrainer.errors import RecipeError, RunError
from dragontrainer.recipe import Recipe
from dragontrainer.run import RunDir

if TYPE_CHECKING:
    from dragontrainer.data.prepare import PreparedData


def source_run(recipe: Recipe) -> RunDir | None:
    """`transfer.source`, else the run folder `model.weights` names; None for a weights file (or none)."""
    if recipe.transfer.source is not None:
        return RunDir.open(recipe.transfer.source)
    weights = recipe.model.weights
    if weights is None or not Path(weights).is_dir():
        return None
    return RunDir.open(weights)


def source_preprocessor(recipe: Recipe, source: RunDir) -> Preprocessor:
    """The source run's fitted statistics; the recipe must name the same preprocessing."""
    used = source.recipe().preprocess
    if used.name != recipe.preprocess.name:
        raise RecipeError(
            f"recipe field preprocess.name: the source run {source.path} used {used.name!r}, this recipe "
            f"{recipe.preprocess.name!r}; set preprocess.name={used.name} or transfer.preprocess=refit"
        )
    path = source.file("preprocess.safetensors")
    if not path.is_file():
        raise RunError(f"{source.path}: no preprocess.safetensors (the source run never started training)")
    preprocessor = create_preprocessor(used)
    preprocessor.load_state_dict(load_file(str(path)))
    return preprocessor


def default_names(classes: list[str]) -> bool:
    return classes == [str(i) for i in range(len(classes))]


def adopt_source(recipe: Recipe, data: PreparedData, console: Console) -> None:
    """With `transfer.preprocess: source`, the source's preprocessing replaces the one fitted here; the
    source's class names replace bare numbers when the class counts agree."""
    source = source_run(recipe)
    if source is None:
        if recipe.model.weights is not None and recipe.transfer.preprocess == "source":
            console.print("weights file without a run: preprocessing fitted on this data (transfer.preprocess)")
        return
    if recipe.transfer.preprocess == "source":
        data.preprocessor = source_preprocessor(recipe, source)
        console.print(f"preprocessing from the source run {source.path} (transfer.preprocess=source)")
    info_path = source.file("data.json")
    if recipe.data.class_names is None and default_names(data.images.classes) and info_path.is_file():
        names = json.loads(info_path.read_text(encoding="utf-8")).get("classes", [])
        if len(names) == data.num_classes and not default_names(names):
            data.images = replace(data.images, classes=list(names))
