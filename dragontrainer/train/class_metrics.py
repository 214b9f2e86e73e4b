"""Per-class precision, recall and F1, balanced accuracy and macro F1 from a confusion matrix
(`confusion[true][predicted]`): what to judge a model by when the classes are imbalanced, where
plain accuracy mostly measures the largest class."""

from __future__ import annotations

from typing import Any

import torch


def summary_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Balanced accuracy (mean recall over the classes present) and macro F1 (mean over the same)."""
    confusion = confusion.double()
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    hits = confusion.diagonal()
    present = support > 0
    recall = hits / support.clamp_min(1)
    precision = hits / predicted.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    count = max(int(present.sum()), 1)
    return {
        "balanced_accuracy": float(recall[present].sum() / count),
        "macro_f1": float(f1[present].sum() / count),
    }


def per_class_metrics(confusion: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """One row per class: support, precision, recall, F1 (None where undefined: nothing predicted or present)."""
    confusion = confusion.double().cpu()
    rows = []
    for i, name in enumerate(classes):
        support, predicted, hits = float(confusion[i].sum()), float(confusion[:, i].sum()), float(confusion[i, i])
        precision = hits / predicted if predicted else None
        recall = hits / support if support else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "support": int(support), "precision": precision, "recall": recall, "f1": f1})
    return rows
