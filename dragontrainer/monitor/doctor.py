"""`dragon doctor`: pre-flight checks of a recipe before spending compute (seconds, not minutes).

Karpathy's recipe, automated: look at the data (statistics after preprocessing, class balance,
labels per batch, duplicates across splits, whether nearest neighbours share labels), check the
loss at initialisation against ln C, that every parameter gets a gradient, that the model can
overfit one tiny batch, and that the learning rate brings the loss down in a few steps.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from dragontrainer.data.prepare import PreparedData, prepare_data
from dragontrainer.data.residency import image_digests
from dragontrainer.monitor.diagnose import expected_distinct_classes
from dragontrainer.monitor.stats import input_problem, input_summary
from dragontrainer.nn.models import create_model
from dragontrainer.optim.optimizers import auto_lr, base_lr, create_optimizer, effective_lr
from dragontrainer.optim.param_groups import build_param_groups
from dragontrainer.recipe import Recipe
from dragontrainer.train.device import configure_determinism, resolve_device
from dragontrainer.train.state import seed_everything

Status = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str  # what was measured, in words
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class DoctorReport:
    checks: list[Check]
    seconds: float

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.failed, "seconds": self.seconds, "checks": [asdict(c) for c in self.checks]}


@dataclass
class Patient:
    """What the checks share: the recipe, its data on the device and a way to build fresh models."""

    recipe: Recipe
    data: PreparedData
    device: torch.device

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def model(self) -> nn.Module:
        seed_everything(self.recipe.seed)
        channels, size, _ = self.data.images.image_shape
        spec = self.recipe.model
        return create_model(spec, in_channels=channels, num_classes=self.num_classes, image_size=size).to(self.device)

    def batch(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.data.train.batches(epoch=0))
        if size is not None:
            x, y = x[:size], y[:size]
        return self.data.preprocessor.apply(x), y

    def criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=self.recipe.train.label_smoothing)


CHECKS: dict[str, Callable[[Patient], Check]] = {}


def check(name: str) -> Callable[[Callable[[Patient], Check]], Callable[[Patient], Check]]:
    def add(function: Callable[[Patient], Check]) -> Callable[[Patient], Check]:
        CHECKS[name] = function
        return function

    return add


# ------------------------------------------------------------------------------ data


@check("input_statistics")
def input_statistics(patient: Patient) -> Check:
    """Zero mean, unit scale per channel after preprocessing (CS231n: zero-centre, normalise)."""
    x, _ = patient.batch()
    numbers = input_summary(x)
    mean, std = numbers["mean"], numbers["std"]
    name = patient.recipe.preprocess.name
    problem = input_problem(numbers)
    if problem == "scale":
        return Check("input_statistics", "fail", f"inputs after preprocessing ({name}) have standard deviation "
                     f"{std:.3g}: far from 1 (preprocess.name=standardize)", numbers)  # fmt: skip
    if problem == "centre":
        return Check("input_statistics", "warn", f"inputs after preprocessing ({name}) are not zero-centred: mean "
                     f"{mean:.3g}, std {std:.3g} (preprocess.name=standardize)", numbers)  # fmt: skip
    return Check("input_statistics", "pass", f"inputs have mean {mean:.3g} and std {std:.3g}", numbers)


@check("class_balance")
def class_balance(patient: Patient) -> Check:
    counts = patient.data.info()["train_class_counts"]
    present = [c for c in counts if c]
    ratio = max(present) / min(present)
    numbers = {"counts": counts, "ratio": ratio}
    if ratio >= 3 and patient.recipe.train.class_weights == "none":
        return Check("class_balance", "warn", f"largest class has {ratio:.1f}× the images of the smallest "
                     "(train.class_weights=balanced)", numbers)  # fmt: skip
    return Check("class_balance", "pass", f"largest/smallest class {ratio:.1f}×", numbers)


FLIP_PROBE_IMAGES = 600  # per side: enough for a stable linear probe, a second of CPU


@check("flip_meaning")
def flip_meaning(patient: Patient) -> Check:
    """Horizontal flips are on by default for user data; for text, digits or anything with a handedness a
    mirrored image is another thing. A linear probe that tells mirrored from original training images
    apart (cross-validated, chance 50%) shows that flipping changes what the images are."""
    spec, images = patient.recipe.augment.hflip, patient.data.images
    p = (0.5 if images.flip_safe else 0.0) if spec.p == "auto" else float(spec.p)
    if p == 0:
        return Check("flip_meaning", "pass", "horizontal flips are off", {"p": 0.0})
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    train = patient.data.split.train
    pick = np.random.default_rng(patient.recipe.seed).permutation(train)[:FLIP_PROBE_IMAGES]
    x = images.x[pick].astype(np.float32) / 255.0
    both = np.concatenate([x, x[..., ::-1]]).reshape(2 * len(x), -1)
    both -= both.mean(axis=0)
    side = np.repeat([0, 1], len(x))
    folds = min(3, len(x))
    if folds < 2:
        return Check("flip_meaning", "pass", "too few images to test what flipping does", {"p": p})
    accuracy = float(cross_val_score(LogisticRegression(C=0.1, max_iter=300), both, side, cv=folds).mean())
    numbers = {"p": p, "probe_accuracy": accuracy, "images": len(x)}
    if accuracy >= 0.75:
        return Check("flip_meaning", "warn", f"a linear probe tells mirrored from original images apart "
                     f"({accuracy:.0%}, chance 50%): flipping changes what these images are (text, digits, "
                     f"handedness?); turn it off with augment.hflip.p=0", numbers)  # fmt: skip
    return Check("flip_meaning", "pass", f"mirrored images look like originals to a linear probe ({accuracy:.0%}, "
                 f"chance 50%): flips (p={p:g}) are safe", numbers)  # fmt: skip


@check("batch_labels")
def batch_labels(patient: Patient) -> Check:
    """Classes per training batch as the loader serves them, against random batches."""
    loader = patient.data.train
    seen = [len(torch.unique(y)) for _, (_, y) in zip(range(10), loader.batches(epoch=0), strict=False)]
    counts = patient.data.info()["train_class_counts"]
    expected = expected_distinct_classes(counts, patient.recipe.train.batch_size)
    observed = statistics.median(seen)
    numbers = {"median_classes_per_batch": observed, "expected": expected, "shuffle": loader.shuffle}
    if observed < 0.5 * expected and expected >= 2:
        return Check("batch_labels", "fail", f"batches hold {observed:g} class(es) on median where random batches "
                     f"hold {expected:.1f}: the data is ordered by label (train.shuffle=true)", numbers)  # fmt: skip
    return Check("batch_labels", "pass", f"{observed:g} classes per batch (random: {expected:.1f})", numbers)


def row_keys(x: np.ndarray) -> np.ndarray:
    """Each image's bytes as one comparable value, for set operations without a Python loop."""
    rows = np.ascontiguousarray(x.reshape(len(x), -1))
    return rows.view(np.dtype((np.void, rows.shape[1] * rows.itemsize))).ravel()


