"""Generalisation rules: training accuracy (eval mode, on a fixed probe subset of the training split)
against validation accuracy, judged against the run's own noise and chance, and regularisation
judged with the recipe's optimiser in mind."""

from __future__ import annotations

from dragontrainer.monitor.diagnose.core import Finding, RunRecords, fmt, pct, rule
from dragontrainer.recipe import Recipe

ADAPTIVE_L2 = {"adam", "amsgrad", "nadam", "radam", "adabelief", "diffgrad", "rmsprop", "adagrad"}


def decay_per_step(recipe: Recipe, lr: float) -> float | None:
    """The fraction of each weight that weight decay removes per step: lr·wd for decoupled AdamW,
    lr·wd/(1−μ) for SGD with momentum; None for L2 inside an adaptive optimiser (its size depends on
    the gradients, so only the coefficient can be judged)."""
    optim = recipe.optim
    if optim.name == "adamw":
        return lr * optim.weight_decay
    if optim.name == "sgd":
        return lr * optim.weight_decay / (1 - optim.momentum)
    return None


def strong_regularisation(recipe: Recipe, lr: float) -> list[str]:
    """The knobs set well beyond their usual strength, as `key=value`."""
    shrink = decay_per_step(recipe, lr)
    decay = shrink >= 5e-3 if shrink is not None else recipe.optim.weight_decay >= 5e-3
    found = {
        "model.dropout": recipe.model.dropout >= 0.6,
        "optim.weight_decay": decay,
        "regularize.strength": recipe.regularize.penalty != "none" and recipe.regularize.strength >= 1e-3,
        "train.label_smoothing": recipe.train.label_smoothing >= 0.3,
        "model.spatial_dropout": recipe.model.spatial_dropout >= 0.3,
        "model.dropconnect": recipe.model.dropconnect >= 0.6,
    }
    return [key for key, strong in found.items() if strong]


def milder(recipe: Recipe, key: str) -> str | None:
    """`key=value` with the knob at a usual strength; None when it is there already (weight decay that
    removes too much per step at the usual coefficient: the learning rate is what is too large)."""
    usual = {"model.dropout": 0.3, "optim.weight_decay": 5e-4 if recipe.optim.name != "adamw" else 0.05,
             "regularize.strength": 1e-4, "train.label_smoothing": 0.1, "model.spatial_dropout": 0.1,
             "model.dropconnect": 0.3}  # fmt: skip
    section, name = key.split(".")
    return f"{key}={usual[key]:g}" if usual[key] < getattr(getattr(recipe, section), name) else None


@rule(
    "over_regularisation",
    "generalisation",
    # weights decayed towards zero leave ReLUs dead; dropout's 1/(1−p) scaling inflates activations and gradients
    explains=(
        "underfitting",
        "val_better_than_train",
        "label_noise",
        "loss_not_decreasing",
        "dead_units",
        "exploding_gradients",
    ),
)
def over_regularisation(run: RunRecords) -> Finding | None:
    """Strong regularisation keeps the model from fitting even its training data (eval mode)."""
    fit, strong = run.fit, strong_regularisation(run.recipe, run.lr)
    if not strong or fit is None or fit.train >= 0.9 or fit.gap > fit.noise:
        return None  # it fits its training data, or generalises worse than it fits: not over-regularised
    return Finding(
        "over_regularisation", "warning",
        f"over-regularised: training accuracy {pct(fit.train)} (eval mode) is no better than validation "
        f"{pct(fit.val)} with {', '.join(strong)} strong",
        [m for k in strong if (m := milder(run.recipe, k))], "regularise less",
        {"train_accuracy": fit.train, "val_accuracy": fit.val, "knobs": strong}, plot="accuracy", strong=True,
    )  # fmt: skip


def plateaued(run: RunRecords) -> bool:
    """The second half of the run gained under 3 points of training accuracy (eval mode) over the best of
    the first half: it stopped learning. Best against best, so one noisy epoch of the fixed probe (±2
    points) neither makes nor hides a plateau, whatever the schedule does in between."""
    probed = any(r.get("eval_accuracy") is not None for r in run.train)
    key = "eval_accuracy" if probed else "accuracy"
    measured = [r[key] for r in run.train if r.get(key) is not None]  # the probe: every 2nd validation and the last
    half = len(measured) // 2
    if half < 2:
        return False
    first, second = max(measured[:half]), max(measured[half:])
    return second - first < 0.03


