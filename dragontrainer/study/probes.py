"""Linear probes on a frozen network's features, with scikit-learn: logistic regression and a linear
SVM on the activations of several stages (the reference: "train the SVM classifier on activations
somewhere earlier in the network" when the data is small and different). Also the similarity
measurement of `dragon finetune --strategy auto`: source features against a random network's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dragontrainer.data.preprocess import Preprocessor
from dragontrainer.monitor.evidence import forward_in_batches


@dataclass(frozen=True)
class ProbeScore:
    features: str  # the stage whose output (or, for `head`, whose input) was used
    classifier: str  # logistic_regression | linear_svm
    dimensions: int
    val_accuracy: float
    test_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pooled(activation: torch.Tensor, side: int) -> torch.Tensor:
    """A feature map average-pooled to side×side and flattened; vectors as they are."""
    if activation.ndim == 4:
        activation = F.adaptive_avg_pool2d(activation.float(), min(side, activation.shape[-1]))
    return activation.flatten(1).float()


@torch.inference_mode()
def stage_features(
    model: nn.Module, x: torch.Tensor, preprocessor: Preprocessor, batch_size: int = 512
) -> dict[str, np.ndarray]:
    """Each block's output (pooled to 2×2) and the head's input (pooled to 1×1, what a linear head sees)."""
    stages = model.stages()  # type: ignore[operator]
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in stages.items():
        if name.startswith("blocks."):
            hooks.append(module.register_forward_hook(
                lambda m, i, out, key=name: captured.setdefault(key, []).append(pooled(out, 2).cpu())
            ))  # fmt: skip
    hooks.append(stages["head"].register_forward_pre_hook(
        lambda m, args: captured.setdefault("head", []).append(pooled(args[0], 1).cpu())
    ))  # fmt: skip
    try:
        forward_in_batches(model, x, preprocessor, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts).numpy() for name, parts in captured.items()}


def fit_probe(kind: str, features: np.ndarray, labels: np.ndarray, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    classifier = (
        LogisticRegression(max_iter=2000, random_state=seed)
        if kind == "logistic_regression"
        else LinearSVC(C=0.1, max_iter=5000, random_state=seed)
    )
    return make_pipeline(StandardScaler(), classifier).fit(features, labels)


def probe_stages(
    train: dict[str, np.ndarray], y_train: np.ndarray, val: dict[str, np.ndarray], y_val: np.ndarray,
    test: dict[str, np.ndarray] | None = None, y_test: np.ndarray | None = None, *,
    classifiers: tuple[str, ...] = ("logistic_regression", "linear_svm"), seed: int = 0,
) -> list[ProbeScore]:  # fmt: skip
    """Every (stage, classifier) pair fitted on train, scored on validation (and test)."""
    scores = []
    for name in train:
        for kind in classifiers:
            probe = fit_probe(kind, train[name], y_train, seed)
            test_accuracy = None
            if test is not None and y_test is not None and len(y_test):
                test_accuracy = float(probe.score(test[name], y_test))
            val_accuracy = float(probe.score(val[name], y_val))
            scores.append(ProbeScore(name, kind, train[name].shape[1], val_accuracy, test_accuracy))
    return scores


def folded_linear(pipeline: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fitted StandardScaler + logistic regression as one linear layer (weight C×D, bias C) whose
    logits give the same softmax: w = coef / scale, b = intercept − Σ coef · mean / scale."""
    scaler, classifier = pipeline[0], pipeline[-1]
    coef = classifier.coef_ / scaler.scale_
    bias = classifier.intercept_ - coef @ scaler.mean_
    if coef.shape[0] == 1 and num_classes == 2:  # binary: one logit z; softmax over (0, z) is the same
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
    full_w = np.zeros((num_classes, coef.shape[1]))
    full_b = np.full(num_classes, -1e4)  # a class absent from the training split is never predicted
    full_w[classifier.classes_], full_b[classifier.classes_] = coef, bias
    return torch.tensor(full_w, dtype=torch.float32), torch.tensor(full_b, dtype=torch.float32)


def head_linear_layer(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer (its input is what the `head` probe sees)."""
    head = model.stages()["head"]  # type: ignore[operator]
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("the model's head has no linear layer")
    return layers[-1]