def split_keys(data: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    """Comparable keys of the training images and of the held-out ones (validation + test). Streamed
    data is read in chunks and hashed (16-byte digests), never copied whole into memory."""
    split = data.split
    if data.residency is None or data.residency.mode == "device":
        x = data.images.x
        return row_keys(x[split.train]), row_keys(x[np.concatenate([split.val, split.test])])
    held = [image_digests(loader) for loader in (data.val, data.test) if loader is not None]
    return image_digests(data.train), np.concatenate(held)


@check("split_overlap")
def split_overlap(patient: Patient) -> Check:
    """Identical images in training and validation/test make the held-out score a lie."""
    train_keys, held = split_keys(patient.data)
    duplicates = int(np.isin(held, train_keys).sum()) if len(held) else 0
    numbers = {"duplicates": duplicates, "held_out": len(held)}
    share = duplicates / max(len(held), 1)
    if share > 0.05:
        return Check("split_overlap", "fail", f"{duplicates} of {len(held)} validation/test images "
                     f"({share:.0%}) are also in training: remove duplicates from the data", numbers)  # fmt: skip
    if duplicates:
        return Check("split_overlap", "warn", f"{duplicates} validation/test image(s) also appear in training",
                     numbers)  # fmt: skip
    return Check("split_overlap", "pass", "no image appears in both training and validation/test", numbers)


def neighbour_agreement(
    queries: torch.Tensor, query_y: torch.Tensor, references: torch.Tensor, reference_y: torch.Tensor
) -> float:
    """Share of queries whose nearest reference (Euclidean, flattened) has the query's label."""
    nearest = torch.cdist(queries.flatten(1), references.flatten(1)).argmin(1)
    return float((reference_y[nearest] == query_y).float().mean())


@check("label_consistency")
def label_consistency(patient: Patient) -> Check:
    """How often a validation image's nearest training image has the same label, on raw pixels and
    after preprocessing. Real labels agree far above chance, even on pixels; labels unrelated to the
    images agree at chance; agreement lost only after preprocessing means the preprocessing destroys it."""
    data = patient.data
    generator = torch.Generator().manual_seed(patient.recipe.seed)
    train_pick = torch.randperm(data.train.num_images, generator=generator)[:4000].to(patient.device)
    reference_x, reference_y = data.train.take(train_pick)
    query_x, query_y = data.val.take(torch.arange(min(500, data.val.num_images)))
    agreement = neighbour_agreement(query_x.float() / 255, query_y, reference_x.float() / 255, reference_y)
    preprocessed = neighbour_agreement(data.preprocessor.apply(query_x), query_y,
                                       data.preprocessor.apply(reference_x), reference_y)  # fmt: skip
    counts = data.info()["train_class_counts"]
    chance = sum((c / sum(counts)) ** 2 for c in counts)  # two random images share a label
    band = chance + 3 * math.sqrt(chance * (1 - chance) / max(len(query_y), 1))
    numbers = {"agreement": agreement, "preprocessed_agreement": preprocessed, "chance": chance,
               "queries": len(query_y)}  # fmt: skip
    if agreement <= band:
        return Check("label_consistency", "fail", f"a validation image's nearest training image has its label "
                     f"{agreement:.0%} of the time, chance is {chance:.0%}: labels look unrelated to the images "
                     "(shuffled or misaligned)", numbers)  # fmt: skip
    if preprocessed - chance < 0.5 * (agreement - chance):
        return Check("label_consistency", "warn", f"nearest-neighbour labels agree {agreement:.0%} on pixels but "
                     f"{preprocessed:.0%} after preprocessing ({patient.recipe.preprocess.name}), chance "
                     f"{chance:.0%}: the preprocessing drowns the signal", numbers)  # fmt: skip
    return Check("label_consistency", "pass", f"nearest-neighbour labels agree {agreement:.0%} (chance "
                 f"{chance:.0%})", numbers)  # fmt: skip


# ----------------------------------------------------------------------------- model


@check("initial_loss")
def initial_loss(patient: Patient) -> Check:
    """At initialisation every class should be about equally likely: loss ≈ ln C (CS231n)."""
    model = patient.model()
    x, y = patient.batch()
    model.eval()
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    expected = math.log(patient.num_classes)
    numbers = {"loss": loss, "expected": expected}
    if not math.isfinite(loss) or loss > 3 * expected:
        message = f"loss at initialisation is {loss:.3g}, expected ≈ ln {patient.num_classes} = {expected:.3g}"
        return Check("initial_loss", "fail", f"{message}: weights too large (model.init=auto)", numbers)
    if abs(loss - expected) > 0.5 * expected:
        return Check("initial_loss", "warn", f"loss at initialisation {loss:.3g} vs ln {patient.num_classes} = "
                     f"{expected:.3g}", numbers)  # fmt: skip
    return Check("initial_loss", "pass", f"{loss:.3g} at initialisation (ln {patient.num_classes} = {expected:.3g})",
                 numbers)  # fmt: skip


@check("gradient_flow")
def gradient_flow(patient: Patient) -> Check:
    """One backward pass: every trainable parameter must receive a non-zero gradient."""
    model = patient.model()
    model.train()
    x, y = patient.batch()
    patient.criterion()(model(x), y).backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not bool(p.grad.abs().max() > 0)]
    numbers = {"frozen": frozen, "unused": unused, "zero_gradient": zero}
    if unused or zero:
        names = ", ".join((unused + zero)[:5])
        return Check("gradient_flow", "fail", f"{len(unused) + len(zero)} parameter(s) get no gradient: {names}",
                     numbers)  # fmt: skip
    total = sum(1 for _ in model.parameters())
    note = f" ({len(frozen)} frozen: {', '.join(frozen[:5])})" if frozen else ""
    return Check("gradient_flow", "pass", f"all {total - len(frozen)} trainable tensors get a gradient{note}", numbers)


