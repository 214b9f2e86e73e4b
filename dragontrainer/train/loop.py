"""The training pipeline. `fit` reads top to bottom in the order the data flows:

load -> split -> fit preprocessing on train -> device tensors -> augment -> model -> param groups ->
optimiser -> per-step schedule -> epochs (train, evaluate, early stopping, checkpoints) -> result.
Cross-section numbers (classes, channels, steps) are computed here once and passed explicitly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from rich.console import Console
from torch import nn

from dragontrainer.console import text
from dragontrainer.data.augment import Augmenter
from dragontrainer.data.prepare import PreparedData, prepare_data
from dragontrainer.monitor.evidence import probe_loader
from dragontrainer.monitor.tensorboard import create_tensorboard
from dragontrainer.nn.models import count_parameters
from dragontrainer.optim.optimizers import base_lr
from dragontrainer.optim.schedules import create_schedule
from dragontrainer.recipe import Recipe
from dragontrainer.run import RunDir
from dragontrainer.train.allocator import configure_allocator
from dragontrainer.train.build import (
    Optimisation,
    build_augmenter,
    build_callbacks,
    build_criterion,
    build_model,
    build_optimizer,
    loss_weights,
)
from dragontrainer.train.callbacks import Callback, EarlyStopping
from dragontrainer.train.compile import training_forward
from dragontrainer.train.device import configure_determinism, resolve_device
from dragontrainer.train.engine import Loop
from dragontrainer.train.finish import finish, report_run
from dragontrainer.train.multitask import MainTaskLoss, TaskMeter, task_data
from dragontrainer.train.outcomes import TrainingDiverged, TrainResult, stop_requests
from dragontrainer.train.precision import Precision, check_precision, decide_precision
from dragontrainer.train.progress import TrainProgress
from dragontrainer.train.setup import (
    create_monitor,
    describe_extension,
    save_augmented_samples,
    save_preprocessor,
)
from dragontrainer.train.source import adopt_source
from dragontrainer.train.state import EpochMeter, TrainState, seed_everything


def fit(
    recipe: Recipe,
    run: RunDir,
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    console: Console | None = None,
    extended_from: int | None = None,
) -> TrainResult:
    """Train `recipe` into the run folder `run` (or continue it from `last` when `resume`).
    `extended_from`: the run was planned for this many epochs and is now extended to train.epochs."""
    console = console or Console(stderr=True, quiet=not progress)
    started = time.perf_counter()
    configure_allocator()  # once per process: large blocks reused, not mmapped per step (allocator.py)
    device = resolve_device(recipe.train.device)
    configure_determinism(recipe.train.deterministic, device)
    check_precision(recipe.train.precision, device)  # fp16 without CUDA: refused before any work
    seed_everything(recipe.seed)
    data = prepare_data(recipe, device, console)  # says where the images live (data.resident)
    adopt_source(recipe, data, console)  # transfer.preprocess=source: the source run's statistics and names
    save_preprocessor(run, data.preprocessor)
    augment = build_augmenter(recipe, data)
    if recipe.monitor.report and not resume:
        save_augmented_samples(run, data, augment, recipe.seed)
    model = build_model(recipe, data, device, console, resume=resume)
    weights = loss_weights(recipe, data)
    criterion = build_criterion(recipe, data, weights, device)
    loop_data = task_data(data)  # several tasks: the loop's loaders carry every task's targets
    steps_per_epoch = math.ceil(len(data.train) / recipe.train.accumulate_steps)  # optimiser steps
    precision = decide_precision(
        recipe.train.precision, run, model, lambda: probe_batch(loop_data, recipe.train.batch_size), criterion,
        device, console, total_steps=steps_per_epoch * recipe.train.epochs, resume=resume,
    )  # fmt: skip
    if recipe.optim.lr == "find":  # the LR range test, from these very weights; the state is restored after it
        from dragontrainer.monitor.lr_finder import resolve_found_lr

        recipe = resolve_found_lr(recipe, run, model, data, augment, console, amp=precision.dtype, resume=resume)
    optimisation = build_optimizer(recipe, model, run, console)
    lr_factor = create_schedule(
        recipe.schedule, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * recipe.train.epochs
    )
    # data.json is what eval/predict need without reloading the data, the loss weights included
    run.write_json("data.json", {**data.info(), "class_weights": None if weights is None else weights.tolist(),
                                 **(data.tasks.info() if data.tasks else {})})  # fmt: skip
    stopper = EarlyStopping(recipe.train.early_stopping)
    callbacks = build_callbacks(
        recipe, run=run, model=model, optimizer=optimisation.optimizer, data=data, steps_per_epoch=steps_per_epoch,
        console=console, user=callbacks,
    )  # fmt: skip
    one_task = criterion if data.tasks is None else MainTaskLoss(criterion)  # monitors measure the main task
    monitor = create_monitor(recipe, run, model, data, one_task, steps_per_epoch, resume=resume)
    loop = Loop(
        run=run, model=model, optimizer=optimisation.optimizer, lr_factor=lr_factor, criterion=criterion,
        augment=augment, augment_generator=torch.Generator(device).manual_seed(recipe.seed + 1), data=loop_data,
        amp=precision.dtype, scaler=precision.scaler(device), callbacks=[stopper, *callbacks],
        regularize=recipe.regularize, accumulate_steps=recipe.train.accumulate_steps, tta_flip=recipe.augment.tta_flip,
        recipe_lr=base_lr(recipe.optim), monitor_spec=recipe.monitor, monitor=monitor, console=console,
        tensorboard=create_tensorboard(recipe.monitor, run),
        eval_probe=probe_loader(loop_data.train, recipe.train.eval_batch_size) if monitor is not None else None,
        forward=training_forward(model, recipe.train.compile, device, console),
        val_every=recipe.train.val_every, epochs=recipe.train.epochs,
    )  # fmt: skip
    state, meter = TrainState(), EpochMeter(device) if data.tasks is None else TaskMeter(device, criterion)
    if resume:
        loop.restore(state, meter)
        if extended_from is not None:
            state.stop_reason = None  # an early-stopped run continues into its new epochs
            console.print(describe_extension(recipe, extended_from, steps_per_epoch, state.global_step))
    elif recipe.monitor.on_nan == "rollback":
        loop.save_last(state, meter)  # something to roll back to from the first epoch
    console.print(start_message(recipe, run, device, data, model, optimisation, augment, precision))
    for note in data.images.notes:
        console.print(f"[yellow]note:[/] {text(note)}")
    run_epochs(loop, recipe, state, meter, stopper, progress=progress, steps_per_epoch=steps_per_epoch)
    return finish(loop, recipe, state, time.perf_counter() - started)


def run_epochs(
    loop: Loop, recipe: Recipe, state: TrainState, meter: EpochMeter, stopper: EarlyStopping, *, progress: bool,
    steps_per_epoch: int,
) -> None:  # fmt: skip
    """Epochs until the recipe's count or a callback's stop; a divergence is rolled back (when the recipe
    allows) or recorded as evidence, reported, and raised."""
    console = loop.console or Console(stderr=True, quiet=True)
    for callback in loop.callbacks:
        callback.on_fit_start(state, {})
    with (
        stop_requests() as stops,
        TrainProgress(
            enabled=progress, epochs=recipe.train.epochs, steps_per_epoch=steps_per_epoch, console=console
        ) as bar,
    ):
        while state.epoch < recipe.train.epochs and state.stop_reason is None:
            try:
                loop.run_epoch(state, meter, bar, stops)
            except TrainingDiverged as diverged:
                if loop.rollback(state, meter, diverged):
                    continue
                loop.flush_monitor()  # the statistics up to the divergence are the evidence
                loop.run.append_stats([{"kind": "diverged", "step": diverged.step, "epoch": diverged.epoch,
                                        "lr": diverged.lr}])  # fmt: skip
                if recipe.monitor.report:
                    report_run(loop.run, console)
                raise
            bar.epoch_end(loop.end_epoch(state, meter, stopper), state.global_step)
    for callback in loop.callbacks:
        callback.on_fit_end(state, {})
    if loop.tensorboard is not None:
        loop.tensorboard.close()


def probe_batch(data: PreparedData, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training images, normalised as the loop feeds them (the precision probe's batch)."""
    x, y = data.train.take(torch.arange(min(batch_size, data.train.num_images)))
    return data.preprocessor.normalize(x.float().div_(255.0)), y


def start_message(
    recipe: Recipe, run: RunDir, device: torch.device, data: PreparedData, model: nn.Module,
    optimisation: Optimisation, augment: Augmenter, precision: Precision,
) -> str:  # fmt: skip
    info = data.info()
    return (
        f"[bold]dragon[/] {text(run.path)}  device {device}  data {text(recipe.data.source)}: "
        f"{info['num_train']} train / {info['num_val']} val / {info['num_test']} test, {data.num_classes} classes, "
        f"{'×'.join(map(str, data.images.image_shape))}\n"
        f"model {recipe.model.name} {count_parameters(model):,} params  optim {recipe.optim.name} "
        f"lr {optimisation.lr:g} ({'; '.join(map(str, optimisation.group_summary))})  augment {augment.describe()}\n"
        f"{precision.describe()}"
    )
