"""Data rules: labels, order, balance, leakage, preprocessing. Most rest on the doctor's cheap checks,
run at the start of every run (`checks` in stats.jsonl), so they need no memorisation to fire."""

from __future__ import annotations

import math
import statistics

import torch

from dragontrainer.monitor.diagnose.core import Finding, RunRecords, fmt, pct, rule
from dragontrainer.monitor.stats import input_problem

BAD_TRAINING = ("loss_not_decreasing", "lr_too_high", "lr_too_low", "dead_units", "exploding_gradients",
                "diverged", "nan_rollback", "noisy_loss", "underfitting", "saturated_activations",
                "vanishing_gradients", "label_noise")  # fmt: skip
NO_GENERALISATION = ("overfitting", "overtraining", "underfitting", "loss_not_decreasing", "val_better_than_train",
                     "lr_too_high", "noisy_loss", "dead_units", "label_noise", "over_regularisation")  # fmt: skip


@rule("labels_mismatch", "data", explains=NO_GENERALISATION)
def labels_mismatch(run: RunRecords) -> Finding | None:
    """Labels unrelated to the images: nearest neighbours agree at chance and validation stays at chance."""
    if len(run.val) < 2:
        return None
    best_val = max(r["accuracy"] for r in run.val)
    if run.above_chance(best_val, run.data.get("num_val", 1)):
        return None
    knn = run.check_numbers("label_consistency")
    if knn is not None:
        band = knn["chance"] + 3 * math.sqrt(knn["chance"] * (1 - knn["chance"]) / max(knn["queries"], 1))
        if knn["agreement"] > band:
            return None  # neighbours share labels: the labels belong to the images, the problem is elsewhere
        measured = (f"a validation image's nearest training image has its label {pct(knn['agreement'])} of the time "
                    f"(chance {pct(knn['chance'])}) and the best validation accuracy is {pct(best_val)}")  # fmt: skip
    else:
        train_fell = run.train[-1]["loss"] <= 0.9 * run.train[0]["loss"]
        if not train_fell:
            return None
        measured = (f"the training loss fell from {fmt(run.train[0]['loss'])} to {fmt(run.train[-1]['loss'])} but "
                    f"the best validation accuracy is {pct(best_val)}, chance level")  # fmt: skip
    return Finding(
        "labels_mismatch", "error", f"labels do not match the inputs: {measured}", [],
        "check that labels and images are paired (shuffled together, read from the same order)",
        {"best_val_accuracy": best_val, "chance": run.chance, "nearest_neighbour": knn}, plot="accuracy",
        strong=knn is not None,
    )  # fmt: skip


@rule("noise_amplification", "data", explains=(*NO_GENERALISATION, "labels_mismatch"))
def noise_amplification(run: RunRecords) -> Finding | None:
    """Whitening with a tiny eps blows pixel noise in low-variance components up to the signal's scale."""
    name, state = run.recipe.preprocess.name, run.preprocess_state or {}
    if name not in ("pca_whiten", "zca_whiten") or "matrix" not in state:
        return None
    eps = run.recipe.preprocess.eps
    variances = (1 / torch.linalg.svdvals(state["matrix"].double()) ** 2 - eps).clamp_min(0)
    faint = variances < 1e-3 * variances.max()  # under 1/1000 of the top variance: noise, not signal
    whitened = variances / (variances + eps)  # each component's variance after whitening
    amplified = float(whitened[faint].sum() / whitened.sum())  # their share of what the network sees
    knn = run.check_numbers("label_consistency") or {}
    lost = knn.get("preprocessed_agreement") is not None and (
        knn["preprocessed_agreement"] - knn["chance"] < 0.5 * (knn["agreement"] - knn["chance"])
    )
    best_val = max((r["accuracy"] for r in run.val), default=0.0)
    harmed = lost or not run.above_chance(best_val, run.data.get("num_val", 1))
    if amplified < 0.1 or not harmed:
        return None  # under a tenth of the input is amplified noise, or no measured harm
    suggested = float(f"{float(variances.mean()):.0e}")
    return Finding(
        "noise_amplification", "error" if not run.above_chance(best_val, run.data.get("num_val", 1)) else "warning",
        f"{name} with eps {eps:g} amplifies noise: components that carry under 1/1000 of the top variance "
        f"are scaled up like the signal and make {pct(amplified)} of the network's input"
        + (f"; nearest-neighbour label agreement drops from {pct(knn['agreement'])} on pixels to "
           f"{pct(knn['preprocessed_agreement'])} after it" if lost else ""),
        [f"preprocess.eps={suggested:g}"], "eps about the mean component variance damps the noise components; "
        "or per-channel standardisation (preprocess.name=standardize)",
        {"amplified_fraction": amplified, "eps": eps, "suggested_eps": suggested, "nearest_neighbour": knn},
        plot="inputs", strong=True,
    )  # fmt: skip


@rule("unnormalised_inputs", "data", explains=BAD_TRAINING)
def unnormalised_inputs(run: RunRecords) -> Finding | None:
    """The network's input (after preprocessing) is far from zero mean and unit scale."""
    probes = run.kind("probe")
    if not probes or input_problem(probes[0]) is None:
        return None
    probe = probes[0]
    return Finding(
        "unnormalised_inputs", "warning",
        f"unnormalised inputs: after preprocessing ({run.recipe.preprocess.name}) the network sees mean "
        f"{fmt(probe['mean'])} and standard deviation {fmt(probe['std'])} (want ≈ 0 and ≈ 1)",
        ["preprocess.name=standardize"], "zero-centred, unit-scale inputs per channel, from the training split",
        {"mean": probe["mean"], "std": probe["std"], "min": probe["min"], "max": probe["max"]}, plot="inputs",
        strong=True,
    )  # fmt: skip


