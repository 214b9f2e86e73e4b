from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.preprocess import create_preprocessor
from dragontrainer.data.sources import ImageSet
from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import PreprocessSpec, Recipe
from dragontrainer.train.multitask import (
    SigmoidLoss,
    Task,
    TaskLoss,
    TaskMeter,
    TaskSet,
    create_criterion,
    evaluate_tasks,
    resolve_tasks,
)


def two_tasks(weights: tuple[float, float] = (1.0, 0.5)) -> TaskSet:
    targets = np.stack([np.arange(8) % 3, np.arange(8) % 2], axis=1)
    return TaskSet([Task("digit", ["0", "1", "2"], weights[0]), Task("odd", ["even", "odd"], weights[1])],
                   targets, sigmoid=False)  # fmt: skip


def test_task_loss_is_the_weighted_sum_of_each_tasks_cross_entropy() -> None:
    tasks = two_tasks()
    logits, targets = torch.randn(8, 5), tasks.target_tensor()
    per_task = TaskLoss(tasks).per_task(logits, targets)
    torch.testing.assert_close(per_task[0], F.cross_entropy(logits[:, :3], targets[:, 0]))
    torch.testing.assert_close(per_task[1], F.cross_entropy(logits[:, 3:], targets[:, 1]))
    torch.testing.assert_close(TaskLoss(tasks)(logits, targets), per_task[0] + 0.5 * per_task[1])


def test_sigmoid_bce_on_a_multilabel_target_matches_the_formula() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # several labels true at once
    p = torch.sigmoid(logits)
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    torch.testing.assert_close(SigmoidLoss()(logits, targets), expected)
    # integer labels are one-hot targets; label smoothing pulls them towards ½
    labels = torch.tensor([0, 2])
    one_hot = F.one_hot(labels, 3).float()
    torch.testing.assert_close(SigmoidLoss(label_smoothing=0.2)(logits, labels),
                               F.binary_cross_entropy_with_logits(logits, one_hot * 0.8 + 0.1))  # fmt: skip
    multilabel = TaskSet([Task("labels", ["a", "b", "c"], multilabel=True)], targets.numpy(), sigmoid=True)
    torch.testing.assert_close(TaskLoss(multilabel)(logits, targets), expected)


