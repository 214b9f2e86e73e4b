"""Learning-rate schedules as pure functions of the iteration: factor(step) multiplies the base lr.

Pure functions need no saved state: a resumed run recomputes the factor from its step count.
Every schedule is wrapped in a linear warm-up when `warmup_epochs` > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dragontrainer.recipe import ScheduleSpec
from dragontrainer.registry import Registry

LrFactor = Callable[[int], float]
ScheduleFactory = Callable[[ScheduleSpec, int, int], LrFactor]
SCHEDULES: Registry[ScheduleFactory] = Registry("schedule")


@SCHEDULES.register("constant")
def constant(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """The same learning rate throughout."""
    return lambda step: 1.0


@SCHEDULES.register("cosine")
def cosine(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """Half a cosine from 1 down to `min_lr_fraction` (Loshchilov & Hutter 2017, no restarts)."""
    floor = spec.min_lr_fraction

    def factor(step: int) -> float:
        progress = min(step / max(decay_steps, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@SCHEDULES.register("step")
def step_decay(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """Multiply by `gamma` every `step_epochs` epochs (e.g. ×0.5 every 5, ×0.1 every 20)."""
    period = max(1, round(spec.step_epochs * steps_per_epoch))
    return lambda step: spec.gamma ** (step // period)


def create_schedule(spec: ScheduleSpec, *, steps_per_epoch: int, total_steps: int) -> LrFactor:
    """The named schedule over the steps after warm-up, preceded by a linear warm-up from ~0 to 1."""
    warmup_steps = round(spec.warmup_epochs * steps_per_epoch)
    decay = SCHEDULES.get(spec.name)(spec, steps_per_epoch, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(step - warmup_steps)

    return factor
