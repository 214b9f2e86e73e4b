"""Progress: a live bar on a terminal; plain lines (one per epoch, one every few minutes within a long
epoch) when stderr is a file or a pipe, where a bar's frames would be cut, wrapped and stale."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

REFRESH_SECONDS = 0.25
PLAIN_EVERY_SECONDS = 300.0  # without a terminal: a line within an epoch every 5 minutes
SMOOTHING_SECONDS = 5.0  # images/s is an exponential moving average with this time constant


class ThroughputMeter:
    """Images per second, smoothed over ~`SMOOTHING_SECONDS` (not the last refresh's jittery rate)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.rate: float | None = None
        self.last: tuple[float, int] | None = None  # (time, images seen in the epoch)

    def update(self, seen: int) -> float:
        now = self.clock()
        if self.last is not None:
            then, before = self.last
            elapsed = now - then
            added = seen - before if seen >= before else seen  # a new epoch restarts the count
            if elapsed > 0:
                instant = added / elapsed
                weight = 1.0 - math.exp(-elapsed / SMOOTHING_SECONDS)
                self.rate = instant if self.rate is None else self.rate + weight * (instant - self.rate)
        self.last = (now, seen)
        return self.rate or 0.0


class TrainProgress:
    """A rich progress bar over all training steps on a terminal, plain lines otherwise; disabled: silent."""

    def __init__(
        self,
        *,
        enabled: bool,
        epochs: int,
        steps_per_epoch: int,
        console: Console,
        plain_every: float = PLAIN_EVERY_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.enabled = enabled
        self.plain = enabled and not console.is_terminal
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.console = console
        self.plain_every = plain_every
        self.clock = clock
        self.started = clock()
        self.last_refresh = 0.0
        self.last_plain = self.started
        self.throughput = ThroughputMeter(clock)
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:6.2%}"),
            TextColumn("lr {task.fields[lr]:.3g}  {task.fields[ips]:,.0f} img/s"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled or self.plain,
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
        now = self.clock()
        if now - self.last_refresh < REFRESH_SECONDS:
            return
        self.last_refresh = now
        ips = self.throughput.update(meter.seen)
        if self.plain:
            if now - self.last_plain >= self.plain_every:
                self.last_plain = now
                step_in_epoch = global_step - (epoch - 1) * self.steps_per_epoch
                self.line(
                    f"epoch {epoch}/{self.epochs}  step {step_in_epoch}/{self.steps_per_epoch}  "
                    f"train loss {meter.loss():.4f} acc {meter.accuracy():.2%}  lr {lr:.3g}  {ips:,.0f} img/s"
                )
            return
        self.bar.update(
            self.task, completed=global_step, epoch=epoch, lr=lr, loss=meter.loss(), acc=meter.accuracy(), ips=ips
        )

    def epoch_end(self, record: dict[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        self.bar.update(self.task, completed=global_step)
        validation = (  # an epoch without validation (train.val_every) shows the training numbers only
            f"val loss {record['val_loss']:.3f} acc {record['val_accuracy']:.1%}  " if "val_loss" in record else ""
        )
        summary = (
            f"epoch {record['epoch']:>3}/{self.epochs}  train loss {record['train_loss']:.3f} "
            f"acc {record['train_accuracy']:.1%}  {validation}lr {record['lr']:.2g}"
        )
        if self.plain:  # the line a log file keeps: everything the bar would have shown
            self.last_plain = self.clock()
            summary += f"  {record['images_per_second']:,.0f} img/s  {format_elapsed(self.last_plain - self.started)}"
        self.line(summary)

    def line(self, text: str) -> None:
        """One physical line whatever the console width (a log file has no width)."""
        self.console.print(text, highlight=False, soft_wrap=True, markup=False)


def format_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
