"""Scoring a split in eval mode: loss, accuracy, per-class summaries and the confusion matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dragontrainer.data.augment import flip_averaged_logits
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.preprocess import Preprocessor
from dragontrainer.monitor.stats import add_to_confusion
from dragontrainer.train.class_metrics import summary_metrics

MAX_CONFUSION_CLASSES = 1000  # the C×C matrix is skipped above this: it would dwarf the model


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DeviceLoader,
    criterion: nn.Module,
    preprocessor: Preprocessor,
    *,
    amp: torch.dtype | None = None,
    tta_flip: bool = False,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Mean loss, accuracy, balanced accuracy and macro F1 over a whole split of uint8 images, in eval
    mode (batch norm uses running statistics); with `tta_flip`, the softmax is averaged with the mirror
    image's. With `num_classes`, also the confusion matrix (`confusion[true][predicted]`).
    Everything accumulates on the device: one host sync per split, none per batch."""
    was_training = model.training
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    confusion = None
    for x, y in loader.batches():
        inputs = preprocessor.apply(x)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = flip_averaged_logits(model, inputs) if tta_flip else model(inputs)
        loss_sum += criterion(logits.float(), y).double() * len(y)
        predictions = logits.argmax(1)
        correct += (predictions == y).sum()
        confusion = add_to_confusion(confusion, y, predictions, num_classes or logits.shape[1])
    model.train(was_training)
    count = max(loader.num_images, 1)
    result: dict[str, Any] = {"loss": float(loss_sum) / count, "accuracy": int(correct) / count}
    if confusion is not None:
        result.update(summary_metrics(confusion))
        if num_classes:
            result["confusion"] = confusion.tolist()
    return result


def epoch_record(epoch: int, step: int, confusion: list[list[int]]) -> dict[str, Any]:
    """Per-class validation accuracy (None for a class absent from validation) and the confusion matrix."""
    per_class = [row[i] / sum(row) if sum(row) else None for i, row in enumerate(confusion)]
    return {"kind": "epoch", "step": step, "epoch": epoch, "per_class_accuracy": per_class, "confusion": confusion}
