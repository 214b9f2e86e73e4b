"""Diagnosis: rules over the files of a run folder (recipe.yaml, data.json, metrics.jsonl,
stats.jsonl, init.safetensors), so it runs offline and again with `dragon report RUN`.

Each rule returns a `Finding` (or nothing): a stable key, a severity, a one-sentence verdict with
the measured numbers, the evidence it rests on and advice in recipe syntax. Thresholds follow
Karpathy's "A recipe for training neural networks", CS231n's "babysitting the learning process"
(update/weight ≈ 1e-3, initial loss ≈ ln C), AUTOTRAINER and DeepDiagnosis (dead/saturated unit
fractions, vanishing/exploding gradient ratios), measured against the scenario suite in
tests/monitor/test_scenarios.py. A healthy run must stay silent: when in doubt a rule says nothing.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape

from dragontrainer.errors import RunError
from dragontrainer.monitor.stats import input_problem
from dragontrainer.recipe import Recipe
from dragontrainer.registry import Registry
from dragontrainer.run import RunDir, read_jsonl

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
SYMPTOMS = {"loss_not_decreasing"}  # listed after the findings of the same severity that explain them


@dataclass(frozen=True)
class Finding:
    key: str
    severity: Severity
    verdict: str  # one sentence with the measured numbers
    advice: str  # what to change, in recipe syntax
    evidence: dict[str, Any] = field(default_factory=dict)  # the series, steps, layers the verdict rests on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunRecords:
    """The run folder's files, read once; the properties are the series the rules share."""

    recipe: Recipe
    data: dict[str, Any]
    metrics: list[dict[str, Any]]
    stats: list[dict[str, Any]]
    initial_weights: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str | Path) -> RunRecords:
        run = RunDir.open(path)
        data_file = run.file("data.json")
        if not data_file.exists():
            raise RunError(f"{run.path}: no data.json — the run never started training")
        initial = None
        if run.file("init.safetensors").exists():
            from safetensors.torch import load_file

            initial = load_file(run.file("init.safetensors"))
        data = json.loads(data_file.read_text(encoding="utf-8"))
        return cls(run.recipe(), data, run.history(), read_jsonl(run.stats_path), initial)

    # ------------------------------------------------------------------ shared series

    def kind(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.stats if r.get("kind") == name]

    @cached_property
    def train(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if r["split"] == "train"]

    @cached_property
    def val(self) -> list[dict[str, Any]]:
        return [r for r in self.metrics if r["split"] == "val"]

    @cached_property
    def steps(self) -> list[dict[str, Any]]:
        return self.kind("step")

    @cached_property
    def layers(self) -> list[dict[str, Any]]:
        return self.kind("layers")

    @cached_property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.steps if r["loss"] is not None]

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    @property
    def expected_initial_loss(self) -> float:
        return math.log(self.num_classes)

    @property
    def chance(self) -> float:
        """Accuracy of always guessing the most common class."""
        counts = self.data.get("train_class_counts") or [1] * self.num_classes
        return max(counts) / max(sum(counts), 1)

    @cached_property
    def initial_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @cached_property
    def smoothed_losses(self) -> list[float]:
        return moving_median(self.losses, 9)

    def final(self, split: str, key: str) -> float | None:
        records = self.train if split == "train" else self.val
        return records[-1][key] if records else None


def moving_median(values: Sequence[float], window: int) -> list[float]:
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def fmt(value: float) -> str:
    return f"{value:.3g}"


def pct(value: float) -> str:
    return f"{100 * value:.0f}%"


Rule = Callable[[RunRecords], Finding | None]
RULES: Registry[Rule] = Registry("diagnosis rule")


# ------------------------------------------------------------------------- divergence


