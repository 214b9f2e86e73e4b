"""Extra weights a run keeps for ensembles, as callbacks: snapshots and weight averages.

- `train.snapshots=cycles|every_k`: the weights at the end of each cosine-with-restarts / cyclic cycle
  (Huang et al. 2017, Snapshot Ensembles) or every k epochs, as `checkpoints/snapshots/epoch-NNNN.safetensors`.
- `train.weight_average=swa|ema`: an averaged copy of the weights (torch.optim.swa_utils) written to
  `checkpoints/swa/` or `checkpoints/ema/` at the end, SWA with the batch-norm statistics recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from dragontrainer.optim.schedules import warmup_epochs
from dragontrainer.recipe import Recipe, ScheduleSpec
from dragontrainer.run import atomic_write_bytes
from dragontrainer.train.callbacks import Callback, Logs
from dragontrainer.train.checkpoint import save_checkpoint
from dragontrainer.train.state import TrainState

SNAPSHOT_FOLDER = "snapshots"


def cycle_end_steps(spec: ScheduleSpec, steps_per_epoch: int, total_steps: int) -> list[int]:
    """Optimiser steps at which a cosine_restarts / cyclic cycle ends (the lr at its low), with the
    rounding `optim/schedules.py` uses, after the warm-up."""
    warmup = round(warmup_epochs(spec, total_steps / steps_per_epoch) * steps_per_epoch)
    ends = []
    if spec.name == "cosine_restarts":
        period, end = max(1, round(spec.restart_epochs * steps_per_epoch)), warmup
        while end + period <= total_steps:
            end += period
            ends.append(end)
            period = max(1, round(period * spec.restart_mult))
    elif spec.name == "cyclic":
        length = 2 * max(1, round(spec.cycle_epochs * steps_per_epoch / 2))
        ends = list(range(warmup + length, total_steps + 1, length))
    return ends


class SnapshotSaver(Callback):
    """Writes the model's weights at the end of chosen epochs (the file name carries the epoch)."""

    def __init__(
        self, model: nn.Module, folder: Path, *, every: int | None, cycle_ends: list[int], steps_per_epoch: int
    ) -> None:
        self.model, self.folder, self.every, self.cycle_ends = model, folder, every, cycle_ends
        self.steps_per_epoch = steps_per_epoch

    def wanted(self, epoch: int) -> bool:
        """Every k-th epoch, or an epoch in which a cycle ended."""
        if self.every is not None:
            return epoch % self.every == 0
        end = epoch * self.steps_per_epoch
        return any(end - self.steps_per_epoch < s <= end for s in self.cycle_ends)

    def on_epoch_end(self, state: TrainState, logs: Logs) -> None:
        epoch = state.epoch + 1  # the loop counts the epoch as done after its callbacks
        if not self.wanted(epoch):
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        metadata = {"epoch": str(epoch), "step": str(state.global_step),
                    "val_loss": str(logs.get("val_loss")), "val_accuracy": str(logs.get("val_accuracy"))}  # fmt: skip
        atomic_write_bytes(self.folder / f"epoch-{epoch:04d}.safetensors", save(tensors, metadata))


class WeightAverager(Callback):
    """SWA: the equal average of the weights at the end of every epoch after `train.swa_start`; EMA: an
    exponential moving average after every optimiser step. The running average is saved beside each
    `last` checkpoint (so resume continues it) and written as a checkpoint at the end of the fit."""

    def __init__(self, kind: str, model: nn.Module, recipe: Recipe, checkpoints: Path, data: Any) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.kind, self.model, self.checkpoints, self.data = kind, model, checkpoints, data
        self.start_epoch = int(recipe.train.swa_start * recipe.train.epochs)  # swa averages epochs after this
        if kind == "ema":
            self.average = AveragedModel(model, multi_avg_fn=ema_update(recipe.train.ema_decay), use_buffers=True)
        else:
            self.average = AveragedModel(model)

    @property
    def running_file(self) -> Path:
        return self.checkpoints / f"{self.kind}-running.safetensors"

    def on_step_end(self, state: TrainState, logs: Logs) -> None:
        if self.kind == "ema":
            self.average.update_parameters(self.model)

    def on_epoch_end(self, state: TrainState, logs: Logs) -> None:
        if self.kind == "swa" and state.epoch + 1 > self.start_epoch:
            self.average.update_parameters(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Called as `last` is written: the running average goes beside it."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.average.state_dict().items()}
        atomic_write_bytes(self.running_file, save(tensors))
        return {"averaged": int(self.average.n_averaged)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.running_file.is_file():
            device = next(self.model.parameters()).device
            self.average.load_state_dict({k: v.to(device) for k, v in load_file(self.running_file).items()})

    def on_fit_end(self, state: TrainState, logs: Logs) -> None:
        if int(self.average.n_averaged) == 0:
            return  # stopped before averaging began (early stopping before train.swa_start)
        module = self.average.module
        if self.kind == "swa":
            from torch.optim.swa_utils import update_bn

            with torch.no_grad():  # batch-norm statistics of the averaged weights, over the training split
                update_bn((self.data.preprocessor.apply(x) for x, _ in self.data.train.batches(epoch=0)), module)
        module.eval()
        record = {"kind": self.kind, "averaged": int(self.average.n_averaged), "epoch": state.epoch}
        save_checkpoint(self.checkpoints / self.kind, module, None, record)
        self.running_file.unlink(missing_ok=True)


def ema_update(decay: float) -> Any:
    """EMA with the decay warmed up as min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's
    `num_updates`): a short run is not dominated by its initial weights."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        d = min(decay, (1 + int(updates)) / (10 + int(updates)))
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - d)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():
                a.copy_(c)  # counters (batch norm's num_batches_tracked) follow the model

    return update


def ensemble_callbacks(recipe: Recipe, model: nn.Module, checkpoints: Path, data: Any, steps_per_epoch: int) -> list:
    """The snapshot and weight-average callbacks the recipe asks for (none by default)."""
    callbacks: list[Callback] = []
    train = recipe.train
    if train.snapshots != "none":
        ends = cycle_end_steps(recipe.schedule, steps_per_epoch, steps_per_epoch * train.epochs)
        every = train.snapshot_every if train.snapshots == "every_k" else None
        callbacks.append(SnapshotSaver(model, checkpoints / SNAPSHOT_FOLDER, every=every, cycle_ends=ends,
                                       steps_per_epoch=steps_per_epoch))  # fmt: skip
    if train.weight_average != "none":
        callbacks.append(WeightAverager(train.weight_average, model, recipe, checkpoints, data))
    return callbacks


def snapshot_files(run_dir: Path) -> list[Path]:
    """A run's snapshots in epoch order."""
    return sorted((Path(run_dir) / "checkpoints" / SNAPSHOT_FOLDER).glob("epoch-*.safetensors"))


def snapshot_epoch(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int((handle.metadata() or {}).get("epoch", 0))
