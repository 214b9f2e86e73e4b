"""The search space: validation before any trial, log scales (checked on sampled values), narrowing, borders."""

from __future__ import annotations

import math

import pytest

from dragontrainer.errors import RecipeError
from dragontrainer.recipe import Recipe
from dragontrainer.study.optuna_backend import Study, create_storage
from dragontrainer.study.space import Param, border_warnings, load_space, narrow, widened

BASE = Recipe()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"optim.lrr": {"low": 0.1, "high": 1}}, "unknown key optim.lrr, did you mean optim.lr?"),
        ({"optim": {"low": 0.1, "high": 1}}, "optim: is a section"),
        ({"optim.lr": {"low": -1, "high": 1}}, "optim.lr: -1.0 is not a valid value"),
        ({"optim.lr": {"low": 1, "high": 0.1}}, "low (1) must be below high (0.1)"),
        ({"optim.lr": {"low": 0.1}}, "a range needs both low and high"),
        ({"optim.lr": {"low": 0.1, "hi": 1}}, "unknown setting 'hi'"),
        ({"model.init": {"choices": ["he", "hee"]}}, "Did you mean 'he'?"),
        ({"model.depth": {"low": 1, "high": 2.5, "int": True}}, "high must be an integer"),
        ({"model.dropout": {"low": 0.0, "high": 0.5, "log": True}}, "a log scale needs low > 0"),
        ({"run.dir": {"choices": ["a", "b"]}}, "cannot be searched"),
        ({}, "the space is empty"),
    ],
)
def test_every_key_and_value_is_checked_before_any_trial(space: dict, message: str) -> None:
    with pytest.raises(
        RecipeError,
        match="space: .*" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.").replace("?", r"\?"),
    ):
        load_space(space, BASE)


def test_log_scale_for_learning_rate_regularisation_and_wide_ranges() -> None:
    space = load_space(
        {
            "optim.lr": {"low": 0.01, "high": 0.05},  # the learning rate: log even when narrow
            "optim.weight_decay": {"low": 1e-5, "high": 1e-3},
            "model.dropout": {"low": 0.0, "high": 0.5},  # linear: 0 cannot be on a log scale
            "optim.momentum": {"low": 0.5, "high": 0.99},  # linear: spans less than a factor of 10
            "train.batch_size": {"low": 16, "high": 512, "int": True},  # a factor of 32: log
            "schedule.warmup_epochs": {"low": 0.1, "high": 5, "log": False},  # asked linear
        },
        BASE,
    )
    assert [p.log for p in space] == [True, True, False, False, True, False]
    assert space[4].integer and isinstance(space[4].low, int)


def test_log_scale_is_what_the_sampler_draws() -> None:
    """Half the values below the geometric middle on a log scale; almost none on a linear one."""
    study = Study(create_storage("sqlite:///:memory:"), "s", "random", "none", seed=0, max_epochs=1)
    space = load_space({"optim.lr": {"low": 1e-4, "high": 1.0}, "regularize.strength": {"low": 1e-4, "high": 1.0,
                                                                                  "log": False}}, BASE)  # fmt: skip
    drawn = [study.ask(space).params for _ in range(150)]
    below = {key: sum(d[key] < 1e-2 for d in drawn) / len(drawn) for key in ("optim.lr", "regularize.strength")}
    assert 0.35 < below["optim.lr"] < 0.65  # log-uniform: P(x < 1e-2) = 1/2
    assert below["regularize.strength"] < 0.08  # uniform: P(x < 1e-2) ≈ 1%
    assert all(1e-4 <= d["optim.lr"] <= 1.0 for d in drawn)


def test_border_warning_names_the_value_and_the_widened_range() -> None:
    lr = Param("optim.lr", 1e-6, 1e-5, log=True, hard_low=0, hard_high=100)
    ranked = [{"optim.lr": 9.6e-6}, {"optim.lr": 8e-6}, {"optim.lr": 3e-6}]
    assert border_warnings([lr], ranked, top_k=5) == [
        "warning: the best optim.lr (9.6e-06) lies at the border of its range [1e-06, 1e-05]: "
        "widen it to [1e-06, 1e-04]"
    ]
    assert border_warnings([lr], [{"optim.lr": 3.2e-6}, {"optim.lr": 5e-6}], top_k=5) == []  # inside: quiet
    low = border_warnings([lr], [{"optim.lr": 1.1e-6}], top_k=5)
    assert low and "widen it to [1e-07, 1e-05]" in low[0]


def test_most_of_the_top_k_at_a_border_warns_too() -> None:
    depth = Param("model.depth", 1, 11, integer=True, hard_low=1, hard_high=64)
    ranked = [{"model.depth": 9}, {"model.depth": 11}, {"model.depth": 11}, {"model.depth": 10}, {"model.depth": 2}]
    (warning,) = border_warnings([depth], ranked, top_k=4)
    assert border_warnings([depth], ranked[:4], top_k=4) == []  # the top 4 of 4 trials: no evidence
    assert border_warnings([depth], [{"model.depth": 5}, *ranked[1:]], top_k=4) == []  # the best lies inside
    assert warning.startswith("warning: 3 of the top 4 model.depth values lie at the border") and "[1, 21]" in warning


def test_no_warning_at_a_hard_limit_or_for_choices() -> None:
    dropout = load_space({"model.dropout": {"low": 0.0, "high": 0.5}}, BASE)[0]
    assert border_warnings([dropout], [{"model.dropout": 0.01}], top_k=5) == []  # 0 is dropout's own limit
    assert border_warnings([dropout], [{"model.dropout": 0.49}], top_k=5)  # 0.5 is not
    init = Param("model.init", choices=["he", "xavier"])
    assert border_warnings([init], [{"model.init": "he"}], top_k=5) == []


def test_widening_stops_before_the_schema_limit() -> None:
    dropout = load_space({"model.dropout": {"low": 0.2, "high": 0.8}}, BASE)[0]
    low, high = widened(dropout, "high")
    assert low == 0.2 and 0.8 < high < 1.0  # dropout < 1


def test_narrowing_closes_in_on_the_top_trials_in_log_space() -> None:
    lr = Param("optim.lr", 1e-4, 1.0, log=True)
    depth = Param("model.depth", 1, 8, integer=True)
    init = Param("model.init", choices=["he", "xavier"])
    top = [{"optim.lr": 0.01, "model.depth": 3, "model.init": "he"}, {"optim.lr": 0.04, "model.depth": 4}]
    new_lr, new_depth, new_init = narrow([lr, depth, init], top)
    assert 1e-4 < new_lr.low < 0.01 and 0.04 < new_lr.high < 1.0 and new_lr.log
    assert math.log(new_lr.high / new_lr.low) < 0.5 * math.log(lr.high / lr.low)
    assert 1 <= new_depth.low <= 3 and 4 <= new_depth.high < 8 and isinstance(new_depth.low, int)
    assert new_init == init


def test_widening_stops_at_an_inclusive_schema_limit() -> None:
    lr = load_space({"optim.lr": {"low": 0.01, "high": 10.0}}, BASE)[0]
    assert widened(lr, "high") == (0.01, 100)  # optim.lr <= 100: the limit itself is allowed