@RULES.register("diverged")
def diverged(run: RunRecords) -> Finding | None:
    """The loss or the gradients became NaN/Inf and the run stopped."""
    events = run.kind("diverged")
    if not events:
        return None
    event = events[-1]
    lr = run.recipe.optim.lr
    return Finding(
        "diverged",
        "error",
        f"training diverged: the loss became NaN/Inf at step {event['step']} (epoch {event['epoch']}) "
        f"with learning rate {fmt(event['lr'])}",
        f"lower the learning rate (optim.lr={fmt(lr / 10)}), clip gradients (regularize.clip_grad_norm=1.0), "
        f"or let the run recover by itself (monitor.on_nan=rollback)",
        {"series": "loss", "step": event["step"], "epoch": event["epoch"], "lr": event["lr"]},
    )


@RULES.register("nan_rollback")
def nan_rollback(run: RunRecords) -> Finding | None:
    """The loss became NaN/Inf and the run went back to its last checkpoint with a lower learning rate."""
    events = run.kind("rollback")
    if not events:
        return None
    last = events[-1]
    steps = ", ".join(str(e["diverged_step"]) for e in events)
    return Finding(
        "nan_rollback",
        "warning",
        f"the loss became NaN/Inf {len(events)} time(s) (at step {steps}); the run rolled back to its last "
        f"checkpoint and continued with the learning rate ×{last['lr_scale']:g}",
        f"start with a lower learning rate next time (optim.lr={fmt(run.recipe.optim.lr * last['lr_scale'])}) "
        f"or clip gradients (regularize.clip_grad_norm=1.0)",
        {"rollbacks": events},
    )


# ---------------------------------------------------------------------- learning rate


def dead_layers(record: dict[str, Any], threshold: float) -> dict[str, float]:
    """ReLU layers (zero gradient below 0) whose fraction of dead channels is at least `threshold`."""
    return {
        name: a["dead"]
        for name, a in record.get("activations", {}).items()
        if a["type"] == "relu" and a["dead"] is not None and a["dead"] >= threshold
    }


