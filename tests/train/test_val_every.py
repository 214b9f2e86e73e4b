"""train.val_every: validation only every N epochs and after the last; early stopping counts
validations; `best` is only ever a validated epoch; resume mid-way replays the same records."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from dragontrainer import Recipe, resume, train
from dragontrainer.train.callbacks import Callback
from dragontrainer.train.outcomes import TrainingInterrupted
from dragontrainer.train.state import TrainState
from tests.conftest import TINY
from tests.train.test_loop import InterruptAt


def splits(history: list[dict]) -> list[tuple[int, str]]:
    return [(r["epoch"], r["split"]) for r in history]


def test_validation_runs_every_n_epochs_and_after_the_last(tmp_path: Path) -> None:
    result = train(Recipe.load(overrides=[*TINY, "train.epochs=5", "train.val_every=2",
                                          f"run.dir={tmp_path / 'r'}"]))  # fmt: skip
    assert splits(result.history) == [(1, "train"), (2, "train"), (2, "val"), (3, "train"), (4, "train"),
                                      (4, "val"), (5, "train"), (5, "val")]  # fmt: skip
    assert result.best_epoch in (2, 4, 5) and result.epochs == 5
    assert result.val_accuracy == result.history[-1]["accuracy"]
    # the eval-mode training probe (diagnosis) is measured with validation, like compared with like: at every
    # 2nd validation (the 2nd is epoch 4) and at the last epoch
    assert [r["epoch"] for r in result.history if r.get("eval_accuracy") is not None] == [4, 5]
    csv_rows = (result.run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 5  # one row per epoch; epochs 1 and 3 have empty val_ columns
    assert (result.run_dir / "report.html").exists() and result.findings is not None


def test_early_stopping_counts_validations_not_epochs(tmp_path: Path) -> None:
    result = train(Recipe.load(overrides=[*TINY, "train.epochs=30", "optim.lr=1e-9", "model.norm=none",
                                          "train.val_every=3", "train.early_stopping.patience=2",
                                          "train.early_stopping.min_delta=0.01",
                                          f"run.dir={tmp_path / 'r'}"]))  # fmt: skip
    # validations at epochs 3 (best), 6 and 9 (no improvement: patience 2 spent)
    assert result.epochs == 9 and result.best_epoch == 3
    assert [r["epoch"] for r in result.history if r["split"] == "val"] == [3, 6, 9]
    best_state = (result.run_dir / "checkpoints" / "best" / "state.json").read_text()
    assert '"epoch": 3' in best_state


def test_resume_mid_way_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    overrides = [*TINY, "train.epochs=4", "train.val_every=3", "train.batch_size=128"]  # 12 steps per epoch
    full = train(Recipe.load(overrides=[*overrides, f"run.dir={tmp_path / 'full'}"]))
    cut = Recipe.load(overrides=[*overrides, f"run.dir={tmp_path / 'cut'}"])
    with pytest.raises(TrainingInterrupted):
        train(cut, callbacks=[InterruptAt(3 * 12 + 5)])  # inside epoch 4, after epoch 3's validation
    resumed = resume(tmp_path / "cut")
    assert splits(resumed.history) == splits(full.history) == [(1, "train"), (2, "train"), (3, "train"),
                                                                 (3, "val"), (4, "train"), (4, "val")]  # fmt: skip
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    for tag in ("last", "best"):  # `best` is epoch 3's or 4's on both sides
        a, b = (
            load_file(str(run / "checkpoints" / tag / "model.safetensors")) for run in (full.run_dir, resumed.run_dir)
        )
        assert all(a[k].equal(b[k]) for k in a), tag


class StopAfterFirstEpoch(Callback):
    def on_epoch_end(self, state: TrainState, logs: dict) -> None:
        state.request_stop("stopped by a test callback")


def test_a_stop_after_an_epoch_without_validation_still_has_a_result(tmp_path: Path) -> None:
    recipe = Recipe.load(overrides=[*TINY, "train.val_every=3", "monitor.report=false", f"run.dir={tmp_path / 'r'}"])
    result = train(recipe, callbacks=[StopAfterFirstEpoch()])
    assert splits(result.history) == [(1, "train")]  # nothing validated was recorded...
    assert result.epochs == 1 and 0 <= result.val_accuracy <= 1  # ...but finish scores the weights it has
    assert "stopped by a test callback" in (result.stop_reason or "")
