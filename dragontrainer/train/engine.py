"""The training engine: one optimiser step, one epoch, the end-of-epoch bookkeeping, checkpoints,
divergence watching and rollback. Built once by `fit` from its collaborators, passed by keyword.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from torch import nn

from dragontrainer.data.augment import Augmenter
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.prepare import PreparedData
from dragontrainer.errors import RunError
from dragontrainer.monitor.stats import Monitor
from dragontrainer.monitor.tensorboard import TensorBoardSink
from dragontrainer.nn.multitask import coupling_penalty
from dragontrainer.optim.regularizers import clip_gradients, create_penalty, project_max_norm
from dragontrainer.optim.schedules import LrFactor
from dragontrainer.recipe import MonitorSpec, RegularizeSpec
from dragontrainer.run import RunDir
from dragontrainer.train.callbacks import Callback, EarlyStopping
from dragontrainer.train.checkpoint import (
    load_model_weights,
    load_optimizer,
    load_state,
    save_checkpoint,
)
from dragontrainer.train.distributed import SINGLE, Distributed, decorrelate_rng, shard_weight
from dragontrainer.train.evaluate import MAX_CONFUSION_CLASSES, epoch_record, evaluate
from dragontrainer.train.multitask import TaskMeter, evaluate_tasks, main_labels
from dragontrainer.train.outcomes import TrainingDiverged, TrainingInterrupted
from dragontrainer.train.progress import TrainProgress
from dragontrainer.train.state import EpochMeter, TrainState, capture_rng, restore_rng

CHECK_EVERY = 50  # steps between divergence checks (each one a device sync)
# the eval-mode training probe (512 images, diagnosis) runs at every 2nd validation and the last: 4% → 2% of a
# CIFAR-shaped epoch; the diagnosis reads the last fit and the best of each half of the series
PROBE_EVERY = 2
STOP_CHECK_EVERY = 10  # several ranks: optimiser steps between the (collective) checks for a stop request


@dataclass(kw_only=True)
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
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling (train/precision.py)
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # the training forward (train/compile.py)
    # several ranks (train/distributed.py): which rank this is, and the DistributedDataParallel wrapper the
    # training step runs through; everything else (monitor, evaluation, checkpoints) uses `model` itself
    distributed: Distributed = SINGLE
    trained: nn.Module | None = None
    seed: int = 0  # ranks other than 0 derive their own random streams from it (decorrelate_rng)
    val_every: int = 1  # train.val_every: validate every this many epochs, and always after the last
    epochs: int = 0  # train.epochs: the last epoch, always validated

    def __post_init__(self) -> None:
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.weights = [p for p in self.parameters if p.ndim >= 2]  # conv kernels and linear weights
        self.penalty = create_penalty(self.regularize)
        self.optimizer.zero_grad(set_to_none=True)
        # first step whose loss was not finite, kept on the device: checked every CHECK_EVERY steps
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=next(self.model.parameters()).device)
        self.first_bad_lr = torch.zeros((), device=self.first_bad_step.device)
        self.step_loss: torch.Tensor | None = None  # the loss of the optimiser step being accumulated
        if self.forward is None:  # the DDP wrapper (several ranks), else the model
            self.forward = self.trained if self.trained is not None else self.model

    def checkpoint_state(self, state: TrainState, meter: EpochMeter) -> dict[str, Any]:
        return {
            "train": state.state_dict(),
            "meter": meter.state_dict(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks},
            "rng": capture_rng(self.augment_generator),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def save_last(self, state: TrainState, meter: EpochMeter) -> None:
        if not self.distributed.is_main:
            return  # rank 0 writes the run folder
        save_checkpoint(self.run.checkpoints / "last", self.model, self.optimizer, self.checkpoint_state(state, meter))

    def restore(self, state: TrainState, meter: EpochMeter) -> None:
        folder = self.run.checkpoints / "last"
        saved = load_state(folder)
        load_model_weights(folder, self.model)
        load_optimizer(folder, self.optimizer, saved["optimizer"])
        state.load_state_dict(saved["train"])
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])
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
        if not self.distributed.is_main:
            meter.reset()  # the saved meter is the global one: rank 0 carries it, the others add what is new
        decorrelate_rng(self.seed, self.distributed, state.global_step, self.augment_generator)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, state: TrainState, meter: EpochMeter) -> bool:
        """Forward and backward one micro-batch; every `accumulate_steps` of them (or at the epoch's
        end) clip, step the optimiser with this step's learning rate, and project max-norm.
        Returns whether the optimiser stepped."""
        pixels, targets = self.augment(x.float().div_(255.0), y, self.augment_generator)
        inputs = self.data.preprocessor.normalize(pixels)
        with torch.autocast(inputs.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = self.forward(inputs)
        loss = self.criterion(logits.float(), targets)  # targets: labels, or soft targets from mixup/cutmix
        penalty = self.penalty(self.weights)
        objective = loss if penalty is None else loss + penalty
        if (coupling := coupling_penalty(self.model)) is not None:  # soft parameter sharing
            objective = objective + coupling
        group_start = state.step_in_epoch - state.step_in_epoch % self.accumulate_steps
        group_size = min(self.accumulate_steps, len(self.data.train) - group_start)  # the epoch's last is short
        scaled = objective * self.shard_weight(len(y), state) / group_size  # shard_weight: DDP's uneven shards
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
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
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clipping, monitors and max-norm see true gradients
        sampled = self.monitor is not None and self.monitor.sampling(state.global_step)
        if self.monitor is not None:
            self.record_step(y, state)
            if sampled:
                self.monitor.before_update()
        clip_gradients(self.parameters, self.regularize)
        if self.scaler is None:
            self.optimizer.step()
        else:  # skips the step when the fp16 gradients overflowed, and adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.regularize.max_norm is not None:
            project_max_norm(self.weights, self.regularize.max_norm)
        if sampled:
            self.monitor.after_update(state.global_step + 1, state.epoch + 1)
        state.global_step += 1
        return True

    def shard_weight(self, local: int, state: TrainState) -> float:
        """DDP: this rank's mean loss counts local·W/N of the global batch's N images (1 for one process)."""
        if not self.distributed.active:
            return 1.0
        lo, hi = self.data.train.bounds(state.step_in_epoch)
        return shard_weight(local, hi - lo, self.distributed)

    def stepping(self, state: TrainState) -> bool:
        """Whether the next micro-batch ends an optimiser step (its gradients are then averaged by DDP)."""
        step = state.step_in_epoch + 1
        return step % self.accumulate_steps == 0 or step >= len(self.data.train)

    def stop_signal(self, stops: list[int], state: TrainState) -> int:
        """The stop request to honour now (0: none). Several ranks agree on it every STOP_CHECK_EVERY
        steps (a reduction), so all of them stop at the same step and none waits for the others."""
        if not self.distributed.active:
            return stops[0] if stops else 0
        if state.global_step % STOP_CHECK_EVERY:
            return 0
        return self.distributed.max_int(stops[0] if stops else 0)

    def record_step(self, labels: torch.Tensor, state: TrainState) -> None:
        """Per-step series for the monitor (on the device); a non-finite gradient counts as divergence."""
        assert self.monitor is not None and self.step_loss is not None
        grads = [p.grad for p in self.parameters if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else self.step_loss * 0
        if self.scaler is None:  # with fp16 loss scaling an overflow is routine: the scaler skips that step
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
        self.distributed.barrier()  # every rank has read `last` before rank 0 writes it again
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
        # a device sync (and, with several ranks, a reduction): called every CHECK_EVERY steps and per epoch
        step, lr = self.distributed.first_bad(self.first_bad_step, self.first_bad_lr)
        if step >= 0:
            raise TrainingDiverged(step, state.epoch + 1, lr, self.recipe_lr, self.run.path)

    def run_epoch(self, state: TrainState, meter: EpochMeter, progress: TrainProgress, stops: list[int]) -> None:
        """Train one epoch (from `state.step_in_epoch`, when resumed mid-epoch), checking for stop requests
        between optimiser steps (never with gradients half accumulated)."""
        self.model.train()
        for callback in self.callbacks:
            callback.on_epoch_start(state, {})
        started = time.perf_counter()
        seconds_before = meter.seconds
        for x, y in self.data.train.batches(state.epoch, start_step=state.step_in_epoch):
            with self.distributed.gradient_sync(self.trained, self.stepping(state)):
                stepped = self.train_step(x, y, state, meter)
            if not stepped:
                continue  # gradients half accumulated: no callbacks, no stop
            for callback in self.callbacks:
                callback.on_step_end(state, {})
            elapsed = seconds_before + time.perf_counter() - started
            progress.step(
                global_step=state.global_step, epoch=state.epoch + 1, lr=self.current_lr(), meter=meter, elapsed=elapsed
            )
            if state.global_step % CHECK_EVERY == 0:
                self.raise_if_diverged(state)
            if signum := self.stop_signal(stops, state):
                meter.seconds = elapsed
                self.distributed.fold_meter(meter)
                self.flush_monitor()
                self.save_last(state, meter)
                raise TrainingInterrupted(signum, self.run.path, state)
        self.distributed.fold_meter(meter)  # several ranks: the epoch's totals on rank 0
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

    def validates(self, state: TrainState) -> bool:
        """Whether the epoch now ending is scored on validation: every `val_every`-th epoch, the last
        one, and one the run is about to stop after (a callback or signal asked during it)."""
        epoch = state.epoch + 1
        return epoch % self.val_every == 0 or epoch >= self.epochs or state.stop_reason is not None

    def end_epoch(self, state: TrainState, meter: EpochMeter, stopper: EarlyStopping) -> dict[str, Any]:
        """Evaluate (on validation epochs), log, let callbacks decide, write `best` and `last`.
        An epoch without validation has a train record only: callbacks' `on_eval_end` is not called
        (early stopping counts validations) and it cannot become `best`."""
        epoch = state.epoch + 1
        train_record = {
            "epoch": epoch, "split": "train", "step": state.global_step, "loss": meter.loss(),
            "accuracy": meter.accuracy(), "lr": self.current_lr(), "images": meter.seen,
            "seconds": meter.seconds, "images_per_second": meter.seen / max(meter.seconds, 1e-9),
        }  # fmt: skip
        if isinstance(meter, TaskMeter):
            train_record["tasks"] = meter.task_metrics()
        logs: dict[str, Any] = {"train_loss": train_record["loss"], "train_accuracy": train_record["accuracy"]}
        records, confusion = [train_record], None
        validated = self.distributed.broadcast(self.validates(state))  # ranks agree (a stop may be rank 0's)
        if validated:
            val, confusion = self.validate_epoch()
            records.append({"epoch": epoch, "split": "val", "step": state.global_step, **val})
            logs.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            logs = self.distributed.broadcast(logs)  # rank 0 validates: every rank's callbacks decide on its numbers
            for callback in self.callbacks:
                callback.on_eval_end(state, logs)
            if self.eval_probe is not None and self.probes(state):
                self.probe_training(train_record)
        if self.tensorboard is not None:
            self.tensorboard.write_epoch(epoch, logs)
        for record in records:
            self.run.append_metrics(record)
        self.run.write_metrics_csv()
        if validated and stopper.improved:
            state.best_epoch = epoch
        if validated and stopper.improved and self.distributed.is_main:
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

    def validate_epoch(self) -> tuple[dict[str, Any], list[list[int]] | None]:
        """The validation scores and the confusion matrix."""
        # the confusion matrix is C×C: skipped for very many classes (it would dwarf the model)
        wanted = self.monitor is not None and self.data.num_classes <= MAX_CONFUSION_CLASSES
        if not self.distributed.is_main:  # several ranks: rank 0 validates, end_epoch broadcasts its numbers
            return {"loss": 0.0, "accuracy": 0.0}, None
        val = self.evaluate(self.data.val, confusion=wanted)
        confusion = val.pop("confusion", None)
        val.pop("label_counts", None)
        return val, confusion

    def probes(self, state: TrainState) -> bool:
        """Whether this validation epoch also scores the training probe: every PROBE_EVERY-th validation,
        and the epoch the run ends on (the diagnosis compares the last fit with validation)."""
        epoch = state.epoch + 1
        nth = epoch // self.val_every
        return nth % PROBE_EVERY == 0 or epoch >= self.epochs or state.stop_reason is not None

    def probe_training(self, train_record: dict[str, Any]) -> None:
        """Training accuracy as validation is measured (eval mode, no augmentation) on the fixed probe subset."""
        assert self.eval_probe is not None
        probe = self.evaluate(self.eval_probe)
        probe.pop("tasks", None)
        train_record.update(eval_loss=probe["loss"], eval_accuracy=probe["accuracy"],
                            eval_images=self.eval_probe.num_images)  # fmt: skip
