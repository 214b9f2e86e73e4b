"""dragontrainer: train convolutional networks the way the best practitioners do, and babysit them."""

from dragontrainer.api import doctor, evaluate_run, load_run, predict, report, resume, train
from dragontrainer.compare import compare
from dragontrainer.errors import DataError, DragonError, RecipeError, RunError
from dragontrainer.recipe import Recipe
from dragontrainer.study.finetune import finetune
from dragontrainer.train.loop import TrainResult

__all__ = [
    "DataError",
    "DragonError",
    "Recipe",
    "RecipeError",
    "RunError",
    "TrainResult",
    "compare",
    "doctor",
    "evaluate_run",
    "finetune",
    "load_run",
    "predict",
    "report",
    "resume",
    "train",
]
