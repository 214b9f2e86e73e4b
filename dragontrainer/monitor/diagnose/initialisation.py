"""Initialisation rules: weights that start symmetric or at the wrong scale, and saturated units."""

from __future__ import annotations

import math
import statistics
from typing import Any

from dragontrainer.monitor.diagnose.core import Finding, RunRecords, fmt, pct, rule
from dragontrainer.monitor.diagnose.optimisation import stalled
from dragontrainer.monitor.stats import input_problem

INIT_SYMPTOMS = ("diverged", "nan_rollback", "exploding_gradients", "vanishing_gradients", "lr_too_high",
                 "lr_too_low", "loss_not_decreasing", "saturated_activations", "dead_units", "underfitting",
                 "noisy_loss", "label_noise")  # fmt: skip


def symmetric_layers(initial: dict[str, Any]) -> list[str]:
    """Weight tensors whose output units all start identical: gradients cannot tell them apart."""
    names = []
    for name, weight in initial.items():
        rows = weight.reshape(weight.shape[0], -1).float()
        if rows.shape[0] > 1 and bool((rows - rows[:1]).abs().max() == 0):
            names.append(name)
    return names


def he_scale(initial: dict[str, Any]) -> float | None:
    """Median over layers of std(W)·√(fan_in / 2): 1 at He's variance-preserving scale for ReLU."""
    scales = [float(w.float().std()) * math.sqrt(w[0].numel() / 2) for w in initial.values() if w[0].numel() > 1]
    return statistics.median(scales) if scales else None


@rule("bad_init", "initialisation", explains=INIT_SYMPTOMS)
def bad_init(run: RunRecords) -> Finding | None:
    """Zero or symmetric initial weights, weights far off a variance-preserving scale without normalisation
    layers, or an initial loss far above ln C."""
    init, initial = run.recipe.model.init, run.initial_weights or {}
    symmetric = symmetric_layers(initial)
    if symmetric:
        return Finding(
            "bad_init", "error",
            f"bad initialisation: every unit of {', '.join(symmetric[:3])}{' …' if len(symmetric) > 3 else ''} "
            f"starts with the same weights ({init}), so all units get the same gradient and stay identical",
            ["model.init=auto"], "random weights at a variance-preserving scale (He for ReLU, Xavier for tanh)",
            {"layers": symmetric, "init": init}, plot="grad", strong=True,
        )  # fmt: skip
    first, expected = run.initial_loss, run.expected_initial_loss
    scale = he_scale(initial) if run.recipe.model.norm == "none" else None
    troubled = stalled(run) or run.kind("diverged") or run.kind("rollback")  # else the scale did no harm
    off_scale = scale is not None and not 0.1 <= scale <= 5 and bool(troubled)
    probes = run.kind("probe")
    huge_inputs = bool(probes) and input_problem(probes[0]) == "scale"  # they, not the weights, inflate the loss
    if not off_scale and (first is None or first < 3 * expected or huge_inputs):
        return None
    measured = (f"the initial loss {fmt(first)} is far above ln {run.num_classes} = {fmt(expected)}"
                if first is not None and first >= 3 * expected else "")  # fmt: skip
    if off_scale:
        measured += (" and " if measured else "") + f"the weights start at {fmt(scale or 0)}× He's scale"
    return Finding(
        "bad_init", "warning", f"bad initialisation ({init}): {measured}",
        ["model.init=auto"], "a variance-preserving scale; normalisation layers (model.norm=batch) also make it "
        "matter less", {"initial_loss": first, "expected": expected, "he_scale": scale}, plot="loss", strong=True,
    )  # fmt: skip


@rule("saturated_activations", "initialisation",
      explains=("vanishing_gradients", "loss_not_decreasing", "underfitting", "lr_too_low", "label_noise"))  # fmt: skip
def saturated_activations(run: RunRecords) -> Finding | None:
    """Sigmoid/tanh outputs stuck near their limits, where the gradient is almost zero."""
    fractions: dict[str, list[float]] = {}
    for record in run.layers[-max(1, len(run.layers) // 4) :]:
        for name, a in record["activations"].items():
            if a.get("saturated") is not None:
                fractions.setdefault(name, []).append(a["saturated"])
    saturated = {n: statistics.mean(v) for n, v in fractions.items() if statistics.mean(v) >= 0.3}
    if not saturated:
        return None
    worst = max(saturated, key=saturated.__getitem__)
    return Finding(
        "saturated_activations", "warning",
        f"saturated activations: {pct(saturated[worst])} of the outputs of {worst} "
        f"({run.recipe.model.activation}) sit where its gradient is below 0.02",
        ["model.activation=relu", "model.norm=batch"],
        "and a scale-matched initialisation (model.init=auto)", {"layers": saturated, "layer": worst},
        plot="activations",
    )  # fmt: skip
