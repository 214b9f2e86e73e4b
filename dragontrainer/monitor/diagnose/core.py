"""The explanation model: findings, the run's records, the rule registry and the ranking.

A rule measures one thing and returns a `Finding` (or nothing). It is registered with the symptoms
its cause *explains* (`unshuffled_data` explains loss spikes and dead units; `bad_init` explains
divergence). Ranking then builds a forest: a finding explained by another present finding is shown
beneath it as its consequence, never above it, and a cause carries the severity of the worst
consequence it explains. Roots are ordered by severity, then strong evidence (a direct measurement
of the cause: a start-of-run check, the recipe plus its measured effect) before inference from
symptoms, then the severity of its own measurement, then how much they explain, then upstream
families first (data, initialisation, optimisation, generalisation) — never alphabetically.

Advice is concrete `key=value` overrides that parse as recipe overrides; `reconcile` keeps one
run's findings consistent (a knob set by a higher-ranked finding is never contradicted below it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from dragontrainer.errors import RunError
from dragontrainer.optim.optimizers import auto_lr, base_lr
from dragontrainer.recipe import Recipe
from dragontrainer.registry import Registry
from dragontrainer.run import RunDir, read_jsonl

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
FAMILIES = ("data", "initialisation", "optimisation", "generalisation")  # upstream first


@dataclass(frozen=True)
class Finding:
    key: str
    severity: Severity
    verdict: str  # one sentence with the measured numbers
    overrides: list[str] = field(default_factory=list)  # what to change: `key=value` recipe overrides
    advice: str = ""  # why, and the alternatives (every `key=value` in it parses too)
    evidence: dict[str, Any] = field(default_factory=dict)  # the series, steps, layers the verdict rests on
    plot: str | None = None  # the report figure that shows the evidence (`PLOTS` in report/html.py)
    strong: bool = False  # the cause was measured directly, not inferred from symptoms
    because: str | None = None  # set by the ranking: the finding whose cause explains this one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Finding:
        return cls(**record)


@dataclass
class RunRecords:
    """The run folder's files, read once; the properties are the series the rules share."""

    recipe: Recipe
    data: dict[str, Any]
    metrics: list[dict[str, Any]]
    stats: list[dict[str, Any]]
    initial_weights: dict[str, Any] | None = None
    preprocess_state: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str | Path) -> RunRecords:
        from dragontrainer.run_files import DataInfo, checked_json, read_tensors

        run = RunDir.open(path)
        data_file = run.file("data.json")
        if not data_file.exists():
            raise RunError(f"{run.path}: no data.json — the run never started training")
        files = [run.file(name) for name in ("init.safetensors", "preprocess.safetensors")]
        initial, preprocess = (read_tensors(f) if f.exists() else None for f in files)
        data = checked_json(data_file, DataInfo)  # a corrupted file is one line naming it
        return cls(run.recipe(), data, run.history(), read_jsonl(run.stats_path), initial, preprocess)

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

    @cached_property
    def checks(self) -> dict[str, dict[str, Any]]:
        """The doctor's cheap checks, run at the start of the run: name -> {status, message, numbers}."""
        records = self.kind("checks")
        return records[-1]["checks"] if records else {}

    def check_numbers(self, name: str) -> dict[str, Any] | None:
        return self.checks.get(name, {}).get("numbers")

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

    @property
    def lr(self) -> float:
        """optim.lr as a number (`auto` resolved per optimiser family), per reference batch."""
        return base_lr(self.recipe.optim)

    @property
    def usual_lr(self) -> float:
        return auto_lr(self.recipe.optim.name)

    @cached_property
    def initial_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @cached_property
    def smoothed_losses(self) -> list[float]:
        return moving_median(self.losses, 9)

    def final(self, split: str, key: str) -> float | None:
        records = self.train if split == "train" else self.val
        return records[-1][key] if records else None

    @cached_property
    def fit(self) -> Fit | None:
        """Training accuracy in eval mode on the fixed probe subset (train-mode accuracy when a run
        predates it) against validation accuracy, at the last epoch: like compared with like."""
        if not self.val or not self.train:
            return None
        # the probe runs at every 2nd validation and the last; a stopped run's last may lack it: the latest
        # probed epoch, against the validation of that same epoch
        last = next((r for r in reversed(self.train) if r.get("eval_accuracy") is not None), self.train[-1])
        eval_mode = last.get("eval_accuracy") is not None
        train = last["eval_accuracy"] if eval_mode else last["accuracy"]
        n_train = last.get("eval_images") or self.data.get("num_train", 1)
        val = (
            next((r for r in reversed(self.val) if r["epoch"] == last["epoch"]), self.val[-1])
            if eval_mode
            else self.val[-1]
        )
        return Fit(train, val["accuracy"], n_train, max(self.data.get("num_val", 1), 1), eval_mode)

    @cached_property
    def neighbours(self) -> dict[str, Any] | None:
        """The start check's nearest-neighbour label agreement on pixels (a model-free measure of how
        much the labels follow the images), with `band`: 3 standard errors of it."""
        knn = self.check_numbers("label_consistency")
        if not knn or knn.get("agreement") is None:
            return None
        a, queries = knn["agreement"], max(knn.get("queries", 1), 1)
        return {**knn, "band": 3 * math.sqrt(max(a * (1 - a), 1 / queries) / queries)}

    @property
    def labels_follow_images(self) -> bool:
        """Nearest neighbours share labels beyond chance (true when not measured)."""
        knn = self.neighbours
        if knn is None:
            return True
        chance = knn["chance"]
        return knn["agreement"] > chance + 3 * math.sqrt(chance * (1 - chance) / max(knn["queries"], 1))

    @cached_property
    def first_loss(self) -> float | None:
        """The loss at initialisation without dropout (the probe record's), else the first step's:
        dropout's 1/(1−p) scaling inflates a training step's loss whatever the initialisation."""
        probes = self.kind("probe")
        measured = probes[0].get("initial_loss") if probes else None
        return measured if measured is not None else self.initial_loss

    @cached_property
    def bottleneck(self) -> int | None:
        """The narrowest dense representation (a hidden layer's units, or the features the classifier
        reads) when it has fewer numbers than there are classes: every image is squeezed through it."""
        dense = [w.shape for w in (self.initial_weights or {}).values() if w.ndim == 2]
        hidden = [s[0] for s in dense if s[0] != self.num_classes]
        features = [s[1] for s in dense if s[0] == self.num_classes]
        narrowest = min([*hidden, *features], default=None)
        return narrowest if narrowest is not None and narrowest < self.num_classes else None

    def above_chance(self, accuracy: float, n: int) -> bool:
        """Accuracy beyond chance by more than 3 standard errors of a guess on `n` images."""
        return accuracy > self.chance + 3 * math.sqrt(self.chance * (1 - self.chance) / max(n, 1))


