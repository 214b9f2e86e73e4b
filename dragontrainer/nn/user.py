"""A user's own model, named in the recipe by import path: `model.name=package.module:factory`.

The factory has the zoo's signature and returns any `torch.nn.Module` that maps preprocessed float
images N×C×H×W to logits N×K:

    def factory(spec: ModelSpec, in_channels: int, num_classes: int, image_size: int) -> nn.Module

`spec` is the recipe's `model` section (widths, depth, dropout, activation, ...), to use or ignore.
The import path is saved in the run's recipe, so `dragon eval/predict/export/resume` rebuild the
model the same way — as long as the module is importable (installed, on PYTHONPATH, or in the current
folder). Registering from Python (`dragontrainer.register_model("name")`) works within one process.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from dragontrainer.errors import RecipeError


def is_import_path(name: str) -> bool:
    return ":" in name


def import_factory(name: str) -> Callable[..., Any]:
    """`package.module:factory` -> the callable; a RecipeError naming what failed otherwise."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise RecipeError(f"model.name={name}: expected package.module:factory, e.g. mymodels:small_cnn")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # the `dragon` script does not put the current folder on the path itself
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        raise RecipeError(
            f"model.name={name}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            f"it must be installed, on PYTHONPATH or in the current folder"
        ) from None
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise RecipeError(f"model.name={name}: module {module_name!r} has no attribute {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise RecipeError(
            f"model.name={name}: {attribute!r} is a {type(factory).__name__}, not a callable "
            f"factory(spec, in_channels, num_classes, image_size) -> nn.Module"
        )
    return factory
