"""What the loop knows and callbacks see, plus the RNG snapshot that makes resume exact."""

from __future__ import annotations

import base64
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Counters of the loop; `epoch` counts completed epochs, `step_in_epoch` steps into the next."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    lr: float = 0.0  # the schedule's factor at the last step
    lr_scale: float = 1.0  # reductions by reduce-on-plateau multiply the schedule
    best_epoch: int = 0
    rollbacks: int = 0  # times a non-finite loss sent the run back to `last` (monitor.on_nan=rollback)
    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Callbacks stop the run by flag: the loop finishes the epoch's bookkeeping, then stops."""
        self.stop_reason = reason

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class EpochMeter:
    """Running loss and accuracy of the current training epoch, kept on the device (no sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0
        self.seconds = 0.0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = len(targets)
        self.loss_sum += loss.detach().double() * n
        self.correct += (logits.detach().argmax(1) == targets).sum()
        self.seen += n

    def loss(self) -> float:
        return float(self.loss_sum) / max(self.seen, 1)  # a device sync: call only when displaying

    def accuracy(self) -> float:
        return int(self.correct) / max(self.seen, 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_sum": float(self.loss_sum),
            "correct": int(self.correct),
            "seen": self.seen,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum = torch.tensor(state["loss_sum"], dtype=torch.float64, device=self.device)
        self.correct = torch.tensor(state["correct"], dtype=torch.int64, device=self.device)
        self.seen = state["seen"]
        self.seconds = state["seconds"]


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng(augment_generator: torch.Generator) -> dict[str, Any]:
    """Every random state the loop draws from: Python, NumPy, torch (CPU and CUDA), augmentation."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    snapshot: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": _b64(torch.get_rng_state()),
        "augment": _b64(augment_generator.get_state()),
    }
    if torch.cuda.is_available():
        snapshot["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return snapshot


def restore_rng(snapshot: dict[str, Any], augment_generator: torch.Generator) -> None:
    version, internal, gauss = snapshot["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = snapshot["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(snapshot["torch"]))
    augment_generator.set_state(_unb64(snapshot["augment"]))
    if "cuda" in snapshot and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in snapshot["cuda"]])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
