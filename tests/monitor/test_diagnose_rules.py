"""Rule mechanisms on hand-made run records: what evidence each rule uses and how it is judged against
chance, a model-free baseline (nearest-neighbour label agreement) and the run's own numbers."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import nn

from dragontrainer.monitor.diagnose import RULES, RunRecords
from dragontrainer.monitor.diagnose.generalisation import milder, plateaued
from dragontrainer.monitor.diagnose.initialisation import init_scale
from dragontrainer.monitor.stats import Monitor
from dragontrainer.recipe import MonitorSpec, Recipe


def records(
    train: list[float], val: list[float], *, classes: int = 8, n: int = 640, knn: float | None = 0.98,
    overrides: tuple[str, ...] = (), weights: dict[str, torch.Tensor] | None = None,
    extra: list[dict[str, Any]] = (),
) -> RunRecords:  # fmt: skip
    """A run whose eval-mode training accuracy and validation accuracy follow `train` and `val` per epoch."""
    metrics = []
    for epoch, (t, v) in enumerate(zip(train, val, strict=True), 1):
        metrics.append({"split": "train", "epoch": epoch, "loss": 1.0, "accuracy": t, "eval_accuracy": t,
                        "eval_images": 512, "lr": 0.1})  # fmt: skip
        metrics.append({"split": "val", "epoch": epoch, "loss": 1.0, "accuracy": v})
    stats: list[dict[str, Any]] = list(extra)
    if knn is not None:
        numbers = {"agreement": knn, "chance": 1 / classes, "queries": n // 4}
        stats.append({"kind": "checks", "step": 0, "checks": {"label_consistency": {"numbers": numbers}}})
    data = {"classes": [str(c) for c in range(classes)], "train_class_counts": [n // classes] * classes,
            "num_train": n, "num_val": n // 4}  # fmt: skip
    return RunRecords(Recipe.load(overrides=list(overrides)), data, metrics, stats, weights)


def noise_record(rate: float) -> dict[str, Any]:
    return {"kind": "label_noise", "step": 1, "rate": rate, "issues": int(640 * rate), "images": 640,
            "clean_agreement": 0.95}  # fmt: skip


def test_a_label_noise_rate_the_neighbours_refute_is_a_weak_model_not_bad_labels() -> None:
    rule = RULES.get("label_noise")
    weak = records([0.6] * 6, [0.55] * 6, knn=0.98, extra=[noise_record(0.23)])
    assert rule(weak) is None  # 23% wrong labels would cap pixel neighbours' agreement near 77%, not 98%
    noisy = records([0.66] * 6, [0.64] * 6, knn=0.5, extra=[noise_record(0.3)])
    found = rule(noisy)
    assert found is not None and found.strong and "30%" in found.verdict


def mlp_weights(widths: list[int], inputs: int = 256, classes: int = 8) -> dict[str, torch.Tensor]:
    sizes = [inputs, *widths, classes]
    return {f"layer{i}": torch.randn(b, a) / math.sqrt(a) for i, (a, b) in enumerate(itertools.pairwise(sizes))}


def test_a_layer_narrower_than_the_classes_makes_underfitting_strong_even_at_chance() -> None:
    rule = RULES.get("underfitting")
    mlp = ("model.name=mlp", "model.widths=[3]")
    at_chance = records([0.15, 0.18, 0.19, 0.2], [0.17, 0.2, 0.2, 0.21], classes=6, knn=0.4, overrides=mlp,
                        weights=mlp_weights([3], classes=6))  # fmt: skip
    found = rule(at_chance)
    assert found is not None and found.strong and "3 units for 6 classes" in found.verdict
    assert found.overrides == ["model.widths=[6]"]  # at least one unit per class
    labels_random = records([0.15, 0.18, 0.19, 0.2], [0.17, 0.2, 0.2, 0.21], classes=6, knn=0.17,
                            weights=mlp_weights([3], classes=6))  # fmt: skip
    assert rule(labels_random) is None  # neighbours disagree too: the labels, not the width, are the problem
    wide = records([0.15, 0.18, 0.19, 0.2], [0.17, 0.2, 0.2, 0.21], classes=6, weights=mlp_weights([64], classes=6))
    assert wide.bottleneck is None and rule(wide) is None  # at chance without a bottleneck: something else


def test_a_plateau_is_judged_best_against_best_not_on_two_noisy_epochs() -> None:
    climbing = records([0.2, 0.27, 0.48, 0.57, 0.59, 0.69, 0.71, 0.72], [0.5] * 8)  # a flat pair mid-run
    assert not plateaued(climbing)
    flat = records([0.3, 0.5, 0.58, 0.6, 0.6, 0.59, 0.61, 0.6], [0.5] * 8)
    assert plateaued(flat)
    underfit = records([0.3, 0.5, 0.58, 0.6, 0.6, 0.59, 0.61, 0.6], [0.3, 0.5, 0.57, 0.58, 0.58, 0.57, 0.59, 0.58])
    climbing_run = records([0.2, 0.27, 0.48, 0.57, 0.59, 0.69, 0.71, 0.72], [0.2, 0.28, 0.48, 0.55, 0.56, 0.63, 0.67,
                                                                            0.66])  # fmt: skip
    assert RULES.get("underfitting")(underfit) is not None
    assert RULES.get("underfitting")(climbing_run) is None


@pytest.mark.parametrize(("activation", "gain"), [("relu", 2.0), ("sigmoid", 1.0), ("tanh", 1.0)])
def test_init_scale_is_one_at_the_activations_variance_preserving_scale(activation: str, gain: float) -> None:
    torch.manual_seed(0)
    weights = {f"w{i}": torch.randn(256, fan_in) * math.sqrt(gain / fan_in) for i, fan_in in enumerate([64, 256, 512])}
    assert init_scale(weights, activation) == pytest.approx(1.0, abs=0.05)
    assert init_scale({k: 3 * w for k, w in weights.items()}, activation) == pytest.approx(3.0, abs=0.15)


def test_overfitting_counts_a_smaller_gap_once_the_training_images_are_memorised() -> None:
    rule = RULES.get("overfitting")
    memorised = records([0.9, 1.0, 1.0], [0.85, 0.92, 0.927], classes=10, n=600)  # 150 validation images
    assert rule(memorised) is not None
    converged = records([0.99, 1.0, 1.0], [0.98, 0.985, 0.985], classes=10, n=40000)  # 1.5 points: fine
    assert rule(converged) is None
    not_memorised = records([0.8, 0.9, 0.95], [0.8, 0.86, 0.88], classes=10, n=600)
    assert rule(not_memorised) is None  # 7 points while still fitting: within what matters


def test_milder_regularisation_never_repeats_the_current_value() -> None:
    usual = Recipe.load(overrides=["optim.weight_decay=5e-4", "model.dropout=0.9"])
    assert milder(usual, "optim.weight_decay") is None  # too strong per step only through the learning rate
    assert milder(usual, "model.dropout") == "model.dropout=0.3"


def test_the_initial_loss_is_measured_without_dropout_and_leaves_the_model_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.9), nn.Linear(32, 4))
    probe, labels = torch.randn(64, 16), torch.randint(4, (64,))
    monitor = Monitor(model, MonitorSpec(), steps_per_epoch=10, probe=probe, noise_batch=None,
                      criterion=nn.CrossEntropyLoss())  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = monitor.initial_loss(labels)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # batch-norm running statistics included
    reference = nn.Sequential(*list(model)[:3], list(model)[4]).train()  # dropout left out, batch norm in train mode
    with torch.no_grad():
        assert loss == pytest.approx(float(nn.functional.cross_entropy(reference(probe), labels)), rel=1e-5)


def layer_record(step: int, update_ratio: float) -> dict[str, Any]:
    return {"kind": "layers", "step": step, "epoch": 1, "activations": {},
            "params": {"w": {"update_ratio": update_ratio, "grad_norm": 1.0, "weight_norm": 10.0}}}  # fmt: skip


@pytest.mark.parametrize(("lr", "update_ratio", "fires"), [(0.2, 0.04, True), (0.2, 1e-3, False), (1e-5, 1e-6, True)])
def test_an_off_range_rate_counts_when_its_updates_are_off_the_same_way(
    lr: float, update_ratio: float, fires: bool
) -> None:
    """Adam at SGD's rate: each step moves the weights by 4% — the rate's own effect, measured."""
    run = records([0.9] * 3, [0.9] * 3, overrides=("optim.name=adam", f"optim.lr={lr}"),
                  extra=[layer_record(s, update_ratio) for s in (1, 20, 40)])  # fmt: skip
    found = RULES.get("lr_off_range")(run)
    assert (found is not None) == fires
    if found:
        assert found.overrides == ["optim.lr=auto"] and found.strong


def test_the_fit_compares_the_latest_probed_epoch_with_the_same_epoch_s_validation() -> None:
    """The eval-mode probe runs at every 2nd validation and the last epoch; a run stopped after an epoch
    without it is judged on its latest probed epoch, against that epoch's validation, not the last one."""
    run = records([0.5, 0.9, 0.95], [0.4, 0.8, 0.3])
    del run.train[-1]["eval_accuracy"]  # epoch 3 ran no probe
    assert run.fit is not None and run.fit.eval_mode
    assert (run.fit.train, run.fit.val) == (0.9, 0.8)
