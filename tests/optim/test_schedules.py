from __future__ import annotations

import math

import pytest
import torch

from dragontrainer.optim.optimizers import effective_lr
from dragontrainer.optim.param_groups import build_param_groups
from dragontrainer.optim.schedules import create_schedule
from dragontrainer.recipe import OptimSpec, ScheduleSpec


def test_warmup_then_cosine_closed_form() -> None:
    factor = create_schedule(ScheduleSpec(name="cosine", warmup_epochs=2), steps_per_epoch=10, total_steps=100)
    assert factor(0) == pytest.approx(1 / 20)
    assert factor(19) == pytest.approx(1.0)
    for step in (20, 40, 60, 99):
        assert factor(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 20) / 80)))


def test_cosine_matches_torch_without_warmup() -> None:
    factor = create_schedule(
        ScheduleSpec(name="cosine", warmup_epochs=0, min_lr_fraction=0.1), steps_per_epoch=5, total_steps=50
    )
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.1)
    for step in range(50):
        assert factor(step) == pytest.approx(opt.param_groups[0]["lr"]), step
        opt.step()
        sched.step()


def test_step_decay() -> None:
    factor = create_schedule(
        ScheduleSpec(name="step", warmup_epochs=0, step_epochs=5, gamma=0.5), steps_per_epoch=4, total_steps=80
    )
    assert [factor(s) for s in (0, 19, 20, 39, 40)] == [1, 1, 0.5, 0.5, 0.25]


def test_weight_decay_only_on_weight_tensors() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    groups, summary = build_param_groups(model, 5e-4)
    decay, no_decay = groups
    assert all(p.ndim >= 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    assert "decay: 2 tensors" in str(summary[0])


def test_linear_scaling_rule() -> None:
    assert effective_lr(OptimSpec(lr=0.2), 256) == pytest.approx(0.4)
    assert effective_lr(OptimSpec(lr=0.2, lr_scaling="none"), 256) == pytest.approx(0.2)


def schedule(name: str, steps_per_epoch: int = 10, epochs: int = 10, **spec: object):
    return create_schedule(
        ScheduleSpec(name=name, warmup_epochs=0, **spec),
        steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * epochs,
    )


def test_closed_forms_of_the_decays() -> None:
    exp = schedule("exponential", decay_rate=0.3)
    inv = schedule("inverse_time", decay_rate=0.5)
    sqrt = schedule("inverse_sqrt", decay_rate=2.0)
    for step in (0, 7, 25, 99):
        t = step / 10
        assert exp(step) == pytest.approx(math.exp(-0.3 * t))
        assert inv(step) == pytest.approx(1 / (1 + 0.5 * t))
        assert sqrt(step) == pytest.approx(1 / math.sqrt(1 + 2 * t))
    lin = schedule("linear", min_lr_fraction=0.1)
    poly = schedule("polynomial", power=2.0)
    assert [lin(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.55, 0.1])
    assert [poly(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.25, 0.0])
    multi = schedule("multistep", milestones_epochs=[2, 5], gamma=0.5)
    assert [multi(s) for s in (19, 20, 49, 50)] == [1, 0.5, 0.5, 0.25]


def follow_torch(factor, make_scheduler, steps: int) -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(opt)
    for step in range(steps):
        assert factor(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        scheduler.step()


def test_sgdr_matches_torch_warm_restarts() -> None:
    factor = schedule("cosine_restarts", restart_epochs=2, restart_mult=2, min_lr_fraction=0.01)
    follow_torch(
        factor, lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=20, T_mult=2, eta_min=0.01), 100
    )


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclic_matches_torch_cyclic_lr(mode: str) -> None:
    factor = schedule("cyclic", cycle_epochs=2, cyclic_mode=mode, min_lr_fraction=0.1, cyclic_gamma=0.99)
    follow_torch(
        factor,
        lambda o: torch.optim.lr_scheduler.CyclicLR(
            o, base_lr=0.1, max_lr=1.0, step_size_up=10, mode=mode, gamma=0.99, cycle_momentum=False
        ),
        100,
    )


def test_one_cycle_matches_torch() -> None:
    factor = schedule("one_cycle", onecycle_pct=0.25, onecycle_div=25, onecycle_final_div=1e4)
    follow_torch(
        factor,
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=1.0, total_steps=100, pct_start=0.25, div_factor=25, final_div_factor=1e4, cycle_momentum=False
        ),
        100,
    )


def test_every_schedule_is_positive_and_finite_through_the_run() -> None:
    from dragontrainer.optim.schedules import SCHEDULES

    for name in SCHEDULES.names():
        factor = create_schedule(ScheduleSpec(name=name, warmup_epochs=2), steps_per_epoch=7, total_steps=140)
        values = [factor(s) for s in range(140)]
        assert all(math.isfinite(v) and v >= 0 for v in values), name
        assert values[0] == pytest.approx(1 / 14), name  # warm-up composes with every schedule
