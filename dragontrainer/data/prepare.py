"""The data a run trains on: loaded, split, preprocessing fitted on the training split, and a
loader per split. Where the images live (device or streamed) is decided here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console

from dragontrainer.console import text
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.preprocess import Preprocessor, create_preprocessor
from dragontrainer.data.residency import Residency, fit_images, load_for_training, split_loader
from dragontrainer.data.sources import ImageSet
from dragontrainer.data.split import Split, split_for
from dragontrainer.data.stream import StreamLoader
from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import Recipe
from dragontrainer.train.balance import switch_epoch
from dragontrainer.train.multitask import TaskSet, check_task_recipe, main_task_images, resolve_tasks


@dataclass
class PreparedData:
    """The dataset split, preprocessed with statistics of the training split, and a loader per split:
    on the device, or streamed (data/residency.py decides which, and says why)."""

    images: ImageSet
    split: Split
    preprocessor: Preprocessor
    train: DeviceLoader | StreamLoader
    val: DeviceLoader | StreamLoader
    test: DeviceLoader | StreamLoader | None
    tasks: TaskSet | None = None  # several tasks / multi-label: the loaders above hold the main task's labels
    residency: Residency | None = None
    sample: torch.Tensor | None = None  # streamed: the training images statistics are fitted on

    def unsharded(self) -> PreparedData:
        """The same data with the training loader serving whole global batches (DDP: what one-off uses
        of a first batch — LSUV, augmentation samples, the LR range test — must see on every rank count)."""
        return dataclasses.replace(self, train=self.train.sharded((0, 1)))

    @property
    def num_classes(self) -> int:
        return len(self.images.classes)

    def training_images(self) -> torch.Tensor:
        """Training images (uint8, CPU) to fit statistics on (preprocessing, PCA lighting): all of them when
        resident; when streamed, a seeded sample of at most 64 MiB (never a copy of the whole split)."""
        if self.sample is not None:
            return self.sample
        return torch.from_numpy(self.images.x[self.split.train])

    def info(self) -> dict[str, Any]:
        return {
            "classes": self.images.classes,
            "image_shape": list(self.images.image_shape),
            "flip_safe": self.images.flip_safe,
            "num_train": len(self.split.train),
            "num_val": len(self.split.val),
            "num_test": len(self.split.test),
            "train_class_counts": np.bincount(self.images.y[self.split.train], minlength=self.num_classes).tolist(),
            **(self.residency.record() if self.residency is not None else {}),
            **({"statistics_images": len(self.sample)} if self.sample is not None else {}),
        }


def prepare_data(
    recipe: Recipe, device: torch.device, console: Console | None = None, *, shard: tuple[int, int] = (0, 1)
) -> PreparedData:
    """`shard=(rank, world)`: the training loader serves this rank's part of every global batch (DDP);
    validation and test stay whole."""
    loaded = load_for_training(recipe.data, device, console)  # image folders to stream: the decoded cache
    if console is not None:
        console.print(text(loaded.residency.line()))
    images = loaded.images
    tasks = resolve_tasks(images, recipe)  # None: one label per image, the default path
    check_task_recipe(recipe, tasks)
    images = loaded.images = main_task_images(images, tasks)  # the loaders serve the main task's labels
    if tasks is not None and loaded.residency.mode == "stream":
        raise RecipeError(
            "recipe field data.resident: several tasks or multi-label targets need the images "
            "resident on the device (data.resident=device); streaming serves one label per image"
        )
    if len(np.unique(images.y)) < 2:
        raise DataError(f"{recipe.data.path or recipe.data.source}: every image has the same label; "
                        "a classifier needs at least two classes")  # fmt: skip
    split = split_for(images.y, recipe.data, images.official_test)
    statistics = fit_images(loaded, split.train, recipe.seed)
    preprocessor = create_preprocessor(recipe.preprocess).fit(statistics)

    def loader(
        index: Any, batch_size: int, shuffle: bool, balance: str = "none", shard: tuple[int, int] = (0, 1)
    ) -> DeviceLoader | StreamLoader:
        # uint8 (4× smaller than float), on the device or read per batch; each batch is augmented, then preprocessed
        return split_loader(
            loaded, index, batch_size, shuffle=shuffle, device=device, seed=recipe.seed, balance=balance,
            switch_epoch=switch_epoch(recipe.data, recipe.train.epochs), shard=shard,
        )  # fmt: skip

    if recipe.data.balance in ("oversample", "undersample", "two_stage") and not recipe.train.shuffle:
        raise RecipeError(
            f"recipe field data.balance: {recipe.data.balance} samples the epoch; it needs train.shuffle=true"
        )
    train = loader(split.train, recipe.train.batch_size, shuffle=recipe.train.shuffle, balance=recipe.data.balance,
                   shard=shard)  # fmt: skip
    val = loader(split.val, recipe.train.eval_batch_size, shuffle=False)
    test = loader(split.test, recipe.train.eval_batch_size, shuffle=False) if len(split.test) else None
    if len(train) == 0:
        raise RecipeError(
            f"recipe field train.batch_size: {recipe.train.batch_size} leaves no full training step "
            f"({len(split.train)} training images)"
        )
    sample = statistics if loaded.residency.mode == "stream" else None
    return PreparedData(images, split, preprocessor, train, val, test, tasks, loaded.residency, sample)
