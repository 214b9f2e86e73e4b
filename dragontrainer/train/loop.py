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
from dragontrainer.train.distributed import (
    Distributed,
    check_last_batch,
    current,
    decorrelate_rng,
    main_only_callbacks,
    wrap_model,
)
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
    distributed: Distributed | None = None,
) -> TrainResult:
    """Train `recipe` into the run folder `run` (or continue it from `last` when `resume`).
    `extended_from`: the run was planned for this many epochs and is now extended to train.epochs.
    `distributed`: this process's rank (train/distributed.py; default: the process group joined, if any);
    every rank returns rank 0's result."""
    ranks = distributed or current()
    if not ranks.is_main:  # rank 0 speaks for the run
        console, progress = Console(stderr=True, quiet=True), False
    console = console or Console(stderr=True, quiet=not progress)
    started = time.perf_counter()
    configure_allocator()  # once per process: large blocks reused, not mmapped per step (allocator.py)
    device = ranks.place(resolve_device(recipe.train.device))
    configure_determinism(recipe.train.deterministic, device)
    check_precision(recipe.train.precision, device)  # fp16 without CUDA: refused before any work
    seed_everything(recipe.seed)
    data = prepare_data(recipe, device, console, shard=ranks.shard)  # says where the images live (data.resident)
    adopt_source(recipe, data, console)  # transfer.preprocess=source: the source run's statistics and names
    save_preprocessor(run, data.preprocessor)
    augment = build_augmenter(recipe, data)
    whole = data.unsharded()  # one-off uses of a first batch see the global batch on every rank count
    if recipe.monitor.report and not resume and ranks.is_main:
        save_augmented_samples(run, whole, augment, recipe.seed)
    model = build_model(recipe, whole, device, console, resume=resume)
    weights = loss_weights(recipe, data)
    criterion = build_criterion(recipe, data, weights, device)
    loop_data = task_data(data)  # several tasks: the loop's loaders carry every task's targets
    steps_per_epoch = math.ceil(len(data.train) / recipe.train.accumulate_steps)  # optimiser steps
    precision = ranks.broadcast(  # several ranks: rank 0 measures (a timing may differ), all train in its choice
        decide_precision(
            recipe.train.precision, run, model, lambda: probe_batch(loop_data, recipe.train.batch_size), criterion,
            device, console, total_steps=steps_per_epoch * recipe.train.epochs, resume=resume,
        ) if ranks.is_main else None
    )  # fmt: skip
    if recipe.optim.lr == "find":  # the LR range test, from these very weights; the state is restored after it
        from dragontrainer.monitor.lr_finder import resolve_found_lr

        if ranks.is_main:  # several ranks: rank 0 searches, every rank trains with its number
            recipe = resolve_found_lr(recipe, run, model, whole, augment, console, amp=precision.dtype, resume=resume)
        recipe = ranks.broadcast(recipe)
    check_last_batch(data.train.epoch_images, recipe.train.batch_size, ranks, shuffle=recipe.train.shuffle)
    optimisation = build_optimizer(recipe, model, run, console)
    lr_factor = create_schedule(
        recipe.schedule, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * recipe.train.epochs
    )
    # data.json is what eval/predict need without reloading the data, the loss weights included
    run.write_json("data.json", {**data.info(), "class_weights": None if weights is None else weights.tolist(),
                                 **(data.tasks.info() if data.tasks else {})})  # fmt: skip
    stopper = EarlyStopping(recipe.train.early_stopping)
    callbacks = build_callbacks(
        recipe, run=run, model=model, optimizer=optimisation.optimizer, data=whole, steps_per_epoch=steps_per_epoch,
        console=console, user=callbacks,
    )  # fmt: skip
    callbacks = main_only_callbacks(callbacks, ranks)  # the ones that only write files run on rank 0
    one_task = criterion if data.tasks is None else MainTaskLoss(criterion)  # monitors measure the main task
    monitor = None  # several ranks: rank 0 watches the training
    if ranks.is_main:
        monitor = create_monitor(recipe, run, model, whole, one_task, steps_per_epoch, resume=resume)
    trained = wrap_model(model, ranks, sync_batchnorm=recipe.train.sync_batchnorm)  # DDP; None for one process
    loop = Loop(
        run=run, model=model, optimizer=optimisation.optimizer, lr_factor=lr_factor, criterion=criterion,
        augment=augment, augment_generator=torch.Generator(device).manual_seed(recipe.seed + 1), data=loop_data,
        amp=precision.dtype, scaler=precision.scaler(device), callbacks=[stopper, *callbacks],
        regularize=recipe.regularize, accumulate_steps=recipe.train.accumulate_steps, tta_flip=recipe.augment.tta_flip,
        recipe_lr=base_lr(recipe.optim), monitor_spec=recipe.monitor, monitor=monitor, console=console,
        tensorboard=create_tensorboard(recipe.monitor, run) if ranks.is_main else None,
        eval_probe=probe_loader(loop_data.train, recipe.train.eval_batch_size) if monitor is not None else None,
        forward=training_forward(model if trained is None else trained, recipe.train.compile, device, console),
        distributed=ranks, trained=trained, seed=recipe.seed,
        val_every=recipe.train.val_every, epochs=recipe.train.epochs,
    )  # fmt: skip
    state, meter = TrainState(), EpochMeter(device) if data.tasks is None else TaskMeter(device, criterion)
    if resume:
        loop.restore(state, meter)
        if extended_from is not None:
            state.stop_reason = None  # an early-stopped run continues into its new epochs
            console.print(describe_extension(recipe, extended_from, steps_per_epoch, state.global_step))
    else:
        decorrelate_rng(recipe.seed, ranks, 0, loop.augment_generator)  # ranks other than 0: streams of their own
    if not resume and recipe.monitor.on_nan == "rollback":
        loop.save_last(state, meter)  # something to roll back to from the first epoch
    console.print(start_message(recipe, run, device, data, model, optimisation, augment, precision))
    for note in data.images.notes:
        console.print(f"[yellow]note:[/] {text(note)}")
    run_epochs(loop, recipe, state, meter, stopper, progress=progress, steps_per_epoch=steps_per_epoch)
    # rank 0 scores the best weights and writes result.json and the report; every rank returns its result
    return ranks.broadcast(finish(loop, recipe, state, time.perf_counter() - started) if ranks.is_main else None)


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
                if recipe.monitor.report and loop.distributed.is_main:
                    report_run(loop.run, console)
                raise
            bar.epoch_end(loop.end_epoch(state, meter, stopper), state.global_step)
            state.stop_reason = loop.distributed.broadcast(state.stop_reason)  # ranks stop together, on rank 0's word
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
