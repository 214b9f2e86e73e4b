"""The monitor: what stats.jsonl holds, that watching never changes training, the NaN rollback."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dragontrainer import train
from dragontrainer.monitor.stats import activation_summary, confusion_matrix, sample_every
from dragontrainer.recipe import MonitorSpec
from dragontrainer.train.outcomes import TrainingDiverged
from tests.conftest import TINY


def stats(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_stats_file_holds_every_step_sampled_layers_and_epochs(tmp_path: Path) -> None:
    result = train(overrides=[*TINY, "model.name=vgg", "model.widths=[8,8]", f"run.dir={tmp_path}", "monitor.every=5"])
    lines = stats(tmp_path)
    kinds = [r["kind"] for r in lines]
    assert kinds[0] == "probe" and abs(lines[0]["mean"]) < 0.2 and 0.7 < lines[0]["std"] < 1.3
    steps = [r for r in lines if r["kind"] == "step"]
    total_steps = result.history[-1]["step"]
    assert [r["step"] for r in steps] == list(range(1, total_steps + 1))
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 and 1 <= r["batch_classes"] <= 10 for r in steps)
    assert next(r["lr"] for r in steps if r["step"] == total_steps) == pytest.approx(result.history[-2]["lr"])
    layers = [r for r in lines if r["kind"] == "layers"]
    assert [r["step"] for r in layers] == [1, *range(5, total_steps + 1, 5)]
    first = layers[0]
    assert list(first["params"]) == [
        "stem.0",
        "blocks.0.0.0",
        "blocks.1.1.0",
        "blocks.1.2.0",
        "head.3",
    ]  # network order
    assert set(first["activations"]) == {"stem.2", "blocks.0.0.2", "blocks.1.1.2", "blocks.1.2.2"}
    for entry in first["params"].values():
        assert entry["weight_norm"] > 0 and 0 < entry["update_ratio"] < 1
        assert entry["dist_init"] == pytest.approx(entry["update_ratio"], rel=1e-4)  # one step from init
    relu = first["activations"]["stem.2"]
    assert relu["p01"] >= 0 and relu["p01"] <= relu["p50"] <= relu["p99"] and relu["saturated"] is None
    assert any("noise" in r for r in layers)
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert len(epochs) == 3
    confusion = epochs[-1]["confusion"]
    assert sum(map(sum, confusion)) == json.loads((tmp_path / "data.json").read_text())["num_val"]
    correct = sum(confusion[i][i] for i in range(10)) / sum(map(sum, confusion))
    assert correct == pytest.approx(result.val_accuracy)


def test_monitoring_never_changes_training(tmp_path: Path) -> None:
    """Probe passes run in eval mode without gradients; the noise scale uses autograd.grad: the
    weights come out bitwise equal with monitors on and off (mixup's NumPy draws included)."""
    base = [*TINY, "model.name=vgg", "model.widths=[8,8]", "monitor.every=2", "augment.mixup.p=0.5"]
    on = train(overrides=[*base, f"run.dir={tmp_path / 'on'}"])
    off = train(overrides=[*base, "monitor.enabled=false", f"run.dir={tmp_path / 'off'}"])
    a = load_file(str(on.run_dir / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(off.run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (off.run_dir / "stats.jsonl").exists()


def test_dead_and_saturated_fractions() -> None:
    x = torch.zeros(4, 3, 2, 2)
    x[:, 0] = 1.0  # channel 0 alive, channels 1 and 2 never positive
    summary = activation_summary(x, "relu")
    assert summary[7] == pytest.approx(2 / 3)
    assert math.isnan(float(summary[8]))
    sig = torch.sigmoid(torch.tensor([[-10.0, 0.0, 10.0, 0.1]]))
    assert activation_summary(sig, "sigmoid")[8] == pytest.approx(0.5)


def test_confusion_matrix_counts_true_by_predicted() -> None:
    matrix = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_sampling_interval_defaults_to_four_per_epoch_at_most_every_20_steps() -> None:
    assert sample_every(MonitorSpec(), steps_per_epoch=11) == 20
    assert sample_every(MonitorSpec(), steps_per_epoch=1000) == 250
    assert sample_every(MonitorSpec(every=3), steps_per_epoch=1000) == 3


def test_rollback_lowers_the_learning_rate_and_finishes(tmp_path: Path) -> None:
    overrides = [*TINY, "model.norm=none", "optim.lr=50", "monitor.on_nan=rollback", "monitor.max_rollbacks=6",
                 "monitor.rollback_lr_factor=0.01", f"run.dir={tmp_path}"]  # fmt: skip
    result = train(overrides=overrides)
    rollbacks = [r for r in stats(tmp_path) if r["kind"] == "rollback"]
    assert 1 <= len(rollbacks) <= 6
    assert rollbacks[-1]["lr_scale"] == pytest.approx(0.01 ** len(rollbacks))
    assert result.epochs == 3 and math.isfinite(result.train_loss)
    assert [r["epoch"] for r in result.history if r["split"] == "val"] == [1, 2, 3]
    assert "nan_rollback" in {f["key"] for f in result.findings}


def test_rollbacks_are_limited_then_the_run_stops(tmp_path: Path) -> None:
    overrides = [*TINY, "model.norm=none", "optim.lr=100", "monitor.on_nan=rollback", "monitor.max_rollbacks=1",
                 "monitor.rollback_lr_factor=0.5", f"run.dir={tmp_path}"]  # fmt: skip
    with pytest.raises(TrainingDiverged):
        train(overrides=overrides)
    lines = stats(tmp_path)
    assert [r["kind"] for r in lines if r["kind"] in ("rollback", "diverged")] == ["rollback", "diverged"]
    findings = json.loads((tmp_path / "findings.json").read_text())
    assert {"diverged", "nan_rollback"} <= {f["key"] for f in findings}
    assert (tmp_path / "report.html").exists()


def test_non_finite_gradient_with_finite_loss_counts_as_divergence(tmp_path: Path, monkeypatch) -> None:
    """A NaN gradient (here planted by a hook) stops the run even though the loss is finite."""
    from dragontrainer.nn import models

    original = models.create_model

    def poisoned(*args, **kwargs) -> nn.Module:
        model = original(*args, **kwargs)
        model.head.weight.register_hook(lambda grad: grad * float("nan"))
        return model

    monkeypatch.setattr(importlib.import_module("dragontrainer.train.build"), "create_model", poisoned)
    with pytest.raises(TrainingDiverged, match="step 0"):
        train(overrides=[*TINY, f"run.dir={tmp_path}"])
