"""Optimisation rules: the learning rate, divergence, gradient flow, dead units and batch noise."""

from __future__ import annotations

import math
import statistics
from typing import Any

from dragontrainer.monitor.diagnose.core import Finding, RunRecords, fmt, pct, rule
from dragontrainer.optim.schedules import warmup_epochs

LR_SYMPTOMS = ("lr_too_high", "lr_too_low", "diverged", "nan_rollback", "loss_not_decreasing", "dead_units",
               "exploding_gradients", "noisy_loss", "underfitting", "label_noise",
               "over_regularisation")  # fmt: skip


def loss_rose(run: RunRecords) -> tuple[int, float] | None:
    """(index, value) of the smoothed loss's peak when it climbed above where it started."""
    smooth = run.smoothed_losses
    if len(smooth) < 20 or run.initial_loss is None:
        return None
    start = max(5, len(smooth) // 10)
    peak = max(range(start, len(smooth)), key=smooth.__getitem__)
    return (peak, smooth[peak]) if smooth[peak] > 1.1 * max(run.initial_loss, run.expected_initial_loss) else None


def stalled(run: RunRecords) -> bool:
    """The smoothed loss ended within 30% of where it began."""
    return run.initial_loss is not None and bool(run.smoothed_losses) and (
        run.smoothed_losses[-1] > 0.7 * run.initial_loss)  # fmt: skip


def median_update_ratio(records: list[dict[str, Any]]) -> float | None:
    ratios = [p["update_ratio"] for r in records for p in r["params"].values() if p["update_ratio"] is not None]
    return statistics.median(ratios) if ratios else None


@rule("lr_off_range", "optimisation", explains=LR_SYMPTOMS)
def lr_off_range(run: RunRecords) -> Finding | None:
    """The learning rate is ten times or more off its optimiser's usual range, and the run shows it."""
    ratio = run.lr / run.usual_lr
    updates = median_update_ratio(run.layers)
    # the rate's own effect, in the same direction: updates ten times off the healthy ≈ 1e-3 of the weights
    sized = updates is not None and (updates > 1e-2 if ratio > 1 else updates < 1e-4)
    troubled = run.kind("diverged") or run.kind("rollback") or loss_rose(run) or stalled(run) or sized
    if run.recipe.optim.lr == "auto" or 0.1 < ratio < 10 or not troubled:
        return None
    return Finding(
        "lr_off_range", "error" if run.kind("diverged") else "warning",
        f"learning rate {fmt(run.lr)} is {ratio:.3g}× the usual rate of {run.recipe.optim.name} "
        f"({fmt(run.usual_lr)} per {run.recipe.optim.reference_batch_size} images)",
        ["optim.lr=auto"], "each optimiser family has its own scale: `auto` picks it (optim/optimizers.py AUTO_LR)",
        {"lr": run.lr, "usual_lr": run.usual_lr, "ratio": ratio, "median_update_ratio": updates}, plot="loss",
        strong=True,
    )  # fmt: skip


@rule("diverged", "optimisation", explains=("loss_not_decreasing",))
def diverged(run: RunRecords) -> Finding | None:
    """The loss or the gradients became NaN/Inf and the run stopped."""
    events = run.kind("diverged")
    if not events:
        return None
    event = events[-1]
    return Finding(
        "diverged", "error",
        f"training diverged: the loss became NaN/Inf at step {event['step']} (epoch {event['epoch']}) "
        f"with learning rate {fmt(event['lr'])}",
        [f"optim.lr={fmt(run.lr / 10)}"],
        "or clip gradients (regularize.clip_grad_norm=1.0), or let the run recover (monitor.on_nan=rollback)",
        {"step": event["step"], "epoch": event["epoch"], "lr": event["lr"]}, plot="loss",
    )  # fmt: skip


@rule("nan_rollback", "optimisation")
def nan_rollback(run: RunRecords) -> Finding | None:
    """The loss became NaN/Inf and the run went back to its last checkpoint with a lower learning rate."""
    events = run.kind("rollback")
    if not events:
        return None
    scale = events[-1]["lr_scale"]
    steps = ", ".join(str(e["diverged_step"]) for e in events)
    return Finding(
        "nan_rollback", "warning",
        f"the loss became NaN/Inf {len(events)} time(s) (at step {steps}); the run rolled back to its last "
        f"checkpoint and continued with the learning rate ×{scale:g}",
        [f"optim.lr={fmt(run.lr * scale)}"], "start there next time, or clip gradients (regularize.clip_grad_norm=1.0)",
        {"rollbacks": events, "step": events[0]["diverged_step"]}, plot="loss",
    )  # fmt: skip


def dead_layers(record: dict[str, Any], threshold: float) -> dict[str, float]:
    """ReLU layers (zero gradient below 0) whose fraction of dead channels is at least `threshold`."""
    return {
        name: a["dead"]
        for name, a in record.get("activations", {}).items()
        if a["type"] == "relu" and a["dead"] is not None and a["dead"] >= threshold
    }


@rule("lr_too_high", "optimisation", explains=("diverged", "nan_rollback", "dead_units", "loss_not_decreasing",
                                               "exploding_gradients", "noisy_loss", "underfitting",
                                               "label_noise", "over_regularisation"))  # fmt: skip
def lr_too_high(run: RunRecords) -> Finding | None:
    """The loss climbed above its initial value, or ReLU units died while the loss stayed high."""
    rose = loss_rose(run)
    first, last = (run.layers[0], run.layers[-1]) if run.layers else ({}, {})
    died = {n: f for n, f in dead_layers(last, 0.5).items() if n not in dead_layers(first, 0.5)}
    stuck = stalled(run)
    if not rose and not (died and stuck):
        return None
    parts, step = [], None
    if rose:
        step = run.steps[rose[0]]["step"]
        parts.append(f"loss rose above its initial value {fmt(run.initial_loss or 0)} to {fmt(rose[1])} at step {step}")
    if died:
        worst = max(died, key=died.__getitem__)
        parts.append(f"{pct(died[worst])} of the ReLU channels in {worst} died during training"
                     + (f" while the loss stalled at {fmt(run.smoothed_losses[-1])}" if stuck else ""))  # fmt: skip
    return Finding(
        "lr_too_high", "error" if died and stuck else "warning",
        "learning rate too high: " + " and ".join(parts),
        [f"optim.lr={fmt(run.lr / 10)}"],
        f"or add warm-up (schedule.warmup_epochs=2); to choose, run: dragon compare optim.lr={fmt(run.lr / 3)},"
        f"{fmt(run.lr / 10)},{fmt(run.lr / 30)}",
        {"step": step, "initial_loss": run.initial_loss, "peak_loss": rose[1] if rose else None, "dead_layers": died},
        plot="loss" if rose else "dead",
    )  # fmt: skip


@rule("lr_too_low", "optimisation", explains=("loss_not_decreasing", "underfitting", "label_noise"))
def lr_too_low(run: RunRecords) -> Finding | None:
    """Updates are far below ~1e-3 of the weights and the loss falls slowly."""
    warm = warmup_epochs(run.recipe.schedule, run.recipe.train.epochs)
    records = [r for r in run.layers if r["epoch"] > warm][: max(4, len(run.layers) // 2)]
    ratio = median_update_ratio(records)
    if ratio is None or ratio >= 1e-4 or run.initial_loss is None:
        return None
    drop = 1 - run.smoothed_losses[-1] / run.initial_loss
    if drop > 0.8:
        return None  # small updates, but the loss came down: nothing to fix
    return Finding(
        "lr_too_low", "warning",
        f"learning rate too low: updates are {ratio:.1e} of the weights (healthy ≈ 1e-3) and the loss fell "
        f"only {pct(drop)} from {fmt(run.initial_loss)}",
        [f"optim.lr={fmt(run.lr * 10)}"], f"or train longer (train.epochs={run.recipe.train.epochs * 2})",
        {"median_update_ratio": ratio, "loss_drop": drop}, plot="update",
    )  # fmt: skip


@rule("loss_not_decreasing", "optimisation")
def loss_not_decreasing(run: RunRecords) -> Finding | None:
    """The loss ended about where it started (and not because it blew up)."""
    if len(run.losses) < 20 or run.initial_loss is None or run.kind("diverged"):
        return None
    end = run.smoothed_losses[-1]
    if end < 0.9 * min(run.initial_loss, run.expected_initial_loss):
        return None
    # one direction, from the evidence: rollbacks or a rising loss say lower, tiny updates say higher
    ratio = median_update_ratio(run.layers)
    if run.kind("rollback") or loss_rose(run) or (ratio is not None and ratio > 1e-2):
        overrides, why = [f"optim.lr={fmt(run.lr / 10)}"], "updates are too large"
    elif ratio is not None and ratio < 1e-4:
        overrides, why = [f"optim.lr={fmt(run.lr * 10)}"], "updates are tiny"
    else:
        overrides, why = ["model.init=auto"], "updates are of a healthy size"
    return Finding(
        "loss_not_decreasing", "error",
        f"the loss is not decreasing: {fmt(run.initial_loss)} at the start, {fmt(end)} after {len(run.losses)} "
        f"steps (chance level is ln {run.num_classes} = {fmt(run.expected_initial_loss)})",
        overrides, f"{why}; run `dragon doctor` (it overfits one batch and checks labels and inputs)",
        {"initial_loss": run.initial_loss, "final_loss": end, "median_update_ratio": ratio}, plot="loss",
    )  # fmt: skip


def gradient_ratios(record: dict[str, Any]) -> list[tuple[str, float]]:
    """Per weight tensor in network order: ‖∇W‖ / ‖W‖, the relative size of the gradient."""
    return [
        (name, p["grad_norm"] / p["weight_norm"])
        for name, p in record["params"].items()
        if p["grad_norm"] is not None and p["weight_norm"]
    ]


@rule(
    "vanishing_gradients", "optimisation", explains=("loss_not_decreasing", "underfitting", "lr_too_low", "label_noise")
)
def vanishing_gradients(run: RunRecords) -> Finding | None:
    """The first layers get gradients thousands of times smaller (relative to their weights) than the last."""
    spreads = []
    for record in run.layers[: max(3, len(run.layers) // 3)]:
        ratios = gradient_ratios(record)
        if len(ratios) >= 3 and ratios[-1][1] > 0:
            spreads.append((ratios[0][1] / ratios[-1][1], record["step"], ratios))
    if not spreads:
        return None
    spread, step, ratios = sorted(spreads, key=lambda s: s[0])[len(spreads) // 2]  # the median sample
    if spread >= 1e-3:
        return None
    return Finding(
        "vanishing_gradients", "warning",
        f"vanishing gradients: relative to its weights, {ratios[0][0]} gets a gradient {1 / max(spread, 1e-30):.0e} "
        f"times smaller than {ratios[-1][0]} (step {step})",
        ["model.activation=relu", "model.norm=batch"],
        "or a variance-preserving initialisation (model.init=auto), or residual connections (model.name=resnet)",
        {"step": step, "ratios": dict(ratios)}, plot="grad",
    )  # fmt: skip


@rule("exploding_gradients", "optimisation", explains=("diverged", "nan_rollback", "loss_not_decreasing"))
def exploding_gradients(run: RunRecords) -> Finding | None:
    """Gradients as large as the weights themselves, or a gradient norm spiking far above its typical size."""
    norms = [(r["step"], r["grad_norm"]) for r in run.steps if r["grad_norm"] is not None]
    non_finite = [r["step"] for r in run.steps if r["grad_norm"] is None]
    # the output layer is left out: small classifier weights make its ratio large in healthy runs too
    huge = [(record["step"], name, ratio) for record in run.layers[: max(3, len(run.layers) // 3)]
            for name, ratio in gradient_ratios(record)[:-1] if ratio >= 2.0]  # fmt: skip
    typical = statistics.median(n for _, n in norms) if len(norms) >= 20 else math.inf
    later = norms[len(norms) // 5 :]  # gradients are large at the start of every healthy run
    step, peak = max(later, key=lambda s: s[1]) if later else (0, 0.0)
    if non_finite:
        step, where = non_finite[0], f"the gradient norm became NaN/Inf at step {non_finite[0]}"
    elif huge:
        step, name, ratio = max(huge, key=lambda h: h[2])
        where = f"at step {step} the gradient of {name} is {ratio:.3g}× the norm of its weights (healthy: ≪ 1)"
    elif peak >= 100 * typical:
        where = f"the gradient norm reached {fmt(peak)} at step {step}, {peak / typical:.0f}× its median {fmt(typical)}"
    else:
        return None
    return Finding(
        "exploding_gradients", "warning", f"exploding gradients: {where}",
        ["regularize.clip_grad_norm=1.0"],
        "and a variance-preserving initialisation (model.init=auto) or normalisation layers (model.norm=batch)",
        {"step": step, "peak": peak, "median": typical if norms else None,
         "layers": [{"step": s, "layer": n, "grad_over_weight": r} for s, n, r in huge[:10]]}, plot="grad",
    )  # fmt: skip


@rule("dead_units", "optimisation", explains=("loss_not_decreasing", "underfitting", "label_noise"))
def dead_units(run: RunRecords) -> Finding | None:
    """Most ReLU channels of a layer died during training and the network no longer fits its data."""
    if len(run.layers) < 2:
        return None
    born_dead = dead_layers(run.layers[0], 0.0)
    died = {n: f for n, f in dead_layers(run.layers[-1], 0.5).items() if f - born_dead.get(n, 0.0) >= 0.25}
    fitting = run.fit is not None and run.fit.train >= 0.9
    if not died or (fitting and not stalled(run)):
        return None  # a sparse layer in a network that fits its data is not a problem
    worst = max(died, key=died.__getitem__)
    step = run.layers[-1]["step"]
    return Finding(
        "dead_units", "warning",
        f"dead units: {pct(died[worst])} of the ReLU channels in {worst} output zero for every probe image "
        f"(step {step}){f' and {len(died) - 1} more layers' if len(died) > 1 else ''}",
        [f"optim.lr={fmt(run.lr / 10)}"],
        "or a leaky activation (model.activation=leaky_relu) or normalisation layers (model.norm=batch)",
        {"step": step, "layers": died, "layer": worst}, plot="dead",
    )  # fmt: skip


def loss_floor(num_classes: int, smoothing: float) -> float:
    """The lowest cross-entropy reachable with label smoothing ε: the entropy of the smoothed target."""
    if smoothing <= 0:
        return 0.0
    hit, miss = 1 - smoothing + smoothing / num_classes, smoothing / num_classes
    return -(hit * math.log(hit) + (num_classes - 1) * miss * math.log(miss))


@rule("noisy_loss", "optimisation")
def noisy_loss(run: RunRecords) -> Finding | None:
    """Step-to-step loss swings large against the loss still to lose: the batch is too small."""
    augment = run.recipe.augment
    if len(run.losses) < 40 or run.kind("diverged") or augment.mixup.p > 0 or augment.cutmix.p > 0:
        return None  # mixed targets make every step's loss differ by design
    losses, smooth = run.losses, run.smoothed_losses
    lo, hi = len(losses) // 4, 3 * len(losses) // 4  # the middle half: past the first drop, before the end
    floor = loss_floor(run.num_classes, run.recipe.train.label_smoothing)
    swing = statistics.median(abs(a - b) for a, b in zip(losses[lo:hi], smooth[lo:hi], strict=True))
    excess = statistics.median(max(b - floor, 1e-8) for b in smooth[lo:hi])
    noise = swing / excess
    if noise < 0.3 or excess < 0.02 * run.expected_initial_loss:
        return None  # a loss at its floor swings by little in absolute terms: that is convergence
    batch = run.recipe.train.batch_size
    return Finding(
        "noisy_loss", "warning",
        f"loss curve too noisy: a step's loss is typically {pct(noise)} of the remaining loss away from the "
        f"running median (batch size {batch})",
        [f"train.batch_size={batch * 4}"],
        "the learning rate follows by optim.lr_scaling=linear; or accumulate gradients (train.accumulate_steps=4)",
        {"relative_noise": noise, "loss_floor": floor, "batch_size": batch}, plot="loss",
    )  # fmt: skip


@rule("noise_scale", "optimisation")
def noise_scale(run: RunRecords) -> Finding | None:
    """The gradient noise scale (McCandlish et al. 2018) against the batch size, for information."""
    samples = [r["noise"] for r in run.layers if r.get("noise") and None not in r["noise"].values()]
    if len(samples) < 3:
        return None
    g2 = statistics.mean(s["g2"] for s in samples)
    trace = statistics.mean(s["trace"] for s in samples)
    if g2 <= 0 or trace <= 0:
        return None
    scale = trace / g2
    batch = run.recipe.train.batch_size * run.recipe.train.accumulate_steps
    relation = "well below" if batch < scale / 4 else "well above" if batch > 4 * scale else "near"
    return Finding(
        "noise_scale", "info", f"gradient noise scale ≈ {scale:.0f} images: the batch size {batch} is {relation} it",
        [], "batches up to about the noise scale train in fewer steps at the same cost per image; beyond it they "
        "waste compute", {"noise_scale": scale, "batch_size": batch, "samples": len(samples)},
    )  # fmt: skip
