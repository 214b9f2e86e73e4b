"""dragontrainer: train convolutional networks the way the best practitioners do, and babysit them."""

from dragontrainer.api import doctor, evaluate_run, load_run, predict, report, resume, train
from dragontrainer.data.residency import cache_images
from dragontrainer.errors import DataError, DragonError, RecipeError, RunError
from dragontrainer.export import export_run, load_export
from dragontrainer.monitor.lr_finder import lr_find
from dragontrainer.nn.models import register_model
from dragontrainer.recipe import Recipe
from dragontrainer.study.compare import compare
from dragontrainer.study.ensemble import ensemble
from dragontrainer.study.finetune import finetune
from dragontrainer.train.outcomes import TrainResult
from dragontrainer.version import __version__

__all__ = [
    "DataError",
    "DragonError",
    "Recipe",
    "RecipeError",
    "RunError",
    "TrainResult",
    "__version__",
    "cache_images",
    "compare",
    "doctor",
    "ensemble",
    "evaluate_run",
    "export_run",
    "finetune",
    "load_export",
    "load_run",
    "lr_find",
    "predict",
    "register_model",
    "report",
    "resume",
    "search",
    "train",
]


def __getattr__(name: str) -> object:
    """`dragontrainer.search` is imported on first use: Optuna loads only when a search runs."""
    if name == "search":
        from dragontrainer.study.search import search

        return search
    raise AttributeError(f"module 'dragontrainer' has no attribute {name!r}")