def expected_distinct_classes(counts: list[int], batch: int) -> float:
    """Expected number of different classes in a random batch of `batch` training images."""
    total = sum(counts)
    return sum(1 - (1 - c / total) ** batch for c in counts if c)


@rule("unshuffled_data", "data", explains=(*BAD_TRAINING, "overfitting", "overtraining", "val_better_than_train"))
def unshuffled_data(run: RunRecords) -> Finding | None:
    """Batches hold far fewer classes than random batches would: the data is ordered by label."""
    seen = [r["batch_classes"] for r in run.steps if r.get("batch_classes")]
    counts = run.data.get("train_class_counts")
    if len(seen) < 5 or not counts:
        return None
    expected = expected_distinct_classes(counts, run.recipe.train.batch_size)
    observed = statistics.median(seen)
    if observed >= 0.5 * expected or expected < 2:
        return None
    return Finding(
        "unshuffled_data", "warning",
        f"data ordered by label: a batch holds {observed:g} class(es) on median where a random batch of "
        f"{run.recipe.train.batch_size} would hold {expected:.1f}",
        ["train.shuffle=true"], "a new random order every epoch", {"median": observed, "expected": expected},
        plot="loss", strong=True,
    )  # fmt: skip


@rule("split_overlap", "data", explains=("val_better_than_train",))
def split_overlap(run: RunRecords) -> Finding | None:
    """Many validation/test images are exact copies of training images: the held-out score is inflated."""
    overlap = run.check_numbers("split_overlap")
    if not overlap or overlap["duplicates"] <= 0.05 * max(overlap["held_out"], 1):
        return None
    return Finding(
        "split_overlap", "warning",
        f"{overlap['duplicates']} of {overlap['held_out']} validation/test images are also in training",
        [], "remove duplicates from the data before splitting; the validation score is inflated", overlap,
        plot="accuracy", strong=True,
    )  # fmt: skip


@rule(
    "label_noise",
    "data",
    explains=("overfitting", "overtraining", "noisy_loss", "val_better_than_train", "underfitting"),
)
def label_noise(run: RunRecords) -> Finding | None:
    """Confident learning on out-of-sample predictions: training images whose given label the model
    confidently disagrees with, and the estimated share of wrong labels."""
    records = run.kind("label_noise")
    best_val = max((r["accuracy"] for r in run.val), default=0.0)
    if not records or records[-1]["rate"] < 0.05:
        return None  # clean data (every real set has a few ambiguous images)
    noise = records[-1]
    if noise["images"] < 30 * run.num_classes:
        return None  # too few images per class for five folds of a classifier to say which labels are wrong
    if noise["rate"] < 0.5 * (1 - best_val) or noise.get("clean_agreement", 1.0) < 0.85:
        return None  # a weak model, not bad labels: wrong labels explain little of its error, or its
        # predictions disagree with many of the labels it keeps as well
    knn = run.neighbours
    if knn is not None and noise["rate"] > 1 - knn["agreement"] + knn["band"]:
        return None  # a model-free bound refutes it: a share r of wrong training labels caps the nearest
        # neighbour's agreement at 1 − r, so the features, not the labels, disagree (a weak model)
    return Finding(
        "label_noise", "warning" if noise["rate"] >= 0.1 else "info",
        f"noisy labels: about {pct(noise['rate'])} of the training labels look wrong (confident learning on "
        f"out-of-sample predictions of {noise['images']} images); {noise['issues']} are listed in suspect_labels.csv",
        [], "relabel or drop the suspects (report.html shows them); label smoothing (train.label_smoothing=0.2) "
        "and early stopping limit the damage meanwhile",
        {k: v for k, v in noise.items() if k != "suspects"}, plot="suspects", strong=True,
    )  # fmt: skip


@rule("class_imbalance", "data", explains=("underfitting",))
def class_imbalance(run: RunRecords) -> Finding | None:
    """The largest class has many times the images of the smallest."""
    counts = run.data.get("train_class_counts") or []
    present = [c for c in counts if c]
    if len(present) < 2 or max(present) < 3 * min(present):
        return None
    epochs = run.kind("epoch")
    per_class = epochs[-1]["per_class_accuracy"] if epochs else []
    classes = run.data["classes"]
    small = min(range(len(counts)), key=lambda i: counts[i] if counts[i] else math.inf)
    worst = ""
    if per_class:
        accuracy, index = min((a, i) for i, a in enumerate(per_class) if a is not None)
        worst = f"; the worst validation accuracy is {pct(accuracy)} on class {classes[index]!s}"
    balanced = run.recipe.train.class_weights != "none" or run.recipe.data.balance != "none"
    return Finding(
        "class_imbalance", "info" if balanced else "warning",
        f"class imbalance: {max(present)} training images in the largest class, {min(present)} in the smallest "
        f"({classes[small]!s}){worst}",
        [] if balanced else ["data.balance=oversample"],
        f"already balanced (data.balance={run.recipe.data.balance}, train.class_weights="
        f"{run.recipe.train.class_weights}); judge by balanced accuracy and per-class recall" if balanced else
        "(or data.balance=class_weights, undersample, two_stage; augment.rare_class_boost=0.5 for extra crops of "
        "rare classes) and judge by balanced accuracy and per-class recall (result.json, dragon eval)",
        {"counts": counts, "per_class_accuracy": per_class}, plot="confusion", strong=True,
    )  # fmt: skip
