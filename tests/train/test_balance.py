"""Class imbalance in training: two-stage switch, class-weighted loss, rare-class crops, per-class metrics."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dragontrainer import evaluate_run, train
from dragontrainer.cli import main
from dragontrainer.data.augment import create_augmenter
from dragontrainer.recipe import AugmentSpec
from dragontrainer.train.balance import with_rare_class_boost
from dragontrainer.train.callbacks import Callback
from dragontrainer.train.class_metrics import per_class_metrics, summary_metrics
from tests.conftest import TINY


def imbalanced_npz(path: Path) -> Path:
    """Class 0 ten times as frequent as classes 1 and 2; classes visible as bright rows."""
    rng = np.random.default_rng(0)
    y = np.array([0] * 150 + [1] * 15 + [2] * 15)
    x = rng.integers(0, 60, size=(len(y), 8, 8), dtype=np.uint8)
    for i, label in enumerate(y):
        x[i, label * 2 : label * 2 + 2] += 150
    np.savez(path, x=x, y=y)
    return path


class StemWatcher(Callback):
    def __init__(self, model_getter: Any) -> None:
        self.snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.model_getter = model_getter

    def on_epoch_end(self, state: Any, logs: Any) -> None:
        model = self.model_getter()
        self.snapshots.append((model.stem[1][0].weight.detach().clone(), model.head.weight.detach().clone()))


def test_two_stage_freezes_the_body_from_its_switch_epoch(tmp_path: Path, monkeypatch: Any) -> None:
    loop = importlib.import_module("dragontrainer.train.build")
    models: list[torch.nn.Module] = []
    original = loop.create_model
    monkeypatch.setattr(loop, "create_model", lambda *a, **k: models.append(original(*a, **k)) or models[-1])
    watcher = StemWatcher(lambda: models[-1])
    data = imbalanced_npz(tmp_path / "imb.npz")
    train(overrides=[*TINY, "train.epochs=4", "data.source=npz", f"data.path={data}", "data.balance=two_stage",
                     "data.two_stage_switch=0.5", f"run.dir={tmp_path / 'run'}"], callbacks=[watcher])  # fmt: skip
    stems = [s for s, _ in watcher.snapshots]
    heads = [h for _, h in watcher.snapshots]
    assert not torch.equal(stems[0], stems[1])  # epochs 1–2: balanced draws, everything learns
    assert torch.equal(stems[1], stems[2]) and torch.equal(stems[2], stems[3])  # epochs 3–4: only the head
    assert not torch.equal(heads[2], heads[3])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("balanced_accuracy" in r and "macro_f1" in r for r in lines if r["split"] == "val")


def test_class_weights_mode_weights_the_loss_and_results_have_per_class_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = imbalanced_npz(tmp_path / "imb.npz")
    result = train(overrides=[*TINY, "data.source=npz", f"data.path={data}", "data.balance=class_weights",
                              f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    weights = json.loads((tmp_path / "run" / "data.json").read_text())["class_weights"]
    assert weights[1] > 5 * weights[0]  # N / (C · count): the rare classes weigh ~10× more
    assert [row["class"] for row in result.per_class] == ["0", "1", "2"]
    assert result.best_val_balanced_accuracy is not None
    metrics = evaluate_run(result.run_dir)
    recalls = [row["recall"] for row in metrics["per_class"]]
    assert metrics["balanced_accuracy"] == sum(recalls) / 3
    assert sum(row["support"] for row in metrics["per_class"]) == metrics["images"]
    assert main(["eval", str(result.run_dir)]) == 0
    out = capsys.readouterr().out
    assert "balanced accuracy" in out and "recall" in out


def test_rare_class_crops_touch_only_rare_class_images() -> None:
    spec = AugmentSpec(crop={"p": 0}, rare_class_boost=1.0)
    x = torch.rand(12, 1, 8, 8)
    y = torch.tensor([0] * 10 + [1, 1])
    base = create_augmenter(spec, (1, 8, 8), False, (x * 255).byte(), 2)
    augment = with_rare_class_boost(base, spec, (1, 8, 8), False, (x * 255).byte(), y, 2)
    out, _ = augment(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(out[:10], x[:10]) and not torch.equal(out[10:], x[10:])


def test_balanced_accuracy_and_per_class_rows_from_a_confusion_matrix() -> None:
    confusion = torch.tensor([[90, 10], [5, 5]])  # accuracy 86%, but class 1 is found half the time
    assert summary_metrics(confusion)["balanced_accuracy"] == (0.9 + 0.5) / 2
    rows = per_class_metrics(confusion, ["a", "b"])
    assert rows[1] == {"class": "b", "support": 10, "precision": 5 / 15, "recall": 0.5, "f1": 0.4}
    assert per_class_metrics(torch.tensor([[3, 0], [0, 0]]), ["a", "b"])[1]["recall"] is None