@RULES.register("lr_too_high")
def lr_too_high(run: RunRecords) -> Finding | None:
    """The loss climbed above its initial value, or ReLU units died while the loss stayed high."""
    losses, smooth = run.losses, run.smoothed_losses
    if len(losses) < 20 or run.initial_loss is None:
        return None
    start = max(5, len(smooth) // 10)
    peak_index = max(range(start, len(smooth)), key=smooth.__getitem__)
    rose = smooth[peak_index] > 1.1 * max(run.initial_loss, run.expected_initial_loss)
    first, last = (run.layers[0], run.layers[-1]) if run.layers else ({}, {})
    died = {n: f for n, f in dead_layers(last, 0.5).items() if n not in dead_layers(first, 0.5)}
    stuck = smooth[-1] > 0.7 * run.initial_loss
    if not rose and not (died and stuck):
        return None
    steps = run.steps[peak_index]["step"]
    parts = []
    if rose:
        parts.append(
            f"loss rose above its initial value {fmt(run.initial_loss)} to {fmt(smooth[peak_index])} at step {steps}"
        )
    if died:
        worst = max(died, key=died.__getitem__)
        stalled = f" while the loss stalled at {fmt(smooth[-1])}" if stuck else ""
        parts.append(f"{pct(died[worst])} of the ReLU channels in {worst} died during training{stalled}")
    lr = run.recipe.optim.lr
    return Finding(
        "lr_too_high",
        "error" if died and stuck else "warning",  # dead units and no progress: the run is lost
        "learning rate too high: " + " and ".join(parts),
        f"lower the learning rate (optim.lr={fmt(lr / 10)}) or add warm-up (schedule.warmup_epochs=2); "
        f"to choose, run: dragon compare optim.lr={fmt(lr / 3)},{fmt(lr / 10)},{fmt(lr / 30)}",
        {"series": "loss", "step": steps, "initial_loss": run.initial_loss, "peak_loss": smooth[peak_index],
         "dead_layers": died},
    )  # fmt: skip


def median_update_ratio(records: list[dict[str, Any]]) -> float | None:
    ratios = [p["update_ratio"] for r in records for p in r["params"].values() if p["update_ratio"] is not None]
    return statistics.median(ratios) if ratios else None


@RULES.register("lr_too_low")
def lr_too_low(run: RunRecords) -> Finding | None:
    """Updates are far below ~1e-3 of the weights and the loss falls slowly."""
    warm = run.recipe.schedule.warmup_epochs
    records = [r for r in run.layers if r["epoch"] > warm][: max(4, len(run.layers) // 2)]
    ratio = median_update_ratio(records)
    if ratio is None or ratio >= 1e-4 or run.initial_loss is None:
        return None
    drop = 1 - run.smoothed_losses[-1] / run.initial_loss
    if drop > 0.8:
        return None  # small updates, but the loss came down: nothing to fix
    return Finding(
        "lr_too_low",
        "warning",
        f"learning rate too low: updates are {ratio:.1e} of the weights (healthy ≈ 1e-3) and the loss fell "
        f"only {pct(drop)} from {fmt(run.initial_loss)}",
        f"raise the learning rate (optim.lr={fmt(run.recipe.optim.lr * 10)}) or train longer "
        f"(train.epochs={run.recipe.train.epochs * 2})",
        {"series": "update_ratio", "median_update_ratio": ratio, "loss_drop": drop},
    )


@RULES.register("loss_not_decreasing")
def loss_not_decreasing(run: RunRecords) -> Finding | None:
    """The loss ended about where it started (and not because it blew up)."""
    if len(run.losses) < 20 or run.initial_loss is None or run.kind("diverged"):
        return None
    end = run.smoothed_losses[-1]
    if end < 0.9 * min(run.initial_loss, run.expected_initial_loss):
        return None
    return Finding(
        "loss_not_decreasing",
        "error",
        f"the loss is not decreasing: {fmt(run.initial_loss)} at the start, {fmt(end)} after {len(run.losses)} "
        f"steps (chance level is ln {run.num_classes} = {fmt(run.expected_initial_loss)})",
        "run `dragon doctor` (it overfits one batch and checks labels and inputs); then try another learning "
        f"rate (optim.lr={fmt(run.recipe.optim.lr / 10)} and {fmt(run.recipe.optim.lr * 10)}) and a standard "
        "initialisation (model.init=auto)",
        {"series": "loss", "initial_loss": run.initial_loss, "final_loss": end},
    )


# --------------------------------------------------------------------- initialisation


def symmetric_layers(initial: dict[str, Any]) -> list[str]:
    """Weight tensors whose output units all start identical: gradients cannot tell them apart."""
    names = []
    for name, weight in initial.items():
        rows = weight.reshape(weight.shape[0], -1).float()
        if rows.shape[0] > 1 and bool((rows - rows[:1]).abs().max() == 0):
            names.append(name)
    return names


@RULES.register("bad_init")
def bad_init(run: RunRecords) -> Finding | None:
    """Zero or symmetric initial weights, or an initial loss far from ln C (weights at the wrong scale)."""
    symmetric = symmetric_layers(run.initial_weights) if run.initial_weights else []
    init = run.recipe.model.init
    if symmetric:
        return Finding(
            "bad_init",
            "error",
            f"bad initialisation: every unit of {', '.join(symmetric[:3])}{' …' if len(symmetric) > 3 else ''} "
            f"starts with the same weights ({init}), so all units get the same gradient and stay identical",
            "use random weights at a variance-preserving scale: model.init=auto (He for ReLU, Xavier for tanh)",
            {"layers": symmetric, "init": init},
        )
    first, expected = run.initial_loss, run.expected_initial_loss
    if first is None or first < 3 * expected:
        return None
    return Finding(
        "bad_init",
        "warning",
        f"bad initialisation: the initial loss {fmt(first)} is far above ln {run.num_classes} = {fmt(expected)} "
        f"(the loss of uniform guesses): the initial weights are too large ({init})",
        "use a variance-preserving initialisation (model.init=auto) or add normalisation layers (model.norm=batch)",
        {"series": "loss", "initial_loss": first, "expected": expected},
    )


# ------------------------------------------------------------------------- gradients


def gradient_ratios(record: dict[str, Any]) -> list[tuple[str, float]]:
    """Per weight tensor in network order: ‖∇W‖ / ‖W‖, the relative size of the gradient."""
    return [
        (name, p["grad_norm"] / p["weight_norm"])
        for name, p in record["params"].items()
        if p["grad_norm"] is not None and p["weight_norm"]
    ]


@RULES.register("vanishing_gradients")
def vanishing_gradients(run: RunRecords) -> Finding | None:
    """The first layers get gradients thousands of times smaller (relative to their weights) than the last."""
    samples = run.layers[: max(3, len(run.layers) // 3)]
    spreads = []
    for record in samples:
        ratios = gradient_ratios(record)
        if len(ratios) >= 3 and ratios[-1][1] > 0:
            spreads.append((ratios[0][1] / ratios[-1][1], record, ratios))
    if not spreads:
        return None
    spread, record, ratios = sorted(spreads, key=lambda s: s[0])[len(spreads) // 2]  # the median sample
    if spread >= 1e-3:
        return None
    return Finding(
        "vanishing_gradients",
        "warning",
        f"vanishing gradients: relative to its weights, {ratios[0][0]} gets a gradient {1 / max(spread, 1e-30):.0e} "
        f"times smaller than {ratios[-1][0]} (step {record['step']})",
        "use a non-saturating activation (model.activation=relu), normalisation layers (model.norm=batch), "
        "a variance-preserving initialisation (model.init=auto) or residual connections (model.name=resnet)",
        {"series": "grad_norm / weight_norm", "step": record["step"], "ratios": dict(ratios)},
    )


@RULES.register("exploding_gradients")
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
        where = f"the gradient norm became NaN/Inf at step {non_finite[0]}"
    elif huge:
        step, name, ratio = max(huge, key=lambda h: h[2])
        where = f"at step {step} the gradient of {name} is {ratio:.3g}× the norm of its weights (healthy: ≪ 1)"
    elif peak >= 100 * typical:
        where = f"the gradient norm reached {fmt(peak)} at step {step}, {peak / typical:.0f}× its median {fmt(typical)}"
    else:
        return None
    return Finding(
        "exploding_gradients",
        "warning",
        f"exploding gradients: {where}",
        "clip gradients (regularize.clip_grad_norm=1.0), use a variance-preserving initialisation "
        f"(model.init=auto), add normalisation layers (model.norm=batch) or lower the learning rate "
        f"(optim.lr={fmt(run.recipe.optim.lr / 10)})",
        {"series": "grad_norm", "step": step, "peak": peak, "median": typical if norms else None,
         "layers": [{"step": s, "layer": n, "grad_over_weight": r} for s, n, r in huge[:10]]},
    )  # fmt: skip


# ------------------------------------------------------------------------ activations


@RULES.register("dead_units")
def dead_units(run: RunRecords) -> Finding | None:
    """ReLU channels that output zero for every probe image: they no longer learn."""
    if not run.layers:
        return None
    dead = dead_layers(run.layers[-1], 0.4)
    if not dead:
        return None
    worst = max(dead, key=dead.__getitem__)
    return Finding(
        "dead_units",
        "warning",
        f"dead units: {pct(dead[worst])} of the ReLU channels in {worst} output zero for every probe image "
        f"(step {run.layers[-1]['step']}){f' and {len(dead) - 1} more layers' if len(dead) > 1 else ''}",
        "lower the learning rate (optim.lr="
        f"{fmt(run.recipe.optim.lr / 10)}), use a leaky activation (model.activation=leaky_relu) or "
        "normalisation layers (model.norm=batch)",
        {"series": "dead", "step": run.layers[-1]["step"], "layers": dead},
    )


@RULES.register("saturated_activations")
def saturated_activations(run: RunRecords) -> Finding | None:
    """Sigmoid/tanh outputs stuck near their limits, where the gradient is almost zero."""
    if not run.layers:
        return None
    recent = run.layers[-max(1, len(run.layers) // 4) :]
    fractions: dict[str, list[float]] = {}
    for record in recent:
        for name, a in record["activations"].items():
            if a.get("saturated") is not None:
                fractions.setdefault(name, []).append(a["saturated"])
    saturated = {n: statistics.mean(v) for n, v in fractions.items() if statistics.mean(v) >= 0.3}
    if not saturated:
        return None
    worst = max(saturated, key=saturated.__getitem__)
    return Finding(
        "saturated_activations",
        "warning",
        f"saturated activations: {pct(saturated[worst])} of the outputs of {worst} "
        f"({run.recipe.model.activation}) sit where its gradient is below 0.02",
        "use ReLU-family activations (model.activation=relu), normalise inputs (preprocess.name=standardize) and "
        "layers (model.norm=batch), and a Xavier-scaled initialisation (model.init=auto)",
        {"series": "saturated", "layers": saturated},
    )


# ------------------------------------------------------------------------------ data


@RULES.register("unnormalised_inputs")
def unnormalised_inputs(run: RunRecords) -> Finding | None:
    """The network's input (after preprocessing) is far from zero mean and unit scale."""
    probes = run.kind("probe")
    if not probes:
        return None
    probe = probes[0]
    mean, std = probe["mean"], probe["std"]
    if input_problem(probe) is None:
        return None
    return Finding(
        "unnormalised_inputs",
        "warning",
        f"unnormalised inputs: after preprocessing ({run.recipe.preprocess.name}) the network sees mean "
        f"{fmt(mean)} and standard deviation {fmt(std)} (want ≈ 0 and ≈ 1)",
        "zero-centre and scale the inputs: preprocess.name=standardize (per channel, from the training split)",
        {"series": "probe", "mean": mean, "std": std, "min": probe["min"], "max": probe["max"]},
    )


@RULES.register("labels_mismatch")
def labels_mismatch(run: RunRecords) -> Finding | None:
    """Training accuracy rises, validation stays at chance: the labels do not belong to the images."""
    if len(run.val) < 3:
        return None
    best_val = max(r["accuracy"] for r in run.val)
    train = run.final("train", "accuracy") or 0.0
    n_val = max(run.data.get("num_val", 1), 1)
    band = run.chance + 3 * math.sqrt(run.chance * (1 - run.chance) / n_val)  # chance + 3σ of a guess
    train_fell = run.train[-1]["loss"] <= 0.9 * run.train[0]["loss"]
    val_stayed = run.val[-1]["loss"] >= 0.97 * run.val[0]["loss"]
    if best_val > band or not (train >= run.chance + 0.15 or (train_fell and val_stayed)):
        return None
    return Finding(
        "labels_mismatch",
        "error",
        f"labels do not match the inputs: the training loss fell from {fmt(run.train[0]['loss'])} to "
        f"{fmt(run.train[-1]['loss'])} (accuracy {pct(train)}) but the best validation accuracy is {pct(best_val)}, "
        f"chance level ({pct(run.chance)}): the network memorises, it does not generalise",
        "check that labels and images are paired (shuffled together, read from the same order); "
        "`dragon doctor` measures how often an image's nearest neighbour has its label",
        {"series": "accuracy", "train_accuracy": train, "best_val_accuracy": best_val, "chance": run.chance},
    )


def expected_distinct_classes(counts: list[int], batch: int) -> float:
    """Expected number of different classes in a random batch of `batch` training images."""
    total = sum(counts)
    return sum(1 - (1 - c / total) ** batch for c in counts if c)


@RULES.register("unshuffled_data")
def unshuffled_data(run: RunRecords) -> Finding | None:
    """Batches hold far fewer classes than random batches would: the data is ordered by label."""
    seen = [r["batch_classes"] for r in run.steps if r.get("batch_classes")]
    counts = run.data.get("train_class_counts")
    if len(seen) < 5 or not counts:
        return None
    expected = expected_distinct_classes(counts, run.recipe.train.batch_size)
    observed = statistics.median(seen)
    if observed >= 0.5 * expected or expected < 2:
        return None
    return Finding(
        "unshuffled_data",
        "warning",
        f"data ordered by label: a batch holds {observed:g} class(es) on median where a random batch of "
        f"{run.recipe.train.batch_size} would hold {expected:.1f}",
        "shuffle the training data every epoch (train.shuffle=true)",
        {"series": "batch_classes", "median": observed, "expected": expected},
    )


@RULES.register("class_imbalance")
def class_imbalance(run: RunRecords) -> Finding | None:
    """The largest class has many times the images of the smallest."""
    counts = run.data.get("train_class_counts") or []
    present = [c for c in counts if c]
    if len(present) < 2 or max(present) < 3 * min(present):
        return None
    epochs = run.kind("epoch")
    per_class = epochs[-1]["per_class_accuracy"] if epochs else []
    classes = run.data["classes"]
    small = min(range(len(counts)), key=lambda i: counts[i] if counts[i] else math.inf)
    worst = ""
    if per_class:
        known = [(a, i) for i, a in enumerate(per_class) if a is not None]
        accuracy, index = min(known)
        worst = f"; the worst validation accuracy is {pct(accuracy)} on class {classes[index]!s}"
    balanced = run.recipe.train.class_weights != "none" or run.recipe.data.balance != "none"
    return Finding(
        "class_imbalance",
        "info" if balanced else "warning",
        f"class imbalance: {max(present)} training images in the largest class, {min(present)} in the smallest "
        f"({classes[small]!s}){worst}",
        f"already balanced (data.balance={run.recipe.data.balance}, train.class_weights="
        f"{run.recipe.train.class_weights}); judge by balanced accuracy and per-class recall" if balanced else
        "balance the classes (data.balance=oversample, undersample, class_weights or two_stage; "
        "augment.rare_class_boost=0.5 for extra crops of rare classes) and judge by balanced accuracy and "
        "per-class recall (result.json, dragon eval)",
        {"counts": counts, "per_class_accuracy": per_class},
    )  # fmt: skip


# ------------------------------------------------------------------- fit and the gap


STRONG_REGULARISATION = (
    ("model.dropout", lambda r: r.model.dropout >= 0.6),
    ("optim.weight_decay", lambda r: r.optim.weight_decay >= 5e-3),
    ("regularize.strength", lambda r: r.regularize.penalty != "none" and r.regularize.strength >= 1e-3),
    ("train.label_smoothing", lambda r: r.train.label_smoothing >= 0.3),
    ("model.spatial_dropout", lambda r: r.model.spatial_dropout >= 0.3),
    ("model.dropconnect", lambda r: r.model.dropconnect >= 0.6),
)


def dotted(recipe: Recipe, key: str) -> Any:
    value: Any = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def strong_regularisation(recipe: Recipe) -> list[str]:
    return [key for key, strong in STRONG_REGULARISATION if strong(recipe)]


def fit_gap(run: RunRecords) -> tuple[float, float, float] | None:
    """(train accuracy, validation accuracy, gap) of the final model: what training led to."""
    if not run.val or not run.train:
        return None
    train, val = run.train[-1]["accuracy"], run.val[-1]["accuracy"]
    return train, val, train - val


@RULES.register("over_regularisation")
def over_regularisation(run: RunRecords) -> Finding | None:
    """Strong regularisation keeps the training accuracy low, below validation."""
    strong, gap = strong_regularisation(run.recipe), fit_gap(run)
    if not strong or gap is None:
        return None
    train, val, difference = gap
    if train > 0.9 and difference > -0.02:
        return None
    knobs = ", ".join(f"{k}={dotted(run.recipe, k)}" for k in strong)
    return Finding(
        "over_regularisation",
        "warning",
        f"over-regularised: training accuracy {pct(train)} vs validation {pct(val)} with {knobs}",
        "regularise less: " + " ".join(f"{k}=<smaller>" for k in strong),
        {"series": "accuracy", "train_accuracy": train, "val_accuracy": val, "knobs": strong},
    )


@RULES.register("underfitting")
def underfitting(run: RunRecords) -> Finding | None:
    """Low training accuracy and no gap: the model cannot fit even its training data."""
    gap = fit_gap(run)
    if gap is None or strong_regularisation(run.recipe) or run.kind("diverged"):
        return None
    train, val, difference = gap
    if train >= 0.85 or val <= run.chance + 0.1 or abs(difference) > 0.05:
        return None
    quarter = run.train[-max(2, len(run.train) // 4) :]
    if quarter[-1]["accuracy"] - quarter[0]["accuracy"] >= 0.03:
        return None  # still climbing: not converged yet rather than too small (lr_too_low covers slow runs)
    return Finding(
        "underfitting",
        "warning",
        f"underfitting: training accuracy {pct(train)} and validation {pct(val)} are both low, with no gap",
        "increase capacity (model.widths, model.depth, model.name=resnet), train longer "
        f"(train.epochs={run.recipe.train.epochs * 2}) or regularise less",
        {"series": "accuracy", "train_accuracy": train, "val_accuracy": val},
    )


@RULES.register("overfitting")
def overfitting(run: RunRecords) -> Finding | None:
    """Training accuracy far above validation accuracy."""
    gap = fit_gap(run)
    if gap is None:
        return None
    train, val, difference = gap
    if difference < 0.1 or val <= run.chance + 0.1:
        return None
    return Finding(
        "overfitting",
        "warning",
        f"overfitting: training accuracy {pct(train)} vs validation {pct(val)}, a gap of {pct(difference)}",
        "regularise more (model.dropout=0.5, optim.weight_decay=5e-4), augment more (augment.crop.p=1.0 "
        "augment.hflip.p=0.5 if flips keep the class), or get more data",
        {"series": "accuracy", "train_accuracy": train, "val_accuracy": val, "gap": difference},
    )


@RULES.register("overtraining")
def overtraining(run: RunRecords) -> Finding | None:
    """Validation loss rising for several epochs while the training loss keeps falling."""
    if len(run.val) < 6:
        return None
    best = min(run.val, key=lambda r: r["loss"])
    after = [r for r in run.val if r["epoch"] > best["epoch"]]
    final_val = run.val[-1]["loss"]
    train_at_best = next(r["loss"] for r in run.train if r["epoch"] == best["epoch"])
    if len(after) < 3 or final_val < 1.2 * best["loss"] or run.train[-1]["loss"] >= train_at_best:
        return None
    stopped = run.recipe.train.early_stopping.patience is not None and run.val[-1]["epoch"] < run.recipe.train.epochs
    return Finding(
        "overtraining",
        "info" if stopped else "warning",
        f"over-training: the validation loss was lowest ({fmt(best['loss'])}) at epoch {best['epoch']} and rose to "
        f"{fmt(final_val)} by epoch {run.val[-1]['epoch']} while the training loss kept falling"
        + ("; early stopping ended the run and `best` holds the best epoch" if stopped else ""),
        "keep the best checkpoint (checkpoints/best) and stop earlier: train.early_stopping.patience=5 "
        f"or train.epochs={best['epoch'] + 2}",
        {"series": "val loss", "best_epoch": best["epoch"], "best_loss": best["loss"], "final_loss": final_val},
    )


@RULES.register("val_better_than_train")
def val_better_than_train(run: RunRecords) -> Finding | None:
    """Validation clearly beats training with no strong regularisation to explain it."""
    gap = fit_gap(run)
    if gap is None or strong_regularisation(run.recipe):
        return None
    train, val, difference = gap
    if difference > -0.1 or train < 0.5:
        return None  # below 0.5 the training itself is broken: other findings say why
    return Finding(
        "val_better_than_train",
        "warning",
        f"validation better than training: {pct(val)} vs {pct(train)}",
        "check for leakage (the same images in both splits: `dragon doctor`), and for augmentation or mixing "
        "so strong that training images no longer look like the data (augment.*)",
        {"series": "accuracy", "train_accuracy": train, "val_accuracy": val},
    )


# ------------------------------------------------------------------------ noise, batch


def loss_floor(num_classes: int, smoothing: float) -> float:
    """The lowest cross-entropy reachable with label smoothing ε: the entropy of the smoothed target."""
    if smoothing <= 0:
        return 0.0
    hit, miss = 1 - smoothing + smoothing / num_classes, smoothing / num_classes
    return -(hit * math.log(hit) + (num_classes - 1) * miss * math.log(miss))


@RULES.register("noisy_loss")
def noisy_loss(run: RunRecords) -> Finding | None:
    """Step-to-step loss swings large against the loss still to lose: the batch is too small."""
    losses, smooth = run.losses, run.smoothed_losses
    if len(losses) < 40 or run.kind("diverged"):
        return None
    lo, hi = len(losses) // 4, 3 * len(losses) // 4  # the middle half: past the first drop, before the end
    floor = loss_floor(run.num_classes, run.recipe.train.label_smoothing)
    swing = statistics.median(abs(a - b) for a, b in zip(losses[lo:hi], smooth[lo:hi], strict=True))
    excess = statistics.median(max(b - floor, 1e-8) for b in smooth[lo:hi])
    noise = swing / excess
    if noise < 0.3 or excess < 0.02 * run.expected_initial_loss:
        return None  # a loss at its floor swings by little in absolute terms: that is convergence
    batch = run.recipe.train.batch_size
    return Finding(
        "noisy_loss",
        "warning",
        f"loss curve too noisy: a step's loss is typically {pct(noise)} of the remaining loss away from the "
        f"running median (batch size {batch})",
        f"use a larger batch (train.batch_size={batch * 4}, the learning rate follows by optim.lr_scaling=linear) "
        "or accumulate gradients (train.accumulate_steps=4)",
        {"series": "loss", "relative_noise": noise, "loss_floor": floor, "batch_size": batch},
    )


@RULES.register("noise_scale")
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
        "noise_scale",
        "info",
        f"gradient noise scale ≈ {scale:.0f} images: the batch size {batch} is {relation} it",
        "batches up to about the noise scale train in fewer steps at the same cost per image; beyond it they waste "
        "compute",
        {"series": "noise", "noise_scale": scale, "batch_size": batch, "samples": len(samples)},
    )


# ----------------------------------------------------------------------------- entry


def diagnose(run: str | Path | RunRecords, *, rules: Sequence[str] | None = None) -> list[Finding]:
    """Every finding of a run folder (or its loaded records), errors first."""
    records = run if isinstance(run, RunRecords) else RunRecords.load(run)
    findings = [f for name in rules or RULES.names() if (f := RULES.get(name)(records)) is not None]
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.key in SYMPTOMS, f.key))


def print_findings(console: Console, findings: Sequence[Finding], *, with_info: bool) -> None:
    """One finding per line with its advice below; user text (class names, paths) is escaped for rich."""
    colours = {"error": "red", "warning": "yellow", "info": "blue"}
    for finding in findings:
        if with_info or finding.severity != "info":
            console.print(
                f"[{colours[finding.severity]}]{finding.severity}[/] [bold]{finding.key}[/]: {escape(finding.verdict)}"
            )
            console.print(f"  try: {escape(finding.advice)}", soft_wrap=True)
    if not any(f.severity != "info" for f in findings):
        console.print("[green]the dragon found no problems[/]")