def train_steps(
    patient: Patient,
    model: nn.Module,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    *,
    steps: int,
    lr: float,
    adam: bool,
) -> list[float]:
    """Plain steps on a fixed batch `x, y`, or on the training batches when `x` is None; the loss of each step."""
    criterion = nn.CrossEntropyLoss()
    if adam:
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        groups, _ = build_param_groups(model, patient.recipe.optim.weight_decay)
        optimizer = create_optimizer(groups, patient.recipe.optim, lr)
    losses = []
    batches = patient.data.train.batches(epoch=0)
    for _ in range(steps):
        if x is None:
            raw, y = next(batches, (None, None))
            if raw is None:
                batches = patient.data.train.batches(epoch=1)
                raw, y = next(batches)
            inputs = patient.data.preprocessor.apply(raw)
        else:
            inputs = x
        loss = criterion(model(inputs), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    return losses


@check("overfit_batch")
def overfit_batch(patient: Patient) -> Check:
    """Karpathy: a model that cannot memorise a couple of dozen images has a bug in its pipeline."""
    model = patient.model()
    x, y = patient.batch(size=24)
    losses = train_steps(patient, model, x, y, steps=60, lr=1e-3, adam=True)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    numbers = {"accuracy": accuracy, "images": len(y), "steps": len(losses), "final_loss": losses[-1]}
    if accuracy < 0.9:
        return Check("overfit_batch", "fail", f"could not overfit {len(y)} images in {len(losses)} steps "
                     f"(accuracy {accuracy:.0%}): a pipeline or model bug (labels, preprocessing, a frozen "
                     "model)", numbers)  # fmt: skip
    return Check("overfit_batch", "pass", f"memorised {len(y)} images to {accuracy:.0%} in {len(losses)} steps",
                 numbers)  # fmt: skip


@check("lr_probe")
def lr_probe(patient: Patient) -> Check:
    """A few steps at lr/10, lr and 10·lr with the recipe's optimiser: the recipe's lr should bring the
    loss down and not lose clearly to a neighbour."""
    recipe = patient.recipe
    lr = effective_lr(recipe.optim, recipe.train.batch_size)
    base = patient.model()
    drops: dict[str, float] = {}
    for label, value in (("lr/10", lr / 10), ("lr", lr), ("10·lr", lr * 10)):
        losses = train_steps(patient, copy.deepcopy(base), None, None, steps=20, lr=value, adam=False)
        finite = all(math.isfinite(v) for v in losses)
        head, tail = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
        drops[label] = (1 - tail / head) if finite else -math.inf
    numbers = {"lr": lr, "loss_drop": drops}
    described = ", ".join(f"{k} {v:.0%}" if math.isfinite(v) else f"{k} diverged" for k, v in drops.items())
    if drops["lr"] == -math.inf:
        return Check("lr_probe", "fail", f"the loss diverged within 20 steps at lr {lr:.3g} ({described}): "
                     f"lower it (optim.lr={base_lr(recipe.optim) / 10:.3g})", numbers)  # fmt: skip
    if drops["lr"] <= 0:
        return Check("lr_probe", "warn", f"the loss did not fall in 20 steps at lr {lr:.3g} ({described})", numbers)
    ratio = base_lr(recipe.optim) / auto_lr(recipe.optim.name)
    if not 0.1 < ratio < 10:
        return Check("lr_probe", "warn", f"lr {base_lr(recipe.optim):.3g} is {ratio:.3g}× the usual rate of "
                     f"{recipe.optim.name} ({auto_lr(recipe.optim.name):.3g} per {recipe.optim.reference_batch_size}"
                     f" images; optim.lr=auto); loss drop over 20 steps: {described}", numbers)  # fmt: skip
    return Check("lr_probe", "pass", f"loss drop over 20 steps: {described}", numbers)


# ------------------------------------------------------------------------------ entry


START_CHECKS = ("input_statistics", "class_balance", "batch_labels", "split_overlap", "label_consistency")


def start_checks(recipe: Recipe, data: PreparedData, device: torch.device) -> dict[str, Any]:
    """The cheap data checks, run at the start of every run for the diagnosis (a `checks` line in
    stats.jsonl): no model, no training step; the global RNG streams are left as they were."""
    started = time.perf_counter()
    patient = Patient(recipe, data, device)
    with torch.random.fork_rng(devices=[]):
        checks = {name: asdict(CHECKS[name](patient)) for name in START_CHECKS}
    return {"kind": "checks", "step": 0, "checks": checks, "seconds": time.perf_counter() - started}


def doctor(recipe: Recipe) -> DoctorReport:
    """Run every check on the recipe's data and model (no run folder is written)."""
    started = time.perf_counter()
    device = resolve_device(recipe.train.device)
    configure_determinism(recipe.train.deterministic, device)
    seed_everything(recipe.seed)
    patient = Patient(recipe, prepare_data(recipe, device), device)
    checks = [function(patient) for function in CHECKS.values()]
    return DoctorReport(checks, time.perf_counter() - started)
