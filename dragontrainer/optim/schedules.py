"""Learning-rate schedules as pure functions of the iteration: factor(step) multiplies the base lr.

Pure functions need no saved state: a resumed run recomputes the factor from its step count.
Every schedule is stepped per iteration and wrapped in a linear warm-up when `warmup_epochs` > 0;
times in the recipe are in epochs (`t` below) and converted to steps here. `plateau` is constant
here: its reductions come from the ReduceOnPlateau callback, which scales the result.
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


@SCHEDULES.register("plateau")
def plateau(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """Reduce on plateau: × plateau_factor after plateau_patience epochs without val_loss improvement."""
    return lambda step: 1.0


@SCHEDULES.register("step")
def step_decay(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """Multiply by `gamma` every `step_epochs` epochs (e.g. ×0.5 every 5, ×0.1 every 20)."""
    period = max(1, round(spec.step_epochs * steps_per_epoch))
    return lambda step: spec.gamma ** (step // period)


@SCHEDULES.register("multistep")
def multistep(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """Multiply by `gamma` at each of `milestones_epochs`."""
    milestones = sorted(round(m * steps_per_epoch) for m in spec.milestones_epochs)
    return lambda step: spec.gamma ** sum(step >= m for m in milestones)


@SCHEDULES.register("exponential")
def exponential(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """α = α0·e^(−k·t), t in epochs, k = `decay_rate`."""
    return lambda step: math.exp(-spec.decay_rate * step / steps_per_epoch)


@SCHEDULES.register("inverse_time")
def inverse_time(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """1/t decay: α = α0/(1 + k·t), t in epochs, k = `decay_rate`."""
    return lambda step: 1.0 / (1.0 + spec.decay_rate * step / steps_per_epoch)


@SCHEDULES.register("inverse_sqrt")
def inverse_sqrt(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """α = α0/√(1 + k·t), t in epochs, k = `decay_rate`."""
    return lambda step: 1.0 / math.sqrt(1.0 + spec.decay_rate * step / steps_per_epoch)


def _progress(step: int, total: int) -> float:
    return min(step / max(total, 1), 1.0)


@SCHEDULES.register("linear")
def linear(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """Straight line from 1 down to `min_lr_fraction` at the end of the run."""
    floor = spec.min_lr_fraction
    return lambda step: floor + (1.0 - floor) * (1.0 - _progress(step, decay_steps))


@SCHEDULES.register("polynomial")
def polynomial(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """(1 − t/T)^power from 1 down to `min_lr_fraction`."""
    floor = spec.min_lr_fraction
    return lambda step: floor + (1.0 - floor) * (1.0 - _progress(step, decay_steps)) ** spec.power


@SCHEDULES.register("cosine")
def cosine(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """Half a cosine from 1 down to `min_lr_fraction` (Loshchilov & Hutter 2017, no restarts)."""
    floor = spec.min_lr_fraction
    return lambda step: floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * _progress(step, decay_steps)))


@SCHEDULES.register("cosine_restarts")
def cosine_restarts(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """SGDR (Loshchilov & Hutter 2017): cosine periods of `restart_epochs`, each `restart_mult`× longer."""
    first = max(1, round(spec.restart_epochs * steps_per_epoch))
    floor, mult = spec.min_lr_fraction, spec.restart_mult

    def factor(step: int) -> float:
        period, start = first, 0
        while step >= start + period:
            start += period
            period = max(1, round(period * mult))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (step - start) / period))

    return factor


@SCHEDULES.register("cyclic")
def cyclic(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """Cyclical learning rate (Smith 2017): triangle between min_lr_fraction and 1; triangular2 halves
    the amplitude every cycle, exp_range multiplies it by cyclic_gamma^step."""
    half = max(1, round(spec.cycle_epochs * steps_per_epoch / 2))
    low = spec.min_lr_fraction

    def factor(step: int) -> float:
        cycle = step // (2 * half)
        triangle = 1.0 - abs(step / half - 2 * cycle - 1)  # 0 -> 1 -> 0 over one cycle
        if spec.cyclic_mode == "triangular2":
            triangle /= 2**cycle
        elif spec.cyclic_mode == "exp_range":
            triangle *= spec.cyclic_gamma**step
        return low + (1.0 - low) * triangle

    return factor


@SCHEDULES.register("one_cycle")
def one_cycle(spec: ScheduleSpec, steps_per_epoch: int, decay_steps: int) -> LrFactor:
    """One cycle (Smith & Topin 2019): cosine up from lr/div to lr over onecycle_pct, then cosine
    down to lr/(div·final_div) — torch's OneCycleLR with anneal_strategy='cos'."""
    start, end = 1.0 / spec.onecycle_div, 1.0 / (spec.onecycle_div * spec.onecycle_final_div)
    peak_step = spec.onecycle_pct * decay_steps - 1

    def anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    def factor(step: int) -> float:
        if step <= peak_step:
            return anneal(start, 1.0, step / peak_step)
        return anneal(1.0, end, min((step - peak_step) / (decay_steps - 1 - peak_step), 1.0))

    return factor


AUTO_WARMUP_EPOCHS, AUTO_WARMUP_FRACTION = 1.0, 0.1


def warmup_epochs(spec: ScheduleSpec, epochs: float) -> float:
    """The warm-up length in epochs: as set, or `auto` = min(1 epoch, 10% of the run), so a one-epoch
    run still warms up (for a tenth of it) and long runs get the customary single epoch."""
    if spec.warmup_epochs == "auto":
        return min(AUTO_WARMUP_EPOCHS, AUTO_WARMUP_FRACTION * epochs)
    return float(spec.warmup_epochs)


def create_schedule(spec: ScheduleSpec, *, steps_per_epoch: int, total_steps: int) -> LrFactor:
    """The named schedule over the steps after warm-up, preceded by a linear warm-up from ~0 to 1."""
    warmup_steps = round(warmup_epochs(spec, total_steps / max(steps_per_epoch, 1)) * steps_per_epoch)
    decay = SCHEDULES.get(spec.name)(spec, steps_per_epoch, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return decay

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(step - warmup_steps)

    return factor
