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


SATURATING = {"sigmoid", "tanh"}  # variance-preserving at LeCun/Xavier's 1/fan_in, not He's 2/fan_in


def init_scale(initial: dict[str, Any], activation: str = "relu") -> float | None:
    """Median over layers of std(W)·√(fan_in / gain): 1 at the activation's variance-preserving scale
    (He's gain 2 for the ReLU family, LeCun/Xavier's gain 1 for sigmoid and tanh)."""
    gain = 1 if activation in SATURATING else 2
    scales = [float(w.float().std()) * math.sqrt(w[0].numel() / gain) for w in initial.values() if w[0].numel() > 1]
    return statistics.median(scales) if scales else None


def not_fitting(run: RunRecords) -> bool:
    """The network fits its own training images (eval mode) clearly worse than a nearest-neighbour
    lookup on pixels predicts unseen ones: training went badly, whatever the data set."""
    knn, fit = run.neighbours, run.fit
    return knn is not None and fit is not None and fit.train < knn["agreement"] - knn["band"] - fit.noise


@rule("bad_init", "initialisation", explains=INIT_SYMPTOMS)
def bad_init(run: RunRecords) -> Finding | None:
    """Zero or symmetric initial weights, weights far off the activation's variance-preserving scale
    without normalisation layers, or an initial loss (dropout off) far above ln C."""
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
    first, expected = run.first_loss, run.expected_initial_loss
    activation = run.recipe.model.activation
    scale = init_scale(initial, activation) if run.recipe.model.norm == "none" else None
    troubled = stalled(run) or run.kind("diverged") or run.kind("rollback") or not_fitting(run)  # else no harm
    # a layer at scale s multiplies its input's variance by s²: ten times or more either way is off
    off_scale = scale is not None and not 0.1 <= scale**2 <= 10 and bool(troubled)
    probes = run.kind("probe")
    huge_inputs = bool(probes) and input_problem(probes[0]) == "scale"  # they, not the weights, inflate the loss
    if not off_scale and (first is None or first < 3 * expected or huge_inputs):
        return None
    measured = (f"the initial loss {fmt(first)} is far above ln {run.num_classes} = {fmt(expected)}"
                if first is not None and first >= 3 * expected else "")  # fmt: skip
    if off_scale:
        reference = "LeCun/Xavier" if activation in SATURATING else "He"
        measured += (" and " if measured else "") + f"the weights start at {fmt(scale or 0)}× {reference}'s scale"
    return Finding(
        "bad_init", "warning", f"bad initialisation ({init}): {measured}",
        ["model.init=auto"], "a variance-preserving scale; normalisation layers (model.norm=batch) also make it "
        "matter less", {"initial_loss": first, "expected": expected, "init_scale": scale}, plot="loss", strong=True,
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
