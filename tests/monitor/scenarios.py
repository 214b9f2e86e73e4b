"""The diagnosis scenario suite: a healthy control on the digits plus one recipe change per problem.

Each scenario names the finding key the diagnosis must produce; the control must produce no
warning or error. `python -m tests.monitor.scenarios [NAME ...]` trains them and prints every
finding (how the thresholds in dragontrainer/monitor/diagnose.py were checked).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# small and quick, yet a real conv net that reaches ~97% on the digits
CONTROL = ["model.widths=[16,32,32]", "train.epochs=12", "schedule.warmup_epochs=1"]


@dataclass(frozen=True)
class Scenario:
    name: str
    overrides: list[str]
    expect: str | None  # the finding key; None for the healthy control
    data: str | None = None  # a data maker below, for problems that live in the data
    base: list[str] = field(default_factory=lambda: list(CONTROL))


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images * 255 / 16).round().astype(np.uint8), bunch.target.astype(np.int64)


def shuffled_labels(folder: Path) -> list[str]:
    x, y = digits()
    np.savez(folder / "shuffled.npz", x=x, y=np.random.default_rng(0).permutation(y))
    return ["data.source=npz", f"data.path={folder / 'shuffled.npz'}"]


def sorted_by_label(folder: Path) -> list[str]:
    x, y = digits()
    order = np.argsort(y, kind="stable")
    np.savez(folder / "sorted.npz", x=x[order], y=y[order])
    return ["data.source=npz", f"data.path={folder / 'sorted.npz'}"]


def imbalanced(folder: Path) -> list[str]:
    x, y = digits()
    keep = np.concatenate([np.flatnonzero(y == c)[: 170 if c < 5 else 25] for c in range(10)])
    np.savez(folder / "imbalanced.npz", x=x[keep], y=y[keep])
    return ["data.source=npz", f"data.path={folder / 'imbalanced.npz'}"]


def noisy_labels(folder: Path) -> list[str]:
    """30% of the labels replaced by random ones: memorising them is overfitting by construction."""
    x, y = digits()
    rng = np.random.default_rng(0)
    flip = rng.random(len(y)) < 0.3
    y = np.where(flip, rng.integers(0, 10, len(y)), y)
    np.savez(folder / "noisy.npz", x=x, y=y)
    return ["data.source=npz", f"data.path={folder / 'noisy.npz'}"]


DATA = {
    "noisy_labels": noisy_labels,
    "shuffled_labels": shuffled_labels,
    "sorted_by_label": sorted_by_label,
    "imbalanced": imbalanced,
}
NO_NORM = ["model.norm=none"]
# an unregularised, unaugmented MLP with Adam: it memorises quickly
SMALL_DATA_MLP = ["model.name=mlp", "model.widths=[1024]", "optim.name=adam", "optim.lr=1e-3", "optim.weight_decay=0",
                  "train.label_smoothing=0", "train.batch_size=32", "schedule.name=constant",
                  "train.early_stopping.patience=null", "augment.crop.p=0"]  # fmt: skip

# memorising 30% wrong labels: training accuracy climbs, validation falls back, its loss rises
MEMORISE = [*SMALL_DATA_MLP, "model.widths=[2048]", "optim.lr=3e-3", "train.epochs=60", "data.val_fraction=0.5"]

SCENARIOS = [
    Scenario("healthy", [], None),
    Scenario("diverged", [*NO_NORM, "optim.lr=20"], "diverged"),
    Scenario("nan_rollback", [*NO_NORM, "optim.lr=20", "monitor.on_nan=rollback"], "nan_rollback"),
    Scenario("lr_too_high", [*NO_NORM, "optim.lr=1.0"], "lr_too_high"),
    Scenario("lr_too_low", ["optim.lr=1e-5"], "lr_too_low"),
    Scenario("loss_not_decreasing", ["optim.lr=1e-7"], "loss_not_decreasing"),
    Scenario("zero_init", ["model.init=zeros"], "bad_init"),
    Scenario("large_init", [*NO_NORM, "model.init=normal", "model.init_std=1.0"], "bad_init"),
    Scenario("vanishing", ["model.name=mlp", "model.widths=[64,64,64,64,64,64,64,64]", "model.activation=sigmoid",
                           *NO_NORM, "model.init=xavier"], "vanishing_gradients"),
    Scenario("exploding", ["model.name=mlp", "model.widths=[256,256,256,256,256,256,256,256]", *NO_NORM,
                           "model.init=normal", "model.init_std=0.15", "optim.lr=0.001"], "exploding_gradients"),
    Scenario("dead_units", [*NO_NORM, "optim.lr=0.5"], "dead_units"),
    Scenario("saturated", ["model.activation=sigmoid", *NO_NORM, "model.init=normal", "model.init_std=0.5"],
             "saturated_activations"),
    Scenario("unnormalised", ["preprocess.name=none"], "unnormalised_inputs"),
    Scenario("labels_mismatch", [*SMALL_DATA_MLP, "data.val_fraction=0.5", "train.epochs=30"], "labels_mismatch",
             data="shuffled_labels"),
    Scenario("unshuffled", ["train.shuffle=false"], "unshuffled_data", data="sorted_by_label"),
    Scenario("underfitting", ["model.name=mlp", "model.widths=[3]", "train.label_smoothing=0"], "underfitting"),
    Scenario("overfitting", MEMORISE, "overfitting", data="noisy_labels"),
    Scenario("overtraining", MEMORISE, "overtraining", data="noisy_labels"),
    Scenario("over_regularised", ["model.dropout=0.9", "optim.weight_decay=0.05"], "over_regularisation"),
    Scenario("val_better", ["augment.mixup.p=1.0"], "val_better_than_train"),
    Scenario("noisy", ["train.batch_size=8"], "noisy_loss"),
    Scenario("imbalanced", [], "class_imbalance", data="imbalanced"),
]  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}


def run_scenario(scenario: Scenario, folder: Path) -> list[dict]:
    """Train the scenario into `folder/run` (its report included) and return its findings."""
    from dragontrainer import train
    from dragontrainer.train.loop import TrainingDiverged

    data = DATA[scenario.data](folder) if scenario.data else []
    overrides = [*scenario.base, *data, *scenario.overrides, f"run.dir={folder / 'run'}"]
    try:
        return train(overrides=overrides).findings
    except TrainingDiverged:
        import json

        return json.loads((folder / "run" / "findings.json").read_text())


if __name__ == "__main__":
    import tempfile
    import time

    for name in sys.argv[1:] or list(BY_NAME):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            found = run_scenario(BY_NAME[name], Path(tmp))
            keys = [f["key"] for f in found if f["severity"] != "info"]
            ok = (BY_NAME[name].expect in keys) if BY_NAME[name].expect else not keys
            print(f"== {name} ({time.perf_counter() - started:.1f} s) {'OK' if ok else 'MISSED'}")
            for f in found:
                print(f"   {f['severity']:7} {f['key']}: {f['verdict']}")
