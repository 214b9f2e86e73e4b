"""The data a run trains on: loaded, split, preprocessing fitted on the training split, and a
loader per split. Where the images live (device or streamed) is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.memo import load_images_once
from dragontrainer.data.preprocess import Preprocessor, create_preprocessor
from dragontrainer.data.sources import ImageSet
from dragontrainer.data.split import Split, split_for
from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import Recipe
from dragontrainer.train.balance import switch_epoch
from dragontrainer.train.multitask import TaskSet, check_task_recipe, main_task_images, resolve_tasks


@dataclass
class PreparedData:
    """The dataset on the device, split and preprocessed with statistics of the training split."""

    images: ImageSet
    split: Split
    preprocessor: Preprocessor
    train: DeviceLoader
    val: DeviceLoader
    test: DeviceLoader | None
    tasks: TaskSet | None = None  # several tasks / multi-label: the loaders above hold the main task's labels

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    def info(self) -> dict[str, Any]:
        return {
            "classes": self.images.classes,
            "image_shape": list(self.images.image_shape),
            "flip_safe": self.images.flip_safe,
            "num_train": len(self.split.train),
            "num_val": len(self.split.val),
            "num_test": len(self.split.test),
            "train_class_counts": np.bincount(self.images.y[self.split.train], minlength=self.num_classes).tolist(),
        }


def prepare_data(recipe: Recipe, device: torch.device) -> PreparedData:
    images = load_images_once(recipe.data)  # from memory when a search worker already loaded them
    tasks = resolve_tasks(images, recipe)  # None: one label per image, the default path
    check_task_recipe(recipe, tasks)
    images = main_task_images(images, tasks)
    if len(np.unique(images.y)) < 2:
        raise DataError(f"{recipe.data.path or recipe.data.source}: every image has the same label; "
                        "a classifier needs at least two classes")  # fmt: skip
    split = split_for(images.y, recipe.data, images.official_test)
    x = torch.from_numpy(images.x)
    y = torch.from_numpy(images.y)
    preprocessor = create_preprocessor(recipe.preprocess).fit(x[split.train])

    def loader(index: Any, batch_size: int, shuffle: bool, balance: str = "none") -> DeviceLoader:
        # uint8 on the device (4× smaller than float); each batch is augmented, then preprocessed
        index = torch.from_numpy(index)
        return DeviceLoader(
            x[index].to(device), y[index].to(device), batch_size, shuffle=shuffle, seed=recipe.seed,
            balance=balance, switch_epoch=switch_epoch(recipe.data, recipe.train.epochs),
        )  # fmt: skip

    if recipe.data.balance in ("oversample", "undersample", "two_stage") and not recipe.train.shuffle:
        raise RecipeError(
            f"recipe field data.balance: {recipe.data.balance} samples the epoch; it needs train.shuffle=true"
        )
    train = loader(split.train, recipe.train.batch_size, shuffle=recipe.train.shuffle, balance=recipe.data.balance)
    val = loader(split.val, recipe.train.eval_batch_size, shuffle=False)
    test = loader(split.test, recipe.train.eval_batch_size, shuffle=False) if len(split.test) else None
    if len(train) == 0:
        raise RecipeError(
            f"recipe field train.batch_size: {recipe.train.batch_size} leaves no full training step "
            f"({len(split.train)} training images)"
        )
    return PreparedData(images, split, preprocessor, train, val, test, tasks)