def test_meter_and_evaluation_report_each_task() -> None:
    tasks = two_tasks(weights=(1.0, 1.0))
    targets = tasks.target_tensor()
    # a model that gets the digit right for every image and parity right for none
    logits = torch.cat([F.one_hot(targets[:, 0], 3).float() * 9, F.one_hot(1 - targets[:, 1], 2).float() * 9], 1)
    criterion = TaskLoss(tasks)
    meter = TaskMeter(torch.device("cpu"), criterion)
    meter.update(criterion(logits, targets), logits, targets)
    metrics = meter.task_metrics()
    assert metrics["digit"]["accuracy"] == 1.0 and metrics["odd"]["accuracy"] == 0.0
    assert meter.accuracy() == 1.0 and metrics["odd"]["loss"] > 8 > metrics["digit"]["loss"]
    restored = TaskMeter(torch.device("cpu"), criterion)
    restored.load_state_dict(meter.state_dict())
    assert restored.task_metrics() == metrics

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits[(x[:, 0, 0, 0] * 255).round().long()]

    x = torch.arange(8, dtype=torch.uint8).reshape(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous()
    loader = DeviceLoader(x, targets, 3, shuffle=False)
    identity = create_preprocessor(PreprocessSpec(name="none"))
    result = evaluate_tasks(Fixed(), loader, criterion, identity, num_classes=3)
    assert result["accuracy"] == 1.0 and result["balanced_accuracy"] == 1.0 and result["tasks"]["odd"]["accuracy"] == 0
    assert result["loss"] == pytest.approx(result["tasks"]["digit"]["loss"] + result["tasks"]["odd"]["loss"])
    assert np.trace(np.array(result["confusion"])) == 8


def images_with(**labels: np.ndarray) -> ImageSet:
    first = next(iter(labels.values()))
    y = first if first.ndim == 1 else first[:, 0]
    return ImageSet(np.zeros((len(y), 1, 2, 2), np.uint8), y, ["0", "1"], task_labels=labels)


def test_resolve_tasks_by_column_and_by_name(tmp_path: Path) -> None:
    matrix = np.stack([np.arange(6) % 3, np.arange(6) % 2], 1)
    recipe = Recipe().with_overrides(["multitask.tasks=[digit, odd]", "multitask.weights=[1, 0.3]"])
    tasks = resolve_tasks(images_with(y=matrix), recipe)
    assert tasks is not None and [t.name for t in tasks.tasks] == ["digit", "odd"] and tasks.sizes == [3, 2]
    assert [t.weight for t in tasks.tasks] == [1.0, 0.3] and tasks.targets.tolist() == matrix.tolist()
    named = resolve_tasks(images_with(odd=matrix[:, 1], digit=matrix[:, 0]), recipe)
    assert named is not None and named.targets.tolist() == matrix.tolist()  # the recipe's order, not the file's
    assert resolve_tasks(images_with(y=matrix[:, 0]), Recipe()) is None
    multilabel = resolve_tasks(images_with(y=np.eye(3, dtype=np.int64)[[0, 1, 2, 0]]), Recipe().with_overrides(
        ["train.loss=sigmoid"]))  # fmt: skip
    assert multilabel is not None and multilabel.multilabel and multilabel.sizes == [3]
    assert isinstance(create_criterion(Recipe().with_overrides(["train.loss=sigmoid"]), None, None), SigmoidLoss)


@pytest.mark.parametrize(
    ("labels", "overrides", "error", "message"),
    [
        ({"y": np.ones((4, 2), np.int64)}, [], RecipeError, "name its columns in multitask.tasks"),
        ({"y": np.full((4, 2), 2)}, ["train.loss=sigmoid"], DataError, "values must be 0 or 1; found 2"),
        ({"y": np.ones((4, 2), np.int64)}, ["multitask.tasks=[a]"], RecipeError, "names 1 task.s. but y .* 2 col"),
        ({"a": np.arange(4) % 2}, ["multitask.tasks=[a, b]"], RecipeError, "no label array y_b .found: y_a"),
        ({"a": np.arange(4) % 2, "b": np.zeros(4, np.int64)}, ["multitask.tasks=[a, b]"], DataError, "task b: every"),
    ],
)
def test_task_errors_are_one_line(labels: dict, overrides: list[str], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        resolve_tasks(images_with(**labels), Recipe().with_overrides(overrides))


def digits_tasks_npz(path: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images[:400] * 255 / 16).round().astype(np.uint8), digits.target[:400]
    np.savez(path, x=x, y_digit=y, y_odd=y % 2, y_ge5=(y >= 5).astype(np.int64))
    return path


MLP = ["model.name=mlp", "model.widths=[32]", "train.epochs=2", "schedule.warmup_epochs=0", "train.batch_size=64"]


@pytest.mark.parametrize("sharing", ["hard", "soft"])
def test_a_multitask_run_records_every_task_and_eval_and_doctor_read_it(tmp_path: Path, sharing: str) -> None:
    import json

    from dragontrainer import doctor, evaluate_run, train

    data = digits_tasks_npz(tmp_path / "tasks.npz")
    overrides = [*MLP, f"data.path={data}", "multitask.tasks=[digit, odd, ge5]", "multitask.weights=[1, 0.5, 0.5]",
                 f"multitask.sharing={sharing}", "data.test_fraction=0.2", f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = train(overrides=overrides, progress=False)
    assert set(result.tasks["val"]) == set(result.tasks["test"]) == {"digit", "odd", "ge5"}
    assert result.test_accuracy == result.tasks["test"]["digit"]["accuracy"]  # the main task at the top level
    assert [row["class"] for row in result.per_class] == [str(c) for c in range(10)]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert set(line["tasks"]) == {"digit", "odd", "ge5"}
    val = lines[-1]["tasks"]
    weighted = val["digit"]["loss"] + 0.5 * (val["odd"]["loss"] + val["ge5"]["loss"])
    assert lines[-1]["loss"] == pytest.approx(weighted, rel=1e-5)
    scored = evaluate_run(tmp_path / "run")
    assert scored["tasks"]["odd"]["accuracy"] == pytest.approx(result.tasks["test"]["odd"]["accuracy"])
    assert (tmp_path / "run" / "report.html").is_file() and result.findings is not None
    if sharing == "soft":
        return
    checks = doctor(overrides=overrides[:-1])  # the checks run on the main task's labels
    assert {c.name for c in checks.checks} >= {"initial_loss", "gradient_flow", "overfit_batch"}


def test_a_multilabel_run_scores_each_label(tmp_path: Path) -> None:
    from dragontrainer import train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, size=(96, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 2, size=(96, 3))
    for k in range(3):  # label k: a bright row block k, present or not (several at once)
        x[labels[:, k] == 1, 2 * k : 2 * k + 2] += 150
    np.savez(tmp_path / "ml.npz", x=x, y=labels, classes=np.array(["top", "middle", "bottom"]))
    result = train(overrides=[*MLP, "train.epochs=6", f"data.path={tmp_path / 'ml.npz'}", "train.loss=sigmoid",
                              f"run.dir={tmp_path / 'run'}", "monitor.report=false"], progress=False)  # fmt: skip
    assert [row["class"] for row in result.per_class] == ["top", "middle", "bottom"]
    assert result.tasks["val"]["labels"]["accuracy"] > 0.8 and "exact_match" in result.tasks["val"]["labels"]


def test_single_task_runs_are_unchanged_by_the_task_machinery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default path must not pass through train/multitask.py's losses: the same run with the task
    code bypassed gives bit-identical losses."""
    import importlib

    prepare = importlib.import_module("dragontrainer.data.prepare")
    build = importlib.import_module("dragontrainer.train.build")
    from dragontrainer import train

    overrides = [*MLP, "monitor.report=false"]
    first = train(overrides=[*overrides, f"run.dir={tmp_path / 'a'}"], progress=False)
    monkeypatch.setattr(prepare, "resolve_tasks", lambda images, recipe: None)
    monkeypatch.setattr(build, "create_criterion", lambda recipe, weights, tasks: torch.nn.CrossEntropyLoss(
        weight=weights, label_smoothing=recipe.train.label_smoothing))  # fmt: skip
    second = train(overrides=[*overrides, f"run.dir={tmp_path / 'b'}"], progress=False)
    assert [(r["loss"], r["accuracy"]) for r in first.history] == [(r["loss"], r["accuracy"]) for r in second.history]
    assert first.tasks is None
