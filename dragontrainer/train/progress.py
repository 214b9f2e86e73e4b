"""The progress bar: epoch, step, loss, accuracy, learning rate and images/s, refreshed a few times a second."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

REFRESH_SECONDS = 0.25


class TrainProgress:
    """A rich progress bar over all training steps; one summary line per epoch. Disabled: silent."""

    def __init__(self, *, enabled: bool, epochs: int, steps_per_epoch: int, console: Console) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self.console = console
        self.last_refresh = 0.0
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:6.2%}"),
            TextColumn("lr {task.fields[lr]:.3g}  {task.fields[ips]:,.0f} img/s"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.bar.add_task(
            "train", total=epochs * steps_per_epoch, epoch=0, epochs=epochs, loss=0.0, acc=0.0, lr=0.0, ips=0.0
        )

    def __enter__(self) -> TrainProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def step(self, *, global_step: int, epoch: int, lr: float, meter: Any, elapsed: float) -> None:
        """Cheap unless a refresh is due: then the meter is read (one device sync)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last_refresh < REFRESH_SECONDS:
            return
        self.last_refresh = now
        ips = meter.seen / elapsed if elapsed > 0 else 0.0
        self.bar.update(
            self.task, completed=global_step, epoch=epoch, lr=lr, loss=meter.loss(), acc=meter.accuracy(), ips=ips
        )

    def epoch_end(self, record: dict[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        self.bar.update(self.task, completed=global_step)
        self.console.print(
            f"epoch {record['epoch']:>3}/{self.epochs}  train loss {record['train_loss']:.3f} "
            f"acc {record['train_accuracy']:.1%}  val loss {record['val_loss']:.3f} "
            f"acc {record['val_accuracy']:.1%}  lr {record['lr']:.2g}",
            highlight=False,
        )
