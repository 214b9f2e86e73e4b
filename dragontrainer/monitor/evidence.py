"""Evidence the diagnosis needs beyond the sampled statistics, measured by the training run:

- the doctor's cheap data checks at the start (`doctor.start_checks`);
- training accuracy in eval mode on a fixed probe subset of the training split every epoch, so
  it is compared with validation accuracy like with like (dropout, mixup and augmentation off);
- label noise at the end: confident learning (Northcutt et al. 2021, via cleanlab) on out-of-sample
  predictions. The network has seen every training label, so its own softmax is not out of sample;
  instead a logistic regression is cross-validated (5 folds) on the penultimate-layer features of
  the best checkpoint (the earliest good weights, before memorisation), as cleanlab's own guides do
  with embeddings. Writes `suspect_labels.csv` and the suspects' images for report.html.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from dragontrainer.data.loader import DeviceLoader
from dragontrainer.run import RunDir, atomic_write_bytes, atomic_write_text

EVAL_PROBE_IMAGES = 512  # ±2.2 points of accuracy at 50%: enough to compare with validation
NOISE_IMAGES = 5000  # training images the label-noise estimate looks at (evenly spaced)
NOISE_FEATURES = 64  # penultimate features kept (PCA) for the cross-validated classifier
GALLERY = 24


def probe_loader(train: DeviceLoader, batch_size: int) -> DeviceLoader:
    """A fixed, evenly spaced subset of the training split, served unshuffled and unaugmented."""
    count = min(EVAL_PROBE_IMAGES, train.num_images)
    index = torch.linspace(0, train.num_images - 1, count).long()
    return DeviceLoader(*train.take(index), batch_size, shuffle=False)


@torch.inference_mode()
def penultimate_features(model: nn.Module, x: torch.Tensor, preprocessor: Any, batch: int = 512) -> np.ndarray:
    """The input of the model's last linear layer (its features) for uint8 images `x`, in eval mode."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].flatten(1).float()))
    try:
        forward_in_batches(model, x, preprocessor, batch)
    finally:
        handle.remove()
    return torch.cat(captured).cpu().numpy()


@torch.inference_mode()
def forward_in_batches(model: nn.Module, x: torch.Tensor, preprocessor: Any, batch: int) -> None:
    """Run uint8 images through the model in eval mode, batch by batch, for forward hooks to read;
    the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch):
            model(preprocessor.apply(x[start : start + batch]))
    finally:
        model.train(was_training)


def out_of_sample_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Predicted class probabilities for every image from a classifier that never saw its label."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    dims = min(NOISE_FEATURES, features.shape[1], len(features) // 2)
    probs = np.full((len(labels), num_classes), 1e-6)
    folds = min(5, int(np.bincount(labels)[np.bincount(labels) > 0].min()))
    if folds < 2:
        return probs / probs.sum(1, keepdims=True)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fit_index, held_index in splitter.split(features, labels):
        model = make_pipeline(StandardScaler(), PCA(dims, random_state=seed), LogisticRegression(max_iter=300))
        model.fit(features[fit_index], labels[fit_index])
        probs[np.ix_(held_index, model.classes_)] = model.predict_proba(features[held_index])
    return probs / probs.sum(1, keepdims=True)


def estimate_label_noise(labels: np.ndarray, probs: np.ndarray) -> tuple[float, np.ndarray]:
    """(estimated share of wrong labels, indices of the suspects, most suspicious first): the
    calibrated confident joint's off-diagonal mass and cleanlab's prune-by-noise-rate issues."""
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues

    joint = estimate_joint(labels, probs)
    rate = float(1 - np.trace(joint))
    issues = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return rate, np.asarray(issues, dtype=np.int64)


def label_noise_record(model: nn.Module, data: Any, run: RunDir, seed: int, step: int) -> dict[str, Any]:
    """Estimate label noise on the training split, write suspect_labels.csv and the gallery's images;
    the returned `label_noise` line goes to stats.jsonl."""
    from safetensors.torch import save

    started = time.perf_counter()
    train = data.train
    count = min(NOISE_IMAGES, train.num_images)
    index = torch.linspace(0, train.num_images - 1, count).long()
    probe_images, probe_labels = train.take(index)
    labels = probe_labels.cpu().numpy()
    features = penultimate_features(model, probe_images, data.preprocessor)
    probs = out_of_sample_probabilities(features, labels, data.num_classes, seed)
    rate, issues = estimate_label_noise(labels, probs)
    dataset_index = data.split.train[index.cpu().numpy()]  # position in the source's image order
    classes = data.images.classes
    rows = [{"index": int(dataset_index[i]), "given": str(classes[labels[i]]),
             "predicted": str(classes[int(probs[i].argmax())]), "confidence_in_given": float(probs[i, labels[i]]),
             "confidence_in_predicted": float(probs[i].max())} for i in issues]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["index", "given", "predicted", "confidence_in_given",
                                                "confidence_in_predicted"])  # fmt: skip
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run.file("suspect_labels.csv"), buffer.getvalue())
    shown = torch.as_tensor(issues[:GALLERY], dtype=torch.long)
    images = probe_images[shown.to(probe_images.device)].cpu().contiguous()
    given = torch.as_tensor(labels[issues[:GALLERY]], dtype=torch.long)
    predicted = torch.as_tensor(probs[issues[:GALLERY]].argmax(1), dtype=torch.long)
    atomic_write_bytes(
        run.file("suspects.safetensors"), save({"images": images, "given": given, "predicted": predicted})
    )
    kept = np.setdiff1d(np.arange(len(labels)), issues)
    clean_agreement = float((probs[kept].argmax(1) == labels[kept]).mean()) if len(kept) else 0.0
    return {"kind": "label_noise", "step": step, "rate": rate, "issues": len(issues), "images": count,
            "clean_agreement": clean_agreement, "seconds": time.perf_counter() - started,
            "method": "cleanlab confident learning, 5-fold logistic regression on penultimate features",
            "suspects": rows[:GALLERY]}  # fmt: skip
