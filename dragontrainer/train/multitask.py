"""Losses and metrics for sigmoid heads, multi-label targets and several tasks at once.

- `train.loss=sigmoid`: one binary cross-entropy per output (one-vs-rest), the reference's choice for
  binary outputs and the only right one for multi-label targets (several classes true at once);
- multi-label: `y` as an N×K 0/1 matrix with `train.loss=sigmoid` — one task of K independent labels;
- multi-task: `multitask.tasks` names T label columns (npz `y` N×T or arrays `y_<task>`); the model
  answers all of them (nn/multitask.py) and the loss is Σ_t w_t · loss_t. The first task is the main
  task: early stopping, the confusion matrix, the per-class table and the diagnosis use it.

The single-task softmax run never comes here: it keeps its plain `nn.CrossEntropyLoss` and metrics.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dragontrainer.data.sources import ImageSet, numbered_classes
from dragontrainer.errors import DataError, RecipeError
from dragontrainer.monitor.stats import add_to_confusion
from dragontrainer.recipe import Recipe
from dragontrainer.train.class_metrics import summary_metrics
from dragontrainer.train.state import EpochMeter


@dataclass
class Task:
    name: str
    classes: list[str]  # class names; for a multi-label task, the label names
    weight: float = 1.0
    multilabel: bool = False

    @property
    def size(self) -> int:
        return len(self.classes)


@dataclass
class TaskSet:
    """The tasks, in order (the first is the main task), and every image's targets: N×T class indices,
    or for one multi-label task an N×K 0/1 matrix."""

    tasks: list[Task]
    targets: np.ndarray
    sigmoid: bool

    @property
    def multilabel(self) -> bool:
        return self.tasks[0].multilabel

    @property
    def sizes(self) -> list[int]:
        return [task.size for task in self.tasks]

    @property
    def main(self) -> Task:
        return self.tasks[0]

    def slices(self) -> list[slice]:
        """Where each task's logits sit in the model's (N, Σ C_t) output."""
        ends = np.cumsum([0, *self.sizes])
        return [slice(int(lo), int(hi)) for lo, hi in itertools.pairwise(ends)]

    def target_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.targets.astype(np.float32 if self.multilabel else np.int64))

    def describe(self) -> str:
        if self.multilabel:
            return f"{self.main.size} labels (multi-label, sigmoid)"
        return ", ".join(f"{t.name} ({t.size} classes, weight {t.weight:g})" for t in self.tasks)

    def info(self) -> dict[str, Any]:
        """What data.json keeps, so `dragon eval` rebuilds the heads without reloading the data."""
        return {"tasks": [{"name": t.name, "classes": t.classes, "weight": t.weight, "multilabel": t.multilabel}
                          for t in self.tasks], "sigmoid": self.sigmoid}  # fmt: skip

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> TaskSet:
        tasks = [Task(t["name"], list(t["classes"]), t["weight"], t["multilabel"]) for t in info["tasks"]]
        return cls(tasks, np.zeros((0, len(tasks)), dtype=np.int64), info["sigmoid"])


# ----------------------------------------------------------------------------- the tasks of a recipe


def resolve_tasks(images: ImageSet, recipe: Recipe) -> TaskSet | None:
    """The tasks the recipe asks of these images; None for a plain single-label run (the default path)."""
    spec, origin = recipe.multitask, str(recipe.data.path or recipe.data.source)
    labels = images.task_labels or {}
    sigmoid = recipe.train.loss == "sigmoid"
    matrix = labels.get("y") if labels.get("y") is not None and labels["y"].ndim == 2 else None
    if not spec.tasks:
        if matrix is None:
            return None
        if not sigmoid:
            raise RecipeError(
                f"{origin}: y is an N×{matrix.shape[1]} matrix: name its columns in multitask.tasks (several "
                f"tasks), or set train.loss=sigmoid (a 0/1 multi-label matrix)"
            )
        if not np.isin(matrix, (0, 1)).all():
            bad = int(matrix[~np.isin(matrix, (0, 1))][0])
            raise DataError(f"{origin}: y is a multi-label matrix, so its values must be 0 or 1; found {bad}")
        names = images.classes if len(images.classes) == matrix.shape[1] else numbered_classes(
            np.arange(matrix.shape[1]), origin)  # fmt: skip
        return TaskSet([Task("labels", names, multilabel=True)], matrix, sigmoid=True)
    columns = task_columns(labels, matrix, spec.tasks, origin)
    weights = spec.weights or [1.0] * len(spec.tasks)
    tasks = []
    for name, column, weight in zip(spec.tasks, columns, weights, strict=True):
        classes = (images.task_classes or {}).get(name) or numbered_classes(column, f"{origin}: task {name}")
        if column.max() >= len(classes):
            raise DataError(f"{origin}: task {name} has label {int(column.max())} but {len(classes)} class names")
        if len(classes) < 2:
            raise DataError(f"{origin}: task {name}: every image has the same label; a task needs two classes")
        tasks.append(Task(name, classes, float(weight)))
    return TaskSet(tasks, np.stack(columns, axis=1), sigmoid)


def task_columns(
    labels: dict[str, np.ndarray], matrix: np.ndarray | None, names: list[str], origin: str
) -> list[np.ndarray]:
    """One label array per named task: the columns of an N×T `y` in order, else the arrays `y_<task>`."""
    if not labels:
        raise RecipeError(f"multitask.tasks={names}: {origin} holds one label per image; give an npz with y as an "
                          "N×T matrix or named label arrays y_<task>")  # fmt: skip
    if matrix is not None:
        if len(names) != matrix.shape[1]:
            raise RecipeError(f"multitask.tasks names {len(names)} task(s) but y in {origin} has "
                              f"{matrix.shape[1]} column(s)")  # fmt: skip
        return [matrix[:, t] for t in range(matrix.shape[1])]
    missing = [name for name in names if name not in labels]
    if missing:
        found = ", ".join("y" if k == "y" else f"y_{k}" for k in labels)
        raise RecipeError(f"multitask.tasks: {origin} has no label array y_{missing[0]} (found: {found})")
    return [labels[name] for name in names]


def main_task_images(images: ImageSet, tasks: TaskSet | None) -> ImageSet:
    """The images with the main task's labels as `y` (the split is stratified on it, the diagnosis reads it)."""
    if tasks is None or tasks.multilabel:
        return images
    main = tasks.targets[:, 0]
    return ImageSet(images.x, main, tasks.main.classes, images.flip_safe, images.notes, images.official_test,
                    images.task_labels, images.task_classes)  # fmt: skip


