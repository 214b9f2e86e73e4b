from __future__ import annotations

import math

import pytest
import torch

from dragontrainer.optim.optimizers import OPTIMIZERS, create_optimizer, effective_lr
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


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizers_follow_torch(name: str) -> None:
    torch.manual_seed(0)
    spec = OptimSpec(name=name, weight_decay=0)
    ours = torch.nn.Parameter(torch.randn(5))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = create_optimizer([{"params": [ours], "weight_decay": 0}], spec, 0.1)
    ref = (torch.optim.SGD([theirs], lr=0.1, momentum=0.9, nesterov=True) if name == "sgd"
           else torch.optim.Adam([theirs], lr=0.1))  # fmt: skip
    for _ in range(5):
        for p, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            (p**2).sum().backward()
            o.step()
    torch.testing.assert_close(ours, theirs)


def test_linear_scaling_rule() -> None:
    assert effective_lr(OptimSpec(lr=0.2), 256) == pytest.approx(0.4)
    assert effective_lr(OptimSpec(lr=0.2, lr_scaling="none"), 256) == pytest.approx(0.2)