@dataclass(frozen=True)
class Fit:
    train: float  # eval-mode accuracy on the probe subset of the training split
    val: float
    n_train: int
    n_val: int
    eval_mode: bool

    @property
    def gap(self) -> float:
        return self.train - self.val

    @property
    def noise(self) -> float:
        """3 standard errors of the difference of the two accuracy estimates."""
        var = self.train * (1 - self.train) / self.n_train + self.val * (1 - self.val) / self.n_val
        return 3 * math.sqrt(var)


def moving_median(values: Sequence[float], window: int) -> list[float]:
    half = window // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def fmt(value: float) -> str:
    return f"{value:.3g}"


def pct(value: float) -> str:
    return f"{100 * value:.0f}%"


# ------------------------------------------------------------------------- the registry


Rule = Callable[[RunRecords], Finding | None]
RULES: Registry[Rule] = Registry("diagnosis rule")
EXPLAINS: dict[str, frozenset[str]] = {}  # rule -> the finding keys its cause explains
FAMILY: dict[str, str] = {}
ORDER: dict[str, int] = {}  # registration order: families upstream first


def rule(name: str, family: str, explains: Sequence[str] = ()) -> Callable[[Rule], Rule]:
    """Register a diagnosis rule with the symptoms its cause explains."""
    assert family in FAMILIES, family

    def add(function: Rule) -> Rule:
        RULES.register(name)(function)
        EXPLAINS[name] = frozenset(explains)
        FAMILY[name] = family
        ORDER[name] = FAMILIES.index(family) * 100 + len(ORDER)
        return function

    return add


# -------------------------------------------------------------------------- ranking


def rank(findings: Sequence[Finding]) -> list[Finding]:
    """Causes above the symptoms they explain (depth-first), each explained finding marked `because`."""
    present = {f.key: f for f in findings}
    causes = {k: [c for c in present if c != k and k in EXPLAINS.get(c, ())] for k in present}
    depth: dict[str, int] = {}

    def depth_of(key: str, seen: frozenset[str] = frozenset()) -> int:
        if key not in depth:
            above = [depth_of(c, seen | {key}) + 1 for c in causes[key] if c not in seen]
            depth[key] = max(above, default=0)
        return depth[key]

    def own(key: str) -> int:
        return SEVERITY_ORDER[present[key].severity]

    # the closest cause (deepest in a chain), then strong evidence, then the more severe measurement
    parent = {
        k: max(cs, key=lambda c: (depth_of(c), present[c].strong, -own(c), -ORDER.get(c, 0))) if cs else None
        for k, cs in causes.items()
    }
    children: dict[str | None, list[str]] = {}
    for key, above in parent.items():
        children.setdefault(above, []).append(key)

    def worst(key: str) -> int:
        return min([SEVERITY_ORDER[present[key].severity], *(worst(c) for c in children.get(key, []))])

    def size(key: str) -> int:
        return 1 + sum(size(c) for c in children.get(key, []))

    def order(keys: list[str]) -> list[str]:
        return sorted(keys, key=lambda k: (worst(k), not present[k].strong, own(k), -size(k), ORDER.get(k, 10**6)))

    ranked: list[Finding] = []

    def visit(key: str) -> None:
        finding = present[key]
        severity = next(s for s, o in SEVERITY_ORDER.items() if o == worst(key))
        ranked.append(replace(finding, severity=severity, because=parent[key]))
        for child in order(children.get(key, [])):
            visit(child)

    for root in order(children.get(None, [])):
        visit(root)
    return ranked


def reconcile(findings: Sequence[Finding]) -> list[Finding]:
    """Drop an override that contradicts one of a higher-ranked finding (same knob, other value)."""
    from dragontrainer.recipe import parse_override

    chosen: dict[str, Any] = {}
    kept = []
    for finding in findings:
        keep, dropped = [], []
        for item in finding.overrides:
            key, value = parse_override(item)
            if key in chosen and chosen[key] != value:
                dropped.append(item)
                continue
            chosen[key] = value
            keep.append(item)
        evidence = {**finding.evidence, "overridden_by_higher_finding": dropped} if dropped else finding.evidence
        kept.append(replace(finding, overrides=keep, evidence=evidence))
    return kept


def diagnose(run: str | Path | RunRecords, *, rules: Sequence[str] | None = None) -> list[Finding]:
    """Every finding of a run folder (or its loaded records): causes first, their consequences beneath."""
    records = run if isinstance(run, RunRecords) else RunRecords.load(run)
    findings = [f for name in rules or RULES.names() if (f := RULES.get(name)(records)) is not None]
    return reconcile(rank(findings))