def check_same_tasks(found: TaskSet | None, trained: TaskSet, origin: str) -> None:
    """Data scored by a trained run must hold the run's tasks, with labels inside its classes."""
    names = [t.name for t in trained.tasks]
    if found is None or [t.name for t in found.tasks] != names or found.multilabel != trained.multilabel:
        raise DataError(f"{origin}: the run learnt {trained.describe()}; the file does not hold those labels")
    for t, task in enumerate(trained.tasks):
        column = found.targets if task.multilabel else found.targets[:, t]
        if not task.multilabel and len(column) and int(column.max()) >= task.size:
            raise DataError(f"{origin}: task {task.name} has label {int(column.max())}; the run knows {task.size}")
        if task.multilabel and found.targets.shape[1] != task.size:
            raise DataError(f"{origin}: {found.targets.shape[1]} labels per image; the run learnt {task.size}")


def check_task_recipe(recipe: Recipe, tasks: TaskSet | None) -> None:
    """Refuse the combinations whose meaning is undefined for several tasks or for sigmoid outputs."""
    if recipe.train.loss == "sigmoid" and recipe.augment.tta_flip:
        raise RecipeError("augment.tta_flip averages softmax probabilities; with train.loss=sigmoid set it to false")
    if tasks is None:
        return
    what = "several tasks" if len(tasks.tasks) > 1 else "a multi-label target"
    refused = {
        "data.balance": recipe.data.balance != "none",
        "train.class_weights": recipe.train.class_weights != "none",
        "augment.mixup / augment.cutmix": any(op.p > 0 for op in (recipe.augment.mixup, recipe.augment.cutmix)),
        "augment.rare_class_boost": recipe.augment.rare_class_boost > 0,
        "augment.tta_flip": recipe.augment.tta_flip,
    }
    for field, on in refused.items():
        if on:
            raise RecipeError(f"{field} is defined for one single-label task, not for {what}; turn it off")


# ------------------------------------------------------------------------------------ losses


