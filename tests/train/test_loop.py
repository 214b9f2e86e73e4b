from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dragontrainer import Recipe, resume, train
from dragontrainer.train.callbacks import Callback
from dragontrainer.train.outcomes import TrainingInterrupted
from dragontrainer.train.state import TrainState
from tests.conftest import TINY


def weights(run_dir: Path, tag: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / tag / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_default_recipe_reaches_98_5_percent_on_digits(tmp_path: Path) -> None:
    """The real default recipe (VGG, SGD+Nesterov, warm-up + cosine, flips/crops) on the embedded digits."""
    result = train(Recipe.load(overrides=[f"run.dir={tmp_path / 'run'}"]))
    assert result.val_accuracy >= 0.985, result.summary()
    assert result.epochs == 30 and result.images_per_second > 0
    # the babysitter stays silent on the healthy default run: no warning, no error
    assert [f for f in result.findings if f["severity"] != "info"] == [], result.findings
    assert (result.run_dir / "report.html").exists()


def test_run_folder_contents_and_metrics(tiny: list[str]) -> None:
    result = train(Recipe.load(overrides=tiny))
    run = result.run_dir
    for name in (
        "recipe.yaml",
        "provenance.json",
        "data.json",
        "preprocess.safetensors",
        "metrics.jsonl",
        "result.json",
    ):
        assert (run / name).is_file(), name
    for tag in ("last", "best"):
        assert (run / "checkpoints" / tag / "model.safetensors").is_file()
        assert (run / "checkpoints" / tag / "state.json").is_file()
    assert (run / "checkpoints" / "last" / "optimizer.safetensors").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in lines] == [(e, s) for e in (1, 2, 3) for s in ("train", "val")]
    assert result.history == lines
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    assert state["train"]["epoch"] == 3 and {"python", "numpy", "torch", "augment"} <= state["rng"].keys()
    assert Recipe.load(run / "recipe.yaml").run.dir == run


def test_same_seed_same_weights_and_metrics(tmp_path: Path) -> None:
    a = train(Recipe.load(overrides=[*TINY, f"run.dir={tmp_path / 'a'}"]))
    b = train(Recipe.load(overrides=[*TINY, f"run.dir={tmp_path / 'b'}"]))
    assert_same_weights(weights(a.run_dir), weights(b.run_dir))
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in h]
    assert strip(a.history) == strip(b.history)
    c = train(Recipe.load(overrides=[*TINY, "seed=1", f"run.dir={tmp_path / 'c'}"]))
    first = next(k for k in weights(a.run_dir) if k.endswith("weight"))
    assert not torch.equal(weights(a.run_dir)[first], weights(c.run_dir)[first])


class InterruptAt(Callback):
    """Sends this process SIGINT after a given global step, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: TrainState, logs: dict) -> None:
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


@pytest.mark.parametrize("stop_step", [5, 14])
def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path: Path, stop_step: int) -> None:
    # default VGG with batch norm, dropout, flips and crops: every RNG and running statistic matters
    overrides = ["model.widths=[8,16]", "model.dropout=0.3", "augment.hflip.p=0.5", "train.epochs=3",
                 "train.batch_size=256", "schedule.warmup_epochs=1"]  # fmt: skip
    full = train(Recipe.load(overrides=[*overrides, f"run.dir={tmp_path / 'full'}"]))
    recipe = Recipe.load(overrides=[*overrides, f"run.dir={tmp_path / 'cut'}"])
    with pytest.raises(TrainingInterrupted, match="dragon resume"):
        train(recipe, callbacks=[InterruptAt(stop_step)])
    lines = (
        (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if (tmp_path / "cut" / "metrics.jsonl").exists()
        else []
    )
    assert all(json.loads(line) for line in lines)
    resumed = resume(tmp_path / "cut")
    assert_same_weights(weights(full.run_dir), weights(resumed.run_dir))
    assert_same_weights(weights(full.run_dir, "best"), weights(resumed.run_dir, "best"))
    assert [(r["epoch"], r["split"], r["loss"]) for r in resumed.history] == [
        (r["epoch"], r["split"], r["loss"]) for r in full.history
    ]


def test_early_stopping_stops_and_says_why(tmp_path: Path) -> None:
    result = train(Recipe.load(overrides=[*TINY, "train.epochs=30", "optim.lr=1e-9", "model.norm=none",
                                          "train.early_stopping.patience=2", "train.early_stopping.min_delta=0.01",
                                          f"run.dir={tmp_path / 'r'}"]))  # fmt: skip
    assert result.epochs == 3 and result.best_epoch == 1
    assert "early stopping" in (result.stop_reason or "")


def test_test_split_is_scored_with_best_weights(tmp_path: Path) -> None:
    result = train(Recipe.load(overrides=[*TINY, "data.test_fraction=0.2", f"run.dir={tmp_path / 'r'}"]))
    assert result.test_accuracy is not None and result.test_accuracy > 0.5


def test_plateau_schedule_lowers_the_learning_rate_in_a_real_run(tmp_path: Path) -> None:
    overrides = [*TINY, "train.epochs=4", "model.norm=none", "optim.lr=1e-9", "optim.lr_scaling=none",
                 "schedule.name=plateau", "schedule.plateau_patience=1", "schedule.plateau_min_delta=0.01",
                 "train.early_stopping.patience=null",
                 f"run.dir={tmp_path / 'r'}"]  # fmt: skip
    result = train(Recipe.load(overrides=overrides))
    lrs = [r["lr"] for r in result.history if r["split"] == "train"]
    # epoch 1 sets the best; each later epoch fails to improve and halves the lr for the next epoch
    assert lrs == pytest.approx([1e-9, 1e-9, 0.5e-9, 0.25e-9], rel=1e-6, abs=0)


def test_balanced_class_weights_follow_the_training_counts() -> None:
    from dragontrainer.train.setup import class_weights

    weights = class_weights("balanced", torch.tensor([0, 0, 0, 1]), 3)
    torch.testing.assert_close(weights, torch.tensor([4 / 9, 4 / 3, 0.0]))
    assert class_weights("none", torch.tensor([0]), 2) is None
    from dragontrainer.errors import RecipeError

    with pytest.raises(RecipeError, match="2 weights for 3 classes"):
        class_weights([1.0, 2.0], torch.tensor([0]), 3)


def test_divergence_stops_at_once_naming_the_step_and_learning_rate(tmp_path: Path) -> None:
    from dragontrainer.train.outcomes import TrainingDiverged

    overrides = ["model.name=mlp", "model.norm=none", "optim.lr=100", "train.epochs=3", "schedule.warmup_epochs=0",
                 f"run.dir={tmp_path / 'r'}"]  # fmt: skip
    with pytest.raises(
        TrainingDiverged, match=r"NaN/Inf at step \d+ \(epoch 1\) with learning rate .*optim.lr=10"
    ) as e:
        train(Recipe.load(overrides=overrides))
    assert e.value.epoch == 1 and "no checkpoint was written" in str(e.value)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_failing_checkpoint_write_is_a_clear_error_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from dragontrainer.errors import RunError
    from dragontrainer.train import checkpoint

    real_save = checkpoint.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # epoch 1: last model, last optimizer, best model; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    run_dir = tmp_path / "r"
    with pytest.raises(RunError, match="cannot write the checkpoint \\(No space left on device\\); the previous"):
        train(Recipe.load(overrides=[*TINY, f"run.dir={run_dir}"]))
    state = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())
    assert state["train"]["epoch"] == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "last"]  # no temporary folders
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert resume(run_dir).epochs == 3
