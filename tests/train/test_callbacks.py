from __future__ import annotations

import pytest

from dragontrainer.recipe import EarlyStoppingSpec
from dragontrainer.train.callbacks import EarlyStopping
from dragontrainer.train.state import TrainState


def drive(stopper: EarlyStopping, values: list[float], key: str = "val_loss") -> TrainState:
    state = TrainState()
    for value in values:
        stopper.on_eval_end(state, {key: value})
        state.epoch += 1
        if state.stop_reason:
            break
    return state


@pytest.mark.parametrize(
    ("monitor", "values", "epochs_run", "best_epoch", "stops"),
    [
        ("val_loss", [1.0, 0.9, 0.95, 0.91, 0.92, 0.5], 5, 2, True),
        ("val_loss", [1.0, 0.9, 0.8, 0.7], 4, 4, False),
        ("val_accuracy", [0.5, 0.7, 0.6, 0.69, 0.65, 0.9], 5, 2, True),
    ],
)
def test_early_stopping_on_scripted_sequences(
    monitor: str, values: list[float], epochs_run: int, best_epoch: int, stops: bool
) -> None:
    stopper = EarlyStopping(EarlyStoppingSpec(monitor=monitor, patience=3))
    state = drive(stopper, values, monitor)
    assert state.epoch == epochs_run and stopper.best_epoch == best_epoch
    assert (state.stop_reason is not None) == stops


def test_min_delta_and_state_round_trip() -> None:
    stopper = EarlyStopping(EarlyStoppingSpec(patience=2, min_delta=0.1))
    state = drive(stopper, [1.0, 0.95, 0.93])
    assert state.stop_reason and "has not improved on 1.0000" in state.stop_reason
    copy = EarlyStopping(EarlyStoppingSpec(patience=2, min_delta=0.1))
    copy.load_state_dict(stopper.state_dict())
    assert copy.state_dict() == stopper.state_dict()


def test_missing_metric_is_an_error_naming_the_available_ones() -> None:
    with pytest.raises(KeyError, match="available: val_acc"):
        EarlyStopping(EarlyStoppingSpec()).on_eval_end(TrainState(), {"val_acc": 1.0})


def test_reduce_on_plateau_divides_after_patience_and_respects_the_floor() -> None:
    from dragontrainer.recipe import ScheduleSpec
    from dragontrainer.train.callbacks import ReduceOnPlateau

    plateau = ReduceOnPlateau(
        ScheduleSpec(name="plateau", plateau_factor=0.5, plateau_patience=2, plateau_min_fraction=0.2)
    )
    state = TrainState()
    for value in [1.0, 0.8, 0.81, 0.82, 0.79, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]:
        plateau.on_eval_end(state, {"val_loss": value})
        state.epoch += 1
    assert plateau.reductions == [4, 7, 9] and state.lr_scale == pytest.approx(0.2)


def test_on_step_end_fires_once_per_optimiser_step_with_accumulation(tmp_path) -> None:
    from dragontrainer import Recipe, train
    from dragontrainer.train.callbacks import Callback

    class Count(Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, state: TrainState, logs: dict) -> None:
            self.steps.append(state.global_step)

    counter = Count()
    # 1,437 training images in batches of 64: 23 micro-batches per epoch, so the last group is short
    overrides = ["model.name=mlp", "model.widths=[16]", "train.epochs=2", "train.batch_size=64",
                 "train.accumulate_steps=2", "schedule.warmup_epochs=0", f"run.dir={tmp_path / 'r'}"]  # fmt: skip
    result = train(Recipe.load(overrides=overrides), callbacks=[counter])
    assert counter.steps == list(range(1, 25)) and result.history[-1]["step"] == 24
