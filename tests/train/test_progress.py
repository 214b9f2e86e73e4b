"""Progress without a terminal: plain full-width lines (one per epoch, one per interval within an
epoch), no bar frames; images/s smoothed."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from dragontrainer import train
from dragontrainer.train.progress import ThroughputMeter, TrainProgress
from tests.conftest import TINY


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=80), buffer


def test_a_run_without_a_terminal_prints_one_plain_line_per_epoch(tmp_path: Path) -> None:
    console, buffer = plain_console()
    train(overrides=[*TINY, f"run.dir={tmp_path / 'run'}", "monitor.report=false"], progress=True, console=console)
    lines = [line for line in buffer.getvalue().splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    for line in lines:
        assert "img/s" in line and "val loss" in line and len(line) > 80  # full width: not wrapped at 80
    assert not any(char in buffer.getvalue() for char in "━\r")  # no bar, no carriage returns


class FakeMeter:
    seen = 0

    def loss(self) -> float:
        return 0.5

    def accuracy(self) -> float:
        return 0.75


def test_long_epochs_print_a_line_every_interval() -> None:
    console, buffer = plain_console()
    now = [0.0]
    progress = TrainProgress(
        enabled=True, epochs=2, steps_per_epoch=100, console=console, plain_every=60.0, clock=lambda: now[0]
    )
    meter = FakeMeter()
    with progress:
        for step in range(1, 101):
            now[0] += 2.0  # 2 s per step: a line at 60 s, 120 s, 180 s
            meter.seen = step * 32
            progress.step(global_step=step, epoch=1, lr=0.1, meter=meter, elapsed=now[0])
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("epoch 1/2  step 30/100  train loss 0.5000 acc 75.00%")
    assert lines[0].endswith("16 img/s")  # 32 images per 2 s


def test_throughput_is_smoothed() -> None:
    now = [0.0]
    meter = ThroughputMeter(clock=lambda: now[0])
    meter.update(0)
    rates = []
    for i in range(1, 41):
        now[0] += 0.05 if i == 20 else 0.25  # one refresh comes early: an instant rate of 2000/s
        rates.append(meter.update(i * 100))
    assert abs(rates[18] - 400) < 1  # steady 100 images / 0.25 s
    assert abs(rates[19] - 400) < 40  # the jittery refresh moves it only a little
    now[0] += 0.25
    rates_after_new_epoch = meter.update(50)  # the epoch's count restarts: not a negative rate
    assert rates_after_new_epoch > 0
