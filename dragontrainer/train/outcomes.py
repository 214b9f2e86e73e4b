"""How a run ends: its result, or the two ways it stops early (interrupted, diverged), and the
signal handling that turns Ctrl-C/SIGTERM into a clean stop between steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dragontrainer.train.state import TrainState


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
