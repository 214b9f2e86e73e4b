"""TensorBoard scalars beside stats.jsonl, so users keep their usual dashboard (optional extra:
`pip install dragontrainer[tensorboard]`). The files in the run folder stay the source of truth."""

from __future__ import annotations

from typing import Any

from dragontrainer.monitor.optional import sink_wanted
from dragontrainer.recipe import MonitorSpec
from dragontrainer.run import RunDir


class TensorBoardSink:
    """Writes the monitor's lines and the epoch metrics as scalars under `<run>/tensorboard`."""

    def __init__(self, run: RunDir) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.path / "tensorboard"))

    def write_stats(self, lines: list[dict[str, Any]]) -> None:
        for line in lines:
            step = line["step"]
            if line["kind"] == "step":
                for key in ("loss", "lr", "grad_norm"):
                    self.scalar(f"step/{key}", line[key], step)
            elif line["kind"] == "layers":
                for name, entry in line["params"].items():
                    self.scalar(f"update_ratio/{name}", entry["update_ratio"], step)
                for name, entry in line["activations"].items():
                    self.scalar(f"dead_fraction/{name}", entry["dead"], step)
                    self.scalar(f"activation_std/{name}", entry["std"], step)
        self.writer.flush()

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is not None:  # a non-finite measurement is null in stats.jsonl
            self.writer.add_scalar(tag, value, step)

    def write_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            split, _, metric = key.partition("_")
            self.writer.add_scalar(f"{metric}/{split}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def create_tensorboard(spec: MonitorSpec, run: RunDir) -> TensorBoardSink | None:
    """`auto`: when the tensorboard package is installed; `on`: required; `off`: never."""
    if not sink_wanted("monitor.tensorboard", spec.tensorboard, tensorboard_available, "tensorboard"):
        return None
    return TensorBoardSink(run)
