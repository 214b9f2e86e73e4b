"""The training pipeline. `fit` reads top to bottom in the order the data flows:

load -> split -> fit preprocessing on train -> device tensors -> augment -> model -> param groups ->
optimiser -> per-step schedule -> epochs (train, evaluate, early stopping, checkpoints) -> result.
Cross-section numbers (classes, channels, steps) are computed here once and passed explicitly.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from dragontrainer.console import text
from dragontrainer.data.augment import Augmenter, create_augmenter, flip_averaged_logits
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.memo import load_images_once
from dragontrainer.data.preprocess import Preprocessor, create_preprocessor
from dragontrainer.data.sources import ImageSet
from dragontrainer.data.split import Split, split_for
from dragontrainer.errors import DataError, RecipeError, RunError
from dragontrainer.monitor.evidence import label_noise_record, probe_loader
from dragontrainer.monitor.mlflow import create_mlflow
from dragontrainer.monitor.stats import Monitor, confusion_matrix, watched_parameters
from dragontrainer.monitor.tensorboard import TensorBoardSink, create_tensorboard
from dragontrainer.nn.init import lsuv_rescale
from dragontrainer.nn.models import count_parameters, create_model
from dragontrainer.nn.multitask import coupling_penalty, create_multitask_model
from dragontrainer.nn.pretrained import load_pretrained
from dragontrainer.optim.optimizers import base_lr, create_optimizer, effective_lr
from dragontrainer.optim.param_groups import build_param_groups
from dragontrainer.optim.regularizers import clip_gradients, create_penalty, project_max_norm
from dragontrainer.optim.schedules import LrFactor, create_schedule
from dragontrainer.optim.transfer import (
    apply_transfer,
    build_transfer_groups,
    record_group_table,
    with_head_group,
    with_lr,
)
from dragontrainer.recipe import MonitorSpec, Recipe, RegularizeSpec
from dragontrainer.resources import check_model_fits
from dragontrainer.run import RunDir
from dragontrainer.run_files import read_tensors
from dragontrainer.train.balance import TwoStageSwitch, loss_class_weights, switch_epoch, with_rare_class_boost
from dragontrainer.train.callbacks import Callback, EarlyStopping, ReduceOnPlateau
from dragontrainer.train.checkpoint import (
    checkpoint_folder,
    load_model_weights,
    load_optimizer,
    load_state,
    save_checkpoint,
)
from dragontrainer.train.class_metrics import per_class_metrics, summary_metrics
from dragontrainer.train.multitask import (
    MainTaskLoss,
    TaskMeter,
    TaskSet,
    best_task_metrics,
    check_task_recipe,
    create_criterion,
    evaluate_tasks,
    main_labels,
    main_task_images,
    resolve_tasks,
    task_data,
    task_rows,
)
from dragontrainer.train.progress import TrainProgress
from dragontrainer.train.snapshots import ensemble_callbacks
from dragontrainer.train.source import adopt_source
from dragontrainer.train.state import EpochMeter, TrainState, capture_rng, restore_rng, seed_everything


@dataclass
class TrainResult:
    """What a finished (or early-stopped) run reports; `history` holds every metrics line."""

    run_dir: Path
    epochs: int
    best_epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    best_val_loss: float
    best_val_accuracy: float
    seconds: float
    images_per_second: float
    test_loss: float | None = None
    test_accuracy: float | None = None
    stop_reason: str | None = None
    best_val_balanced_accuracy: float | None = None  # mean per-class recall at the best epoch
    # per class (precision, recall, F1, support) of the best weights on the test split, else validation
    per_class: list[dict[str, Any]] | None = field(default=None, repr=False)
    per_class_split: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list, repr=False)  # the diagnosis, errors first
    tasks: dict[str, Any] | None = None  # several tasks: each task's metrics ({"val": best epoch's, "test": ...})
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """The JSON object `dragon train --json` prints (everything but the history)."""
        record = asdict(self)
        record.pop("history")
        record["run_dir"] = str(self.run_dir)
        return record


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the current step finished, `last` was written, the run can be resumed."""

    def __init__(self, signum: int, run_dir: Path, state: TrainState) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped at epoch {state.epoch + 1}, step {state.global_step}; "
            f"the run is saved — continue it with: dragon resume {run_dir}"
        )


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last checkpoint (the end of the previous epoch) is intact."""

    def __init__(self, step: int, epoch: int, lr: float, recipe_lr: float, run_dir: Path) -> None:
        self.step, self.epoch, self.lr = step, epoch, lr
        last = run_dir / "checkpoints" / "last"
        saved = (
            f"the last good checkpoint (epoch {epoch - 1}) is in {last}" if epoch > 1 else "no checkpoint was written"
        )
        super().__init__(
            f"training diverged: the loss became NaN/Inf at step {step} (epoch {epoch}) with learning rate {lr:.3g}; "
            f"{saved}. Lower the learning rate (optim.lr={recipe_lr / 10:.3g}) or clip gradients "
            f"(regularize.clip_grad_norm=1.0)"
        )


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


# ---------------------------------------------------------------------------- building blocks


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RecipeError(
            f"recipe field train.device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("recipe field train.device: cuda was asked for but no CUDA device is available")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA by default (no loss scaling needed); full precision on CPU."""
    if amp == "on" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DeviceLoader,
    criterion: nn.Module,
    preprocessor: Preprocessor,
    *,
    amp: torch.dtype | None = None,
    tta_flip: bool = False,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Mean loss, accuracy, balanced accuracy and macro F1 over a whole split of uint8 images, in eval
    mode (batch norm uses running statistics); with `tta_flip`, the softmax is averaged with the mirror
    image's. With `num_classes`, also the confusion matrix (`confusion[true][predicted]`)."""
    was_training = model.training
    model.eval()
    device = loader.x.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    confusion = None
    for x, y in loader.batches():
        inputs = preprocessor.apply(x)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = flip_averaged_logits(model, inputs) if tta_flip else model(inputs)
        loss_sum += criterion(logits.float(), y).double() * len(y)
        predictions = logits.argmax(1)
        correct += (predictions == y).sum()
        batch_confusion = confusion_matrix(y, predictions, num_classes or logits.shape[1])
        confusion = batch_confusion if confusion is None else confusion + batch_confusion
    model.train(was_training)
    count = max(loader.num_images, 1)
    result: dict[str, Any] = {"loss": float(loss_sum) / count, "accuracy": int(correct) / count}
    if confusion is not None:
        result.update(summary_metrics(confusion))
        if num_classes:
            result["confusion"] = confusion.tolist()
    return result


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """SIGINT/SIGTERM set a flag instead of killing mid-step; the loop checks it after each step."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------- the loop


CHECK_EVERY = 50  # steps between divergence checks (each one a device sync)
MAX_CONFUSION_CLASSES = 1000


@dataclass
class Loop:
    """Everything one epoch needs, built once by `fit`."""

    run: RunDir
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_factor: LrFactor
    criterion: nn.Module
    augment: Augmenter
    augment_generator: torch.Generator
    data: PreparedData
    amp: torch.dtype | None
    callbacks: Sequence[Callback]
    regularize: RegularizeSpec
    accumulate_steps: int
    tta_flip: bool
    recipe_lr: float  # optim.lr as written in the recipe, for advice
    monitor_spec: MonitorSpec
    monitor: Monitor | None = None
    console: Console | None = None
    tensorboard: TensorBoardSink | None = None
    eval_probe: DeviceLoader | None = None  # fixed training images scored in eval mode every epoch (diagnosis)

    def __post_init__(self) -> None:
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.weights = [p for p in self.parameters if p.ndim >= 2]  # conv kernels and linear weights
        self.penalty = create_penalty(self.regularize)
        self.optimizer.zero_grad(set_to_none=True)
        # first step whose loss was not finite, kept on the device: checked every CHECK_EVERY steps
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=next(self.model.parameters()).device)
        self.first_bad_lr = torch.zeros((), device=self.first_bad_step.device)
        self.step_loss: torch.Tensor | None = None  # the loss of the optimiser step being accumulated

    def checkpoint_state(self, state: TrainState, meter: EpochMeter) -> dict[str, Any]:
        return {
            "train": state.state_dict(),
            "meter": meter.state_dict(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            "rng": capture_rng(self.augment_generator),
        }

    def save_last(self, state: TrainState, meter: EpochMeter) -> None:
        save_checkpoint(self.run.checkpoints / "last", self.model, self.optimizer, self.checkpoint_state(state, meter))

    def restore(self, state: TrainState, meter: EpochMeter) -> None:
        folder = self.run.checkpoints / "last"
        saved = load_state(folder)
        load_model_weights(folder, self.model)
        load_optimizer(folder, self.optimizer, saved["optimizer"])
        state.load_state_dict(saved["train"])
        meter.load_state_dict(saved["meter"])
        for callback in self.callbacks:
            if type(callback).__name__ in saved["callbacks"]:
                callback.load_state_dict(saved["callbacks"][type(callback).__name__])
        try:
            restore_rng(saved["rng"], self.augment_generator)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise RunError(
                f"{folder}/state.json: the random-number state is not valid ({type(exc).__name__})"
            ) from None
        self.run.keep_metrics_through(state.epoch)
        self.run.keep_stats_through(state.global_step)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, state: TrainState, meter: EpochMeter) -> bool:
        """Forward and backward one micro-batch; every `accumulate_steps` of them (or at the epoch's
        end) clip, step the optimiser with this step's learning rate, and project max-norm.
        Returns whether the optimiser stepped."""
        pixels, targets = self.augment(x.float().div_(255.0), y, self.augment_generator)
        inputs = self.data.preprocessor.normalize(pixels)
        with torch.autocast(inputs.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.model(inputs)
        loss = self.criterion(logits.float(), targets)  # targets: labels, or soft targets from mixup/cutmix
        penalty = self.penalty(self.weights)
        objective = loss if penalty is None else loss + penalty
        if (coupling := coupling_penalty(self.model)) is not None:  # soft parameter sharing
            objective = objective + coupling
        group_start = state.step_in_epoch - state.step_in_epoch % self.accumulate_steps
        group_size = min(self.accumulate_steps, len(self.data.train) - group_start)  # the epoch's last is short
        (objective / group_size).backward()
        meter.update(loss, logits, y)
        self.watch_for_divergence(loss, state)
        if self.monitor is not None:
            step_loss = loss.detach() / group_size
            self.step_loss = step_loss if self.step_loss is None else self.step_loss + step_loss
        state.step_in_epoch += 1
        if state.step_in_epoch % self.accumulate_steps and state.step_in_epoch < len(self.data.train):
            return False
        state.lr = self.lr_factor(state.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * state.lr * state.lr_scale
        sampled = self.monitor is not None and self.monitor.sampling(state.global_step)
        if self.monitor is not None:
            self.record_step(y, state)
            if sampled:
                self.monitor.before_update()
        clip_gradients(self.parameters, self.regularize)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.regularize.max_norm is not None:
            project_max_norm(self.weights, self.regularize.max_norm)
        if sampled:
            self.monitor.after_update(state.global_step + 1, state.epoch + 1)
        state.global_step += 1
        return True

    def record_step(self, labels: torch.Tensor, state: TrainState) -> None:
        """Per-step series for the monitor (on the device); a non-finite gradient counts as divergence."""
        assert self.monitor is not None and self.step_loss is not None
        grads = [p.grad for p in self.parameters if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else self.step_loss * 0
        self.watch_for_divergence(grad_norm, state)
        classes = torch.bincount(main_labels(labels), minlength=self.data.num_classes).count_nonzero()
        values = torch.stack([self.step_loss, grad_norm, classes.to(grad_norm.dtype)])
        self.monitor.record_step(state.global_step + 1, state.epoch + 1, self.current_lr(), values)
        self.step_loss = None

    def flush_monitor(self) -> None:
        if self.monitor is not None:
            lines = self.monitor.flush()
            self.run.append_stats(lines)
            if self.tensorboard is not None:
                self.tensorboard.write_stats(lines)

    def watch_for_divergence(self, loss: torch.Tensor, state: TrainState) -> None:
        """Record the first non-finite loss without a host sync (torch.where on device tensors)."""
        first = (self.first_bad_step < 0) & ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(first, state.global_step, self.first_bad_step)
        self.first_bad_lr = torch.where(first, self.current_lr(), self.first_bad_lr)

    def rollback(self, state: TrainState, meter: EpochMeter, diverged: TrainingDiverged) -> bool:
        """`monitor.on_nan=rollback`: back to `last` with the learning rate lowered, a limited number of
        times; recorded in stats.jsonl (the diagnosis reports it). False when the run must stop instead."""
        spec = self.monitor_spec
        if spec.on_nan != "rollback" or state.rollbacks >= spec.max_rollbacks:
            return False
        rollbacks, lr_scale = state.rollbacks + 1, state.lr_scale * spec.rollback_lr_factor
        self.restore(state, meter)
        state.rollbacks, state.lr_scale = rollbacks, lr_scale
        self.first_bad_step.fill_(-1)
        self.step_loss = None
        if self.monitor is not None:
            self.monitor.flush()  # measurements past the checkpoint are dropped with it
        self.run.append_stats([{
            "kind": "rollback", "step": state.global_step, "epoch": state.epoch, "diverged_step": diverged.step,
            "diverged_epoch": diverged.epoch, "lr": diverged.lr, "lr_scale": lr_scale, "rollback": rollbacks,
        }])  # fmt: skip
        self.save_last(state, meter)
        if self.console is not None:
            self.console.print(
                f"[yellow]loss became NaN/Inf at step {diverged.step} (lr {diverged.lr:.3g}): rolled back to step "
                f"{state.global_step}, learning rate ×{lr_scale:g} ({rollbacks}/{spec.max_rollbacks})[/]"
            )
        return True

    def raise_if_diverged(self, state: TrainState) -> None:
        step = int(self.first_bad_step)  # a device sync: called every CHECK_EVERY steps and per epoch
        if step >= 0:
            raise TrainingDiverged(step, state.epoch + 1, float(self.first_bad_lr), self.recipe_lr, self.run.path)

    def run_epoch(self, state: TrainState, meter: EpochMeter, progress: TrainProgress, stops: list[int]) -> None:
        """Train one epoch (from `state.step_in_epoch`, when resumed mid-epoch), checking for stop requests
        between optimiser steps (never with gradients half accumulated)."""
        self.model.train()
        for callback in self.callbacks:
            callback.on_epoch_start(state, {})
        started = time.perf_counter()
        seconds_before = meter.seconds
        for x, y in self.data.train.batches(state.epoch, start_step=state.step_in_epoch):
            if not self.train_step(x, y, state, meter):
                continue  # gradients half accumulated: no callbacks, no stop
            for callback in self.callbacks:
                callback.on_step_end(state, {})
            elapsed = seconds_before + time.perf_counter() - started
            progress.step(
                global_step=state.global_step, epoch=state.epoch + 1, lr=self.current_lr(), meter=meter, elapsed=elapsed
            )
            if state.global_step % CHECK_EVERY == 0:
                self.raise_if_diverged(state)
            if stops:
                meter.seconds = elapsed
                self.flush_monitor()
                self.save_last(state, meter)
                raise TrainingInterrupted(stops[0], self.run.path, state)
        meter.loss()  # a device sync, so the time below is the time the work took
        meter.seconds = seconds_before + time.perf_counter() - started
        self.raise_if_diverged(state)  # before evaluation and checkpoints: `last` stays the good one

    def evaluate(self, loader: DeviceLoader, *, confusion: bool = False) -> dict[str, Any]:
        if self.data.tasks is not None:
            return evaluate_tasks(self.model, loader, self.criterion, self.data.preprocessor, amp=self.amp,
                                  num_classes=self.data.num_classes if confusion else None)  # fmt: skip
        return evaluate(
            self.model, loader, self.criterion, self.data.preprocessor, amp=self.amp, tta_flip=self.tta_flip,
            num_classes=self.data.num_classes if confusion else None,
        )  # fmt: skip

    def current_lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)  # groups may run at lr_mult or 0

    def end_epoch(self, state: TrainState, meter: EpochMeter, stopper: EarlyStopping) -> dict[str, Any]:
        """Evaluate, log both splits, let callbacks decide, write `best` and `last`."""
        # the confusion matrix is C×C: skipped for very many classes (it would dwarf the model)
        wanted = self.monitor is not None and self.data.num_classes <= MAX_CONFUSION_CLASSES
        val = self.evaluate(self.data.val, confusion=wanted)
        confusion = val.pop("confusion", None)
        val.pop("label_counts", None)
        epoch = state.epoch + 1
        train_record = {
            "epoch": epoch, "split": "train", "step": state.global_step, "loss": meter.loss(),
            "accuracy": meter.accuracy(), "lr": self.current_lr(), "images": meter.seen,
            "seconds": meter.seconds, "images_per_second": meter.seen / max(meter.seconds, 1e-9),
        }  # fmt: skip
        if isinstance(meter, TaskMeter):
            train_record["tasks"] = meter.task_metrics()
        if self.eval_probe is not None:  # training accuracy as validation is measured: eval mode, no augmentation
            probe = self.evaluate(self.eval_probe)
            probe.pop("tasks", None)
            train_record.update(eval_loss=probe["loss"], eval_accuracy=probe["accuracy"],
                                eval_images=self.eval_probe.num_images)  # fmt: skip
        val_record = {"epoch": epoch, "split": "val", "step": state.global_step, **val}
        logs = {"train_loss": train_record["loss"], "train_accuracy": train_record["accuracy"],
                "val_loss": val["loss"], "val_accuracy": val["accuracy"]}  # fmt: skip
        for callback in self.callbacks:
            callback.on_eval_end(state, logs)
        if self.tensorboard is not None:
            self.tensorboard.write_epoch(epoch, logs)
        self.run.append_metrics(train_record)
        self.run.append_metrics(val_record)
        self.run.write_metrics_csv()
        if stopper.improved:
            state.best_epoch = epoch
            best_state = {"train": {**state.state_dict(), "epoch": epoch}, "metrics": logs}
            save_checkpoint(self.run.checkpoints / "best", self.model, None, best_state)
        for callback in self.callbacks:
            callback.on_epoch_end(state, logs)
        if self.monitor is not None and confusion is not None:
            self.monitor.add_record(epoch_record(epoch, state.global_step, confusion))
        self.flush_monitor()
        state.epoch, state.step_in_epoch = epoch, 0
        meter.reset()
        self.save_last(state, meter)
        return {
            **logs,
            "epoch": epoch,
            "lr": train_record["lr"],
            "images_per_second": train_record["images_per_second"],
        }


def epoch_record(epoch: int, step: int, confusion: list[list[int]]) -> dict[str, Any]:
    """Per-class validation accuracy (None for a class absent from validation) and the confusion matrix."""
    per_class = [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]
    return {"kind": "epoch", "step": step, "epoch": epoch, "per_class_accuracy": per_class, "confusion": confusion}


def create_monitor(
    recipe: Recipe, run: RunDir, model: nn.Module, data: PreparedData, criterion: nn.Module, steps_per_epoch: int,
    *, resume: bool,
) -> Monitor | None:  # fmt: skip
    """The monitor with its fixed probe batch (training images spread over the split) and the initial
    weights (saved in init.safetensors so a resumed run still measures the distance from them)."""
    if not recipe.monitor.enabled:
        return None
    from safetensors.torch import save

    train = data.train
    device = train.x.device
    count = min(recipe.monitor.probe_size, train.num_images)
    index = torch.linspace(0, train.num_images - 1, count, device=device).long()
    probe = data.preprocessor.apply(train.x[index])

    def noise_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        picks = torch.randint(train.num_images, (max(count, 8),), generator=generator).to(device)
        return data.preprocessor.apply(train.x[picks]), train.y[picks]

    init_file = run.file("init.safetensors")
    initial = None
    if resume and init_file.exists():
        initial = {k: v.to(device) for k, v in read_tensors(init_file).items()}
    monitor = Monitor(
        model, recipe.monitor, steps_per_epoch=steps_per_epoch, probe=probe, noise_batch=noise_batch,
        criterion=criterion, initial=initial,
    )  # fmt: skip
    if initial is None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in watched_parameters(model).items()}
        run.write_bytes(init_file.name, save(tensors))
    if not resume:  # a fresh start (also after a kill before the first checkpoint): a fresh file
        run.keep_stats_through(-1)
        run.append_stats([monitor.probe_record(data.num_classes, train.y[index])])
        from dragontrainer.monitor.doctor import start_checks

        run.append_stats([start_checks(recipe, data, device)])
    return monitor


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
    device = resolve_device(recipe.train.device)
    configure_determinism(recipe.train.deterministic, device)
    seed_everything(recipe.seed)
    data = prepare_data(recipe, device)
    adopt_source(recipe, data, console)  # transfer.preprocess=source: the source run's statistics and names
    save_preprocessor(run, data.preprocessor)
    channels, size, _ = data.images.image_shape
    train_images = torch.from_numpy(data.images.x[data.split.train])
    augment = create_augmenter(
        recipe.augment, data.images.image_shape, data.images.flip_safe, train_images, data.num_classes
    )
    augment = with_rare_class_boost(
        augment, recipe.augment, data.images.image_shape, data.images.flip_safe, train_images,
        torch.from_numpy(data.images.y[data.split.train]), data.num_classes,
    )  # fmt: skip
    if recipe.monitor.report and not resume:
        save_augmented_samples(run, data, augment, recipe.seed)
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
    if recipe.optim.lr == "find":  # the LR range test, from these very weights; the state is restored after it
        from dragontrainer.monitor.lr_finder import resolve_found_lr

        recipe = resolve_found_lr(recipe, run, model, data, augment, console, resume=resume)
    transfer_notes = apply_transfer(model, recipe.transfer)  # freeze, stop-gradient and frozen-BN hooks
    group_rules = with_head_group(recipe.transfer) if recipe.data.balance == "two_stage" else recipe.transfer
    if group_rules.rules:
        groups, group_summary = build_transfer_groups(model, recipe.optim.weight_decay, group_rules)
    else:
        groups, group_summary = build_param_groups(model, recipe.optim.weight_decay)
    accumulate = recipe.train.accumulate_steps
    lr = effective_lr(recipe.optim, recipe.train.batch_size * accumulate)
    if group_rules.rules:
        group_summary = record_group_table(run, console, with_lr(group_summary, lr), transfer_notes)
    optimizer = create_optimizer(groups, recipe.optim, lr)
    steps_per_epoch = math.ceil(len(data.train) / accumulate)  # optimiser steps
    lr_factor = create_schedule(
        recipe.schedule, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * recipe.train.epochs
    )
    weights = class_weights(loss_class_weights(recipe), data.images.y[data.split.train], data.num_classes)
    # data.json is what eval/predict need without reloading the data, the loss weights included
    run.write_json("data.json", {**data.info(), "class_weights": None if weights is None else weights.tolist(),
                                 **(data.tasks.info() if data.tasks else {})})  # fmt: skip
    criterion = create_criterion(recipe, None if weights is None else weights.to(device), data.tasks).to(device)
    stopper = EarlyStopping(recipe.train.early_stopping)
    if recipe.schedule.name == "plateau":
        callbacks = [ReduceOnPlateau(recipe.schedule), *callbacks]
    tracker = create_mlflow(recipe, run)
    if tracker is not None:
        callbacks = [*callbacks, tracker]
    callbacks = [*callbacks, *ensemble_callbacks(recipe, model, run.checkpoints, data, steps_per_epoch)]
    if (switch := switch_epoch(recipe.data, recipe.train.epochs)) is not None:
        callbacks = [TwoStageSwitch(optimizer, model, switch, console), *callbacks]
    loop_data = task_data(data)  # several tasks: the loop's loaders carry every task's targets
    one_task = criterion if data.tasks is None else MainTaskLoss(criterion)  # monitors measure the main task
    monitor = create_monitor(recipe, run, model, data, one_task, steps_per_epoch, resume=resume)
    loop = Loop(
        run, model, optimizer, lr_factor, criterion, augment,
        torch.Generator(device).manual_seed(recipe.seed + 1), loop_data,
        autocast_dtype(recipe.train.amp, device), [stopper, *callbacks], recipe.regularize,
        accumulate, recipe.augment.tta_flip, base_lr(recipe.optim), recipe.monitor, monitor, console,
        create_tensorboard(recipe.monitor, run),
        eval_probe=probe_loader(loop_data.train, recipe.train.eval_batch_size) if monitor is not None else None,
    )  # fmt: skip
    state, meter = TrainState(), EpochMeter(device) if data.tasks is None else TaskMeter(device, criterion)
    if resume:
        loop.restore(state, meter)
        if extended_from is not None:
            state.stop_reason = None  # an early-stopped run continues into its new epochs
            console.print(describe_extension(recipe, extended_from, steps_per_epoch, state.global_step))
    elif recipe.monitor.on_nan == "rollback":
        loop.save_last(state, meter)  # something to roll back to from the first epoch
    console.print(
        f"[bold]dragon[/] {text(run.path)}  device {device}  data {text(recipe.data.source)}: "
        f"{data.info()['num_train']} train / "
        f"{data.info()['num_val']} val / {data.info()['num_test']} test, {data.num_classes} classes, "
        f"{'×'.join(map(str, data.images.image_shape))}\n"
        f"model {recipe.model.name} {count_parameters(model):,} params  optim {recipe.optim.name} lr {lr:g} "
        f"({'; '.join(map(str, group_summary))})  augment {augment.describe()}"
    )
    for note in data.images.notes:
        console.print(f"[yellow]note:[/] {text(note)}")
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
                run.append_stats([{"kind": "diverged", "step": diverged.step, "epoch": diverged.epoch,
                                   "lr": diverged.lr}])  # fmt: skip
                if recipe.monitor.report:
                    report_run(run, console)
                raise
            bar.epoch_end(loop.end_epoch(state, meter, stopper), state.global_step)
    for callback in loop.callbacks:
        callback.on_fit_end(state, {})
    if loop.tensorboard is not None:
        loop.tensorboard.close()
    return finish(loop, recipe, state, time.perf_counter() - started)


def describe_extension(recipe: Recipe, old_epochs: int, steps_per_epoch: int, step: int) -> str:
    """What lengthening the run does to the learning-rate curve (the schedule spans the new length)."""

    def factor(epochs: int) -> float:
        schedule = create_schedule(
            recipe.schedule, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * epochs
        )
        return schedule(step)

    before, after = factor(old_epochs), factor(recipe.train.epochs)
    return (
        f"extending the run from {old_epochs} to {recipe.train.epochs} epochs: the {recipe.schedule.name} schedule "
        f"now spans {recipe.train.epochs} epochs, so at step {step} the learning rate factor goes from "
        f"{before:.3g} to {after:.3g}"
        + (" (it rises again: the decay had nearly finished)" if after > 1.5 * before else "")
    )


def finish(loop: Loop, recipe: Recipe, state: TrainState, seconds: float) -> TrainResult:
    """Score the best weights on the test split (if any), write result.json, build the result."""
    history = loop.run.history()
    train = [r for r in history if r["split"] == "train"]
    val = [r for r in history if r["split"] == "val"]
    best = next((r for r in val if r["epoch"] == state.best_epoch), val[-1])
    test = None
    if checkpoint_folder(loop.run.checkpoints / "best") is not None:
        load_model_weights(loop.run.checkpoints / "best", loop.model)
    use_test = recipe.train.score_test and loop.data.test is not None  # search trials never look at test
    confusion = loop.data.num_classes <= MAX_CONFUSION_CLASSES
    scored = loop.evaluate(loop.data.test if use_test else loop.data.val, confusion=confusion)  # best weights
    if use_test:
        test = scored
    per_class = None
    if loop.data.tasks is not None:
        per_class = task_rows(scored, loop.data.tasks)
    elif confusion:
        per_class = per_class_metrics(torch.tensor(scored.pop("confusion")), loop.data.images.classes)
    result = TrainResult(
        run_dir=loop.run.path,
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        train_loss=train[-1]["loss"],
        train_accuracy=train[-1]["accuracy"],
        val_loss=val[-1]["loss"],
        val_accuracy=val[-1]["accuracy"],
        best_val_loss=best["loss"],
        best_val_accuracy=best["accuracy"],
        seconds=seconds,
        images_per_second=sum(r["images"] for r in train) / max(sum(r["seconds"] for r in train), 1e-9),
        test_loss=test["loss"] if test else None,
        test_accuracy=test["accuracy"] if test else None,
        # a stop requested at the last epoch stopped nothing: the run completed, so no message
        stop_reason=state.stop_reason if state.epoch < recipe.train.epochs else None,
        best_val_balanced_accuracy=best.get("balanced_accuracy"),
        per_class=per_class,
        per_class_split="test" if test else "val",
        history=history,
        tasks=None if loop.data.tasks is None else best_task_metrics(history, state.best_epoch, test),
    )
    loop.run.write_json("result.json", result.summary())
    if loop.monitor is not None and loop.data.tasks is None:  # confident learning reads one softmax head
        write_label_noise(loop, recipe, state)
    if recipe.monitor.report:  # the report puts its findings into result.json too (findings.json's copy)
        result.findings = report_run(loop.run, loop.console or Console(stderr=True, quiet=True))
    return result


def write_label_noise(loop: Loop, recipe: Recipe, state: TrainState) -> None:
    """Confident learning on the best checkpoint's features (monitor/evidence.py): a `label_noise` line
    in stats.jsonl and suspect_labels.csv. Failing to estimate it is reported, never fatal."""
    if checkpoint_folder(loop.run.checkpoints / "best") is not None:
        load_model_weights(loop.run.checkpoints / "best", loop.model)
    try:
        record = label_noise_record(loop.model, loop.data, loop.run, recipe.seed, state.global_step)
    except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
        if loop.console is not None:
            loop.console.print(f"[yellow]label noise could not be estimated: {text(exc)}[/]")
        return
    loop.run.append_stats([record])


def report_run(run: RunDir, console: Console) -> list[dict[str, Any]]:
    """findings.json and report.html; the findings that matter are printed. A failure to draw the
    report is reported, never raised: the trained weights and metrics are already safe."""
    from dragontrainer.monitor.diagnose import print_findings
    from dragontrainer.report.html import write_report

    try:
        page, findings = write_report(run.path)
    except Exception as exc:
        console.print(f"[yellow]the report could not be written: {type(exc).__name__}: {text(exc)}[/]")
        return []
    print_findings(console, findings, with_info=False)
    console.print(f"report: {text(page)}")
    return [f.to_dict() for f in findings]


def class_weights(choice: str | list[float], train_labels: Any, num_classes: int) -> torch.Tensor | None:
    """Loss weight per class: `balanced` gives N / (C · count_c) from the training split (King & Zeng),
    so every class carries the same total weight; a list is taken as given (one value per class)."""
    if choice == "none":
        return None
    if isinstance(choice, list):
        if len(choice) != num_classes:
            raise RecipeError(f"recipe field train.class_weights: {len(choice)} weights for {num_classes} classes")
        return torch.tensor(choice, dtype=torch.float32)
    counts = torch.bincount(torch.as_tensor(train_labels), minlength=num_classes).float()
    return torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), 0.0)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """CPU runs are reproducible as they are; on CUDA, `deterministic` trades speed for bitwise repeats."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    # set both ways: the switch is process-wide, and a previous run in this process may have turned it on
    torch.use_deterministic_algorithms(deterministic)
    # fastest kernels for fixed shapes, not bitwise repeatable
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def save_augmented_samples(run: RunDir, data: PreparedData, augment: Augmenter, seed: int, count: int = 16) -> None:
    """A few training images as the augmentation leaves them, for the report (own generator: the
    training RNG streams are untouched)."""
    from safetensors.torch import save

    x, y = next(data.train.batches(epoch=0))
    x, y = x[:count], y[:count]
    generator = torch.Generator(x.device).manual_seed(seed + 7)
    saved = capture_rng(generator)  # mixers draw λ from NumPy's global generator: put every stream back
    pixels, _ = augment(x.float().div(255.0), y, generator)
    restore_rng(saved, generator)
    images = pixels.clamp(0, 1).mul(255).round().to(torch.uint8).cpu().contiguous()
    run.write_bytes("augment_samples.safetensors", save({"images": images, "labels": y.cpu()}))


def save_preprocessor(run: RunDir, preprocessor: Preprocessor) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in preprocessor.state_dict().items()}
    run.write_bytes("preprocess.safetensors", save(tensors))
