"""The pieces `fit` assembles before the first step: augmentation, model (with its starting weights),
parameter groups and optimiser, loss, and the callbacks the recipe asks for. Each builder takes what it
needs by keyword and returns one thing, so `fit` reads as the data flow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from torch import nn

from dragontrainer.console import text
from dragontrainer.data.augment import Augmenter, create_augmenter
from dragontrainer.data.prepare import PreparedData
from dragontrainer.monitor.mlflow import create_mlflow
from dragontrainer.nn.init import lsuv_rescale
from dragontrainer.nn.models import create_model
from dragontrainer.nn.multitask import create_multitask_model
from dragontrainer.nn.pretrained import load_pretrained
from dragontrainer.optim.optimizers import create_optimizer, effective_lr
from dragontrainer.optim.param_groups import build_param_groups
from dragontrainer.optim.transfer import (
    apply_transfer,
    build_transfer_groups,
    record_group_table,
    with_head_group,
    with_lr,
)
from dragontrainer.recipe import Recipe
from dragontrainer.resources import check_model_fits
from dragontrainer.run import RunDir
from dragontrainer.train.balance import TwoStageSwitch, loss_class_weights, switch_epoch, with_rare_class_boost
from dragontrainer.train.callbacks import Callback, ReduceOnPlateau
from dragontrainer.train.multitask import create_criterion
from dragontrainer.train.setup import class_weights
from dragontrainer.train.snapshots import ensemble_callbacks


def build_augmenter(recipe: Recipe, data: PreparedData) -> Augmenter:
    """The recipe's augmentation, with extra draws for rare classes when `augment.rare_class_boost`."""
    labels = data.train.labels
    train_images = data.training_images()  # colour statistics (PCA lighting); a sample when streamed
    augment = create_augmenter(
        recipe.augment, data.images.image_shape, data.images.flip_safe, train_images, data.num_classes
    )
    return with_rare_class_boost(
        augment, recipe.augment, data.images.image_shape, data.images.flip_safe, train_images, labels,
        data.num_classes,
    )  # fmt: skip


def build_model(
    recipe: Recipe, data: PreparedData, device: torch.device, console: Console, *, resume: bool
) -> nn.Module:
    """The model on the device, checked to fit first; starting weights from `model.weights` (with a
    report of what matched) or rescaled by LSUV on a first batch. A resumed run loads `last` later."""
    channels, size, _ = data.images.image_shape
    check_model_fits(recipe.model, in_channels=channels, num_classes=data.num_classes, image_size=size,
                     batch_size=recipe.train.batch_size, device=device)  # fmt: skip
    if data.tasks is None:
        model = create_model(recipe.model, in_channels=channels, num_classes=data.num_classes, image_size=size)
    else:
        model = create_multitask_model(recipe.model, recipe.multitask, in_channels=channels,
                                       task_sizes=data.tasks.sizes, image_size=size)  # fmt: skip
    model = model.to(device)
    if recipe.model.weights is not None and not resume:
        loaded = load_pretrained(model, recipe.model.weights)
        message = f"weights from {text(recipe.model.weights)}: {text(loaded.report())}"
        if (loaded.missing or loaded.unexpected or loaded.mismatched) and console.quiet:
            Console(stderr=True, highlight=False).print(message)  # what did not match is said even with --quiet
        else:
            console.print(message)
    elif recipe.model.init == "lsuv":
        first_batch, _ = next(data.train.batches(epoch=0))
        lsuv_rescale(model, data.preprocessor.apply(first_batch))
    return model


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    lr: float  # the base learning rate after batch-size scaling
    group_summary: list[Any]  # one line per parameter group, for the start message


def build_optimizer(recipe: Recipe, model: nn.Module, run: RunDir, console: Console) -> Optimisation:
    """Transfer rules (freeze, stop-gradient) applied to the model, parameter groups (decay / no decay,
    or the transfer table with its lr multipliers), the learning rate scaled to the effective batch."""
    transfer_notes = apply_transfer(model, recipe.transfer)  # freeze, stop-gradient and frozen-BN hooks
    group_rules = with_head_group(recipe.transfer) if recipe.data.balance == "two_stage" else recipe.transfer
    if group_rules.rules:
        groups, group_summary = build_transfer_groups(model, recipe.optim.weight_decay, group_rules)
    else:
        groups, group_summary = build_param_groups(model, recipe.optim.weight_decay)
    lr = effective_lr(recipe.optim, recipe.train.batch_size * recipe.train.accumulate_steps)
    if group_rules.rules:
        group_summary = record_group_table(run, console, with_lr(group_summary, lr), transfer_notes)
    return Optimisation(create_optimizer(groups, recipe.optim, lr), lr, list(group_summary))


def build_criterion(
    recipe: Recipe, data: PreparedData, weights: torch.Tensor | None, device: torch.device
) -> nn.Module:
    """Cross-entropy (class-weighted by `weights`, label-smoothed), sigmoid BCE, or the weighted sum over tasks."""
    return create_criterion(recipe, None if weights is None else weights.to(device), data.tasks).to(device)


def loss_weights(recipe: Recipe, data: PreparedData) -> torch.Tensor | None:
    """Per-class loss weights from the training split (None: unweighted); data.json keeps them for eval."""
    return class_weights(loss_class_weights(recipe), data.train.labels, data.num_classes)


def build_callbacks(
    recipe: Recipe, *, run: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer, data: PreparedData,
    steps_per_epoch: int, console: Console, user: Sequence[Callback],
) -> list[Callback]:  # fmt: skip
    """The recipe's callbacks around the user's: plateau schedule, two-stage switch, MLflow, snapshots."""
    callbacks = list(user)
    if recipe.schedule.name == "plateau":
        callbacks = [ReduceOnPlateau(recipe.schedule), *callbacks]
    tracker = create_mlflow(recipe, run)
    if tracker is not None:
        callbacks = [*callbacks, tracker]
    callbacks = [*callbacks, *ensemble_callbacks(recipe, model, run.checkpoints, data, steps_per_epoch)]
    if (switch := switch_epoch(recipe.data, recipe.train.epochs)) is not None:
        callbacks = [TwoStageSwitch(optimizer, model, switch, console), *callbacks]
    return callbacks