@rule("underfitting", "generalisation", explains=("loss_not_decreasing",))
def underfitting(run: RunRecords) -> Finding | None:
    """Low training accuracy (eval mode) and no gap: the model cannot fit its training data. Strong when
    the recipe squeezes every image through fewer numbers than there are classes and the labels do
    follow the images (nearest neighbours agree): then even a network stuck at chance is too small;
    otherwise inferred once the accuracy is above chance and no longer improving."""
    fit = run.fit
    if fit is None or run.kind("diverged") or strong_regularisation(run.recipe, run.lr):
        return None
    if fit.train >= 0.85 or abs(fit.gap) > max(0.05, fit.noise):
        return None
    narrow = run.bottleneck if run.labels_follow_images else None
    if narrow is None and (not run.above_chance(fit.val, fit.n_val) or not plateaued(run)):
        return None  # at chance something else is broken; still climbing: not converged yet rather than
        # too small (lr_too_low covers slow runs)
    widths = run.recipe.model.widths
    bigger = f"model.widths=[{','.join(str(max(2 * w, run.num_classes)) for w in widths)}]" if widths else (
        "model.name=resnet")  # fmt: skip
    squeezed = f"; its narrowest layer has {narrow} units for {run.num_classes} classes" if narrow else ""
    return Finding(
        "underfitting", "warning",
        f"underfitting: training accuracy {pct(fit.train)} (eval mode) and validation {pct(fit.val)} are both low, "
        f"with no gap{squeezed or ', and no longer improving'}",
        [bigger], f"more capacity; or train longer (train.epochs={run.recipe.train.epochs * 2})",
        {"train_accuracy": fit.train, "val_accuracy": fit.val, "bottleneck": narrow}, plot="accuracy",
        strong=narrow is not None,
    )  # fmt: skip


@rule("overfitting", "generalisation", explains=("overtraining",))
def overfitting(run: RunRecords) -> Finding | None:
    """Training accuracy (eval mode) far above validation, beyond both estimates' noise."""
    fit = run.fit
    if fit is None or fit.gap < fit.noise or not run.above_chance(fit.train, fit.n_train):
        return None
    # material: 10 points, or — once the model has memorised its training images, so the whole validation
    # error is the gap — 5% of the range above chance (on a set that lets it reach 99%, 1.5 points is fine)
    memorised = fit.train >= 1 - 1 / max(fit.n_train, 100)
    if fit.gap < 0.1 and not (memorised and fit.gap >= 0.05 * (1 - run.chance)):
        return None
    model = run.recipe.model
    overrides = (
        ["model.dropout=0.5"] if model.dropout < 0.5 else [f"optim.weight_decay={run.recipe.optim.weight_decay * 5:g}"]
    )
    return Finding(
        "overfitting", "warning",
        f"overfitting: training accuracy {pct(fit.train)} (eval mode) vs validation {pct(fit.val)}, a gap of "
        f"{pct(fit.gap)}",
        overrides, "regularise more, augment more (augment.crop.p=1.0) or get more data",
        {"train_accuracy": fit.train, "val_accuracy": fit.val, "gap": fit.gap}, plot="accuracy",
    )  # fmt: skip


@rule("overtraining", "generalisation")
def overtraining(run: RunRecords) -> Finding | None:
    """Validation loss rising for several epochs while the training loss keeps falling."""
    if len(run.val) < 6:
        return None
    best = min(run.val, key=lambda r: r["loss"])
    after = [r for r in run.val if r["epoch"] > best["epoch"]]
    final_val = run.val[-1]["loss"]
    train_at_best = next(r["loss"] for r in run.train if r["epoch"] == best["epoch"])
    if len(after) < 3 or final_val < 1.1 * best["loss"] or run.train[-1]["loss"] >= train_at_best:
        return None
    if any(r["loss"] < 1.02 * best["loss"] for r in after[-2:]):
        return None  # back near its best: a wobble, not a trend
    stopped = run.recipe.train.early_stopping.patience is not None and run.val[-1]["epoch"] < run.recipe.train.epochs
    return Finding(
        "overtraining", "info" if stopped else "warning",
        f"over-training: the validation loss was lowest ({fmt(best['loss'])}) at epoch {best['epoch']} and rose to "
        f"{fmt(final_val)} by epoch {run.val[-1]['epoch']} while the training loss kept falling"
        + ("; early stopping ended the run and `best` holds the best epoch" if stopped else ""),
        [] if stopped else ["train.early_stopping.patience=5"], f"or train.epochs={best['epoch'] + 2}; "
        "the best checkpoint (checkpoints/best) is kept", {"best_epoch": best["epoch"], "best_loss": best["loss"],
        "final_loss": final_val, "epoch": best["epoch"]}, plot="accuracy",
    )  # fmt: skip


@rule("val_better_than_train", "generalisation")
def val_better_than_train(run: RunRecords) -> Finding | None:
    """Validation clearly beats training accuracy measured the same way (eval mode): suspicious."""
    fit = run.fit
    if fit is None or not fit.eval_mode or fit.gap > -max(0.05, fit.noise) or fit.train < 0.5:
        return None  # below 0.5 the training itself is broken: other findings say why
    return Finding(
        "val_better_than_train", "warning",
        f"validation better than training, both in eval mode: {pct(fit.val)} vs {pct(fit.train)}", [],
        "check for leakage (the same images in both splits: `dragon doctor`) and for wrong labels in the training "
        "split only", {"train_accuracy": fit.train, "val_accuracy": fit.val}, plot="accuracy",
    )  # fmt: skip
