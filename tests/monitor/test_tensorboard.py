"""TensorBoard scalars (optional extra): written when asked for, a clear error when not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragontrainer import RecipeError, train
from dragontrainer.monitor import tensorboard
from tests.conftest import TINY


def test_scalars_are_readable_by_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(overrides=[*TINY, "monitor.tensorboard=on", "monitor.every=4", f"run.dir={tmp_path}"])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/val", "step/loss", "step/lr", "step/grad_norm"} <= tags
    assert [e.step for e in events.Scalars("accuracy/val")] == [1, 2, 3]
    assert any(tag.startswith("update_ratio/") for tag in tags)


def test_on_without_the_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorboard, "tensorboard_available", lambda: False)
    with pytest.raises(RecipeError, match=r"monitor.tensorboard: 'on' needs the tensorboard package"):
        train(overrides=[*TINY, "monitor.tensorboard=on", f"run.dir={tmp_path / 'on'}"])
    assert not (tmp_path / "on").exists()  # nothing half-made is left behind
    train(overrides=[*TINY, f"run.dir={tmp_path / 'auto'}"])  # auto: silently without
    assert not (tmp_path / "auto" / "tensorboard").exists()
