"""Callbacks observe the loop at six events, in this order; they never own the loop.

on_fit_start -> [on_epoch_start -> on_step_end* -> on_eval_end -> on_epoch_end]* -> on_fit_end

Validation metrics exist before `on_eval_end`, so a monitor never races its metric. A callback stops
the run with `state.request_stop(reason)`.
"""

from __future__ import annotations

import math
from typing import Any

from dragontrainer.recipe import EarlyStoppingSpec, ScheduleSpec
from dragontrainer.train.state import TrainState

Logs = dict[str, Any]


class Callback:
    """No-op events; override the ones you need. `state_dict` is saved in every checkpoint."""

    def on_fit_start(self, state: TrainState, logs: Logs) -> None: ...
    def on_epoch_start(self, state: TrainState, logs: Logs) -> None: ...
    def on_step_end(self, state: TrainState, logs: Logs) -> None: ...
    def on_eval_end(self, state: TrainState, logs: Logs) -> None: ...
    def on_epoch_end(self, state: TrainState, logs: Logs) -> None: ...
    def on_fit_end(self, state: TrainState, logs: Logs) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class EarlyStopping(Callback):
    """Tracks the best value of a validation metric; stops after `patience` epochs without improvement.

    It is also what decides which epoch is `best` (and so which checkpoint `best` holds).
    """

    def __init__(self, spec: EarlyStoppingSpec) -> None:
        self.monitor = spec.monitor
        self.patience = spec.patience
        self.min_delta = spec.min_delta
        self.mode = "max" if spec.monitor.endswith("accuracy") else "min"
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.improved = False

    def is_improvement(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_eval_end(self, state: TrainState, logs: Logs) -> None:
        if self.monitor not in logs:
            raise KeyError(f"early stopping monitors {self.monitor!r}, available: {', '.join(sorted(logs))}")
        value = float(logs[self.monitor])
        self.improved = self.is_improvement(value)
        if self.improved:
            self.best, self.best_epoch, self.bad_epochs = value, state.epoch + 1, 0
            return
        self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience:
            state.request_stop(
                f"early stopping: {self.monitor} has not improved on {self.best:.4f} "
                f"(epoch {self.best_epoch}) for {self.bad_epochs} epochs"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


class ReduceOnPlateau(Callback):
    """Multiply the learning rate by `plateau_factor` when val_loss has not improved for
    `plateau_patience` epochs — the reference texts' "divide by 2 or 5 when validation stops improving"."""

    def __init__(self, spec: ScheduleSpec) -> None:
        self.factor = spec.plateau_factor
        self.patience = spec.plateau_patience
        self.min_delta = spec.plateau_min_delta
        self.min_scale = spec.plateau_min_fraction
        self.best: float | None = None
        self.bad_epochs = 0
        self.reductions: list[int] = []  # epochs after which the learning rate was reduced

    def on_eval_end(self, state: TrainState, logs: Logs) -> None:
        value = float(logs["val_loss"])
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience and state.lr_scale > self.min_scale:
            state.lr_scale = max(state.lr_scale * self.factor, self.min_scale)
            self.bad_epochs = 0
            self.reductions.append(state.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_epochs, self.reductions = state["best"], state["bad_epochs"], list(state["reductions"])