def smoothed(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """0/1 targets pulled towards ½ by ε (the binary form of label smoothing)."""
    return targets * (1 - label_smoothing) + label_smoothing / 2 if label_smoothing else targets


class SigmoidLoss(nn.Module):
    """Mean binary cross-entropy over every (image, class) output: integer labels are one-hot encoded,
    soft targets (mixup) and 0/1 multi-label rows are taken as they are."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            targets = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        target = smoothed(targets.to(logits.dtype), self.label_smoothing)
        return F.binary_cross_entropy_with_logits(logits, target, weight=self.weight)


class TaskLoss(nn.Module):
    """Σ_t w_t · loss_t over the tasks' slices of the logits; `per_task` gives the T losses."""

    def __init__(self, tasks: TaskSet, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.tasks, self.slices = tasks, tasks.slices()
        self.register_buffer("weights", torch.tensor([t.weight for t in tasks.tasks]))
        self.sigmoid = SigmoidLoss(label_smoothing=label_smoothing)
        self.label_smoothing = label_smoothing

    def per_task(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.tasks.multilabel:
            return self.sigmoid(logits, targets).reshape(1)
        losses = []
        for t, part in enumerate(self.slices):
            if self.tasks.sigmoid:
                losses.append(self.sigmoid(logits[:, part], targets[:, t]))
            else:
                losses.append(F.cross_entropy(logits[:, part], targets[:, t], label_smoothing=self.label_smoothing))
        return torch.stack(losses)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (self.per_task(logits, targets) * self.weights).sum()


def create_criterion(recipe: Recipe, weights: torch.Tensor | None, tasks: TaskSet | None) -> nn.Module:
    """The training loss: cross-entropy (the default, unchanged), per-class sigmoid BCE, or the task sum."""
    smoothing = recipe.train.label_smoothing
    if tasks is not None:
        return TaskLoss(tasks, smoothing)
    if recipe.train.loss == "sigmoid":
        return SigmoidLoss(weights, smoothing)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=smoothing)


# ----------------------------------------------------------------------------------- metrics


def task_scores(tasks: TaskSet, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per task and image: 1 for a right answer (single-label), the fraction of right labels (multi-label)."""
    if tasks.multilabel:
        return ((logits > 0) == (targets > 0.5)).double().mean(1, keepdim=True)
    return torch.stack([(logits[:, part].argmax(1) == targets[:, t]).double()
                        for t, part in enumerate(tasks.slices())], dim=1)  # fmt: skip


class TaskMeter(EpochMeter):
    """The training epoch's loss (weighted sum) and main-task accuracy, plus each task's loss and accuracy."""

    def __init__(self, device: torch.device, criterion: TaskLoss) -> None:
        self.criterion = criterion
        super().__init__(device)

    def reset(self) -> None:
        super().reset()
        count = len(self.criterion.tasks.tasks)
        self.task_loss_sums = torch.zeros(count, dtype=torch.float64, device=self.device)
        self.task_hits = torch.zeros(count, dtype=torch.float64, device=self.device)

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        n = len(targets)
        with torch.no_grad():
            logits = logits.detach().float()
            self.task_loss_sums += self.criterion.per_task(logits, targets).double() * n
            self.task_hits += task_scores(self.criterion.tasks, logits, targets).sum(0)
        self.loss_sum += loss.detach().double() * n
        self.seen += n

    def accuracy(self) -> float:
        return float(self.task_hits[0]) / max(self.seen, 1)

    def task_metrics(self) -> dict[str, dict[str, float]]:
        seen = max(self.seen, 1)
        return {task.name: {"loss": float(loss) / seen, "accuracy": float(hits) / seen}
                for task, loss, hits in zip(self.criterion.tasks.tasks, self.task_loss_sums.tolist(),
                                            self.task_hits.tolist(), strict=True)}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "correct": 0, "task_loss_sums": self.task_loss_sums.tolist(),
                "task_hits": self.task_hits.tolist()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "task_loss_sums" in state:
            self.task_loss_sums = torch.tensor(state["task_loss_sums"], dtype=torch.float64, device=self.device)
            self.task_hits = torch.tensor(state["task_hits"], dtype=torch.float64, device=self.device)


def multilabel_counts(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per label: true positives, false positives, false negatives (K×3), a decision at logit 0."""
    predicted, actual = logits > 0, targets > 0.5
    return torch.stack([(predicted & actual).sum(0), (predicted & ~actual).sum(0), (~predicted & actual).sum(0)], 1)


def multilabel_rows(counts: torch.Tensor, names: list[str]) -> list[dict[str, Any]]:
    """Per label: support, precision, recall and F1 (as `per_class_metrics` gives them for classes)."""
    rows = []
    for name, (tp, fp, fn) in zip(names, counts.double().tolist(), strict=True):
        precision = tp / (tp + fp) if tp + fp else None
        recall = tp / (tp + fn) if tp + fn else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "support": int(tp + fn), "precision": precision, "recall": recall, "f1": f1})
    return rows


def macro_f1(rows: list[dict[str, Any]]) -> float:
    scored = [r["f1"] for r in rows if r["support"]]
    return sum(x or 0.0 for x in scored) / max(len(scored), 1)


@torch.inference_mode()
def evaluate_tasks(
    model: nn.Module, loader: Any, criterion: TaskLoss, preprocessor: Any, *, amp: torch.dtype | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`loop.evaluate` for tasks: the weighted loss and the main task's accuracy, balanced accuracy and
    macro F1 at the top level (what early stopping and the report read), each task's under `tasks`;
    with `num_classes`, the main task's confusion matrix (multi-label: per-label counts under `label_counts`)."""
    tasks = criterion.tasks
    was_training = model.training
    model.eval()
    device = loader.device
    count = len(tasks.tasks)
    loss_sums = torch.zeros(count, dtype=torch.float64, device=device)
    hits = torch.zeros(count, dtype=torch.float64, device=device)
    exact = torch.zeros((), dtype=torch.float64, device=device)
    confusions: list[torch.Tensor | None] = [None] * count
    for x, y in loader.batches():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(preprocessor.apply(x)).float()
        loss_sums += criterion.per_task(logits, y).double() * len(y)
        hits += task_scores(tasks, logits, y).sum(0)
        if tasks.multilabel:
            exact += ((logits > 0) == (y > 0.5)).all(1).sum()
            batch = multilabel_counts(logits, y)
            confusions[0] = batch if confusions[0] is None else confusions[0] + batch
            continue
        for t, part in enumerate(tasks.slices()):
            confusions[t] = add_to_confusion(confusions[t], y[:, t], logits[:, part].argmax(1), tasks.tasks[t].size)
    model.train(was_training)
    seen = max(loader.num_images, 1)
    per_task: dict[str, dict[str, Any]] = {}
    for t, task in enumerate(tasks.tasks):
        record: dict[str, Any] = {"loss": float(loss_sums[t]) / seen, "accuracy": float(hits[t]) / seen}
        if confusions[t] is not None and task.multilabel:
            rows = multilabel_rows(confusions[t], task.classes)
            record.update(exact_match=float(exact) / seen, macro_f1=macro_f1(rows))
        elif confusions[t] is not None:
            record.update(summary_metrics(confusions[t]))
        per_task[task.name] = record
    main = per_task[tasks.main.name]
    result: dict[str, Any] = {"loss": float((loss_sums * criterion.weights.double()).sum()) / seen,
                              **{k: v for k, v in main.items() if k != "loss"}, "tasks": per_task}  # fmt: skip
    if num_classes and confusions[0] is not None:
        key = "label_counts" if tasks.multilabel else "confusion"
        result[key] = confusions[0].tolist()
    return result


def task_rows(metrics: dict[str, Any], tasks: TaskSet) -> list[dict[str, Any]]:
    """Per class of the main task (per label for multi-label), popping the counts from `metrics`."""
    from dragontrainer.train.class_metrics import per_class_metrics

    if tasks.multilabel:
        return multilabel_rows(torch.tensor(metrics.pop("label_counts")), tasks.main.classes)
    return per_class_metrics(torch.tensor(metrics.pop("confusion")), tasks.main.classes)


# ------------------------------------------------------------------------ what the loop calls


def retarget(loader: Any, targets: torch.Tensor) -> Any:
    """The same images (the same device tensor, no copy) with each image's task targets as labels; the
    sampler still orders the epoch by the main task's labels."""
    import copy

    other = copy.copy(loader)
    other.y = targets.to(loader.y.device)
    return other


def main_labels(labels: torch.Tensor) -> torch.Tensor:
    """1-D class labels of the main task from a batch's targets (multi-label: the first true label)."""
    if labels.ndim == 1:
        return labels
    return labels.argmax(1) if labels.is_floating_point() else labels[:, 0]


class MainTaskLoss(nn.Module):
    """The main task's loss on its slice of the logits, for what measures one task (the monitor's noise
    batches, the diagnosis' probes)."""

    def __init__(self, criterion: TaskLoss) -> None:
        super().__init__()
        self.criterion, self.part = criterion, criterion.slices[0]

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tasks = self.criterion.tasks
        if tasks.multilabel:
            return self.criterion.sigmoid(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype))
        if tasks.sigmoid:
            return self.criterion.sigmoid(logits[:, self.part], labels)
        return F.cross_entropy(logits[:, self.part], labels, label_smoothing=self.criterion.label_smoothing)


def best_task_metrics(
    history: list[dict[str, Any]], best_epoch: int, test: dict[str, Any] | None
) -> dict[str, Any] | None:
    """result.json's `tasks`: each task's validation metrics at the best epoch, and on the test split."""
    val = [r for r in history if r.get("split") == "val" and "tasks" in r]
    if not val:
        return None
    best = next((r for r in val if r["epoch"] == best_epoch), val[-1])
    return {"val": best["tasks"], **({"test": test["tasks"]} if test and "tasks" in test else {})}


def task_data(data: Any) -> Any:
    """The prepared data with the loaders' labels replaced by every task's targets (what the training
    loop and its evaluation read); the original keeps the main task's labels for the monitors and checks."""
    if data.tasks is None:
        return data
    import dataclasses

    targets = data.tasks.target_tensor()
    split = data.split
    test = None if data.test is None else retarget(data.test, targets[torch.from_numpy(split.test)])
    return dataclasses.replace(data, train=retarget(data.train, targets[torch.from_numpy(split.train)]),
                               val=retarget(data.val, targets[torch.from_numpy(split.val)]), test=test)  # fmt: skip
