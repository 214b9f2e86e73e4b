"""Class imbalance in the loop (`data.balance`, `augment.rare_class_boost`): the two-stage switch and the
extra crops for rare classes. The sampling itself is `data/sampler.py`."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from torch import nn

from dragontrainer.data.augment import Augmenter, Context, ResizedCrop
from dragontrainer.recipe import AugmentSpec, DataSpec, Recipe
from dragontrainer.train.callbacks import Callback
from dragontrainer.train.state import TrainState

RARE_FRACTION = 0.5  # a class with fewer than this × the largest class's training images is rare


def switch_epoch(data: DataSpec, epochs: int) -> int | None:
    """two_stage: the first epoch (0-based) of the second stage; at least one epoch on each side."""
    if data.balance != "two_stage":
        return None
    return min(max(round(data.two_stage_switch * epochs), 1), epochs - 1) if epochs > 1 else 1


def loss_class_weights(recipe: Recipe) -> str | list[float]:
    """`data.balance=class_weights` is `train.class_weights=balanced` (King & Zeng's N / (C · count_c))."""
    return "balanced" if recipe.data.balance == "class_weights" else recipe.train.class_weights


def head_parameters(model: nn.Module) -> set[int]:
    stages = model.stages() if callable(getattr(model, "stages", None)) else {}  # type: ignore[operator]
    head = stages.get("head")
    return {id(p) for p in head.parameters()} if head is not None else set()


class TwoStageSwitch(Callback):
    """From `switch` on, every optimiser group without head parameters gets learning rate 0 (the
    body is frozen exactly, momentum included); the loader switches to the natural order itself.
    Re-applied at every epoch start, so a resumed run is in the right stage."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, switch: int, console: Console) -> None:
        self.optimizer, self.switch, self.console = optimizer, switch, console
        head = head_parameters(model)
        self.body_groups = [g for g in optimizer.param_groups if not any(id(p) in head for p in g["params"])]
        self.announced = False

    def on_epoch_start(self, state: TrainState, logs: dict[str, Any]) -> None:
        if state.epoch < self.switch:
            return
        for group in self.body_groups:
            group["base_lr"] = 0.0
        if not self.announced and state.epoch == self.switch and state.step_in_epoch == 0:
            self.console.print(
                f"two-stage: from epoch {self.switch + 1} the natural class frequencies, only the head learns"
            )
        self.announced = True


class RareClassBoost:
    """The augmenter, then, for images of rare classes, an extra random resized crop with probability
    `rare_class_boost` (drawn for the whole batch, so the random streams do not depend on the labels)."""

    def __init__(self, augmenter: Augmenter, spec: AugmentSpec, context: Context, rare: torch.Tensor) -> None:
        self.augmenter = augmenter
        self.crop = ResizedCrop(spec.resized_crop.model_copy(update={"p": spec.rare_class_boost}), context)
        self.rare = rare  # bool per class

    @property
    def soft_targets(self) -> bool:
        return self.augmenter.soft_targets

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
        params = self.crop.sample(len(x), generator)
        boost = self.rare.to(y.device)[y] & ((params["width"] < 1) | (params["height"] < 1)).to(y.device)
        x = torch.where(boost[:, None, None, None], self.crop.apply(x, params), x)
        return self.augmenter(x, y, generator)

    def describe(self) -> str:
        return f"{self.augmenter.describe()}, rare-class crops (p={self.crop.p:g}, {int(self.rare.sum())} classes)"


def with_rare_class_boost(
    augmenter: Augmenter, spec: AugmentSpec, image_shape: tuple[int, int, int], flip_safe: bool,
    train_images: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
) -> Augmenter | RareClassBoost:  # fmt: skip
    if spec.rare_class_boost == 0:
        return augmenter
    counts = torch.bincount(train_labels.cpu(), minlength=num_classes)
    rare = (counts > 0) & (counts < RARE_FRACTION * counts.max())
    return RareClassBoost(augmenter, spec, Context(image_shape, flip_safe, train_images), rare)
