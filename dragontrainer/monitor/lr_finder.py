"""The learning-rate range test (Smith 2017), made robust: several sweeps, a median, a spread, and
plain words when the curve cannot be trusted.

One sweep raises the learning rate exponentially from `start_lr` to `end_lr` over `steps` optimiser
steps, smooths the loss (debiased exponential average) and stops once it exceeds `diverge_factor`×
its best. Its suggestion is the steepest descent of the smoothed loss against log lr; the conservative
suggestion is the lr of the loss minimum divided by `conservative_factor`. Sweeps differ in seed, data
order and (standalone) initialisation; the model, every RNG stream and the caller's optimiser (none is
touched: each sweep builds its own) are as before afterwards, so a following training is unchanged.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from dragontrainer.recipe import LrFindSpec, Recipe
from dragontrainer.run import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_text, check_usable_folder
from dragontrainer.train.state import capture_rng, restore_rng

NOISY_SPREAD = 3.0  # sweeps disagreeing by more than this factor: the suggestion is not trustworthy
FLAT_DROP = 0.1  # the loss must fall by at least this fraction of its start for the curve to mean something


@dataclass
class Sweep:
    """One range test: the lrs tried (effective, at the training batch), raw and smoothed losses."""

    seed: int
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    diverged: bool
    steepest: float | None = None  # effective lr of the steepest descent (None: no descent before the minimum)
    minimum: float = 0.0  # effective lr of the smoothed loss's minimum
    drop: float = 0.0  # fall of the smoothed loss from its start, as a fraction of the start
    early_minimum: bool = False  # the minimum came in the first tenth of the sweep


@dataclass
class LrFindResult:
    """Suggestions in `optim.lr` units (per `optim.reference_batch_size` images, like the recipe)."""

    suggestion: float  # median over sweeps of the steepest-descent lr
    low: float  # spread: smallest and largest per-sweep suggestion
    high: float
    conservative: float  # median over sweeps of (lr at the loss minimum) / conservative_factor
    use: str  # which of the two optim.lr=find trains with
    warnings: list[str]
    scale: float  # effective lr = optim.lr × scale (linear scaling rule)
    batch_size: int
    optimizer: str
    seconds: float
    sweeps: list[Sweep] = field(repr=False, default_factory=list)

    @property
    def trusted(self) -> bool:
        return not self.warnings

    @property
    def chosen(self) -> float:
        return self.conservative if self.use == "conservative" else self.suggestion

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["trusted"], record["chosen"] = self.trusted, self.chosen
        return record

    def describe(self) -> str:
        lines = [
            f"suggested optim.lr {self.suggestion:.3g} (spread {self.low:.3g}–{self.high:.3g} over "
            f"{len(self.sweeps)} sweeps); conservative {self.conservative:.3g}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ one sweep


def sweep(
    model: nn.Module, recipe: Recipe, data: Any, augment: Any, criterion: nn.Module, seed: int, index: int,
    amp: torch.dtype | None,
) -> Sweep:  # fmt: skip
    """One exponential lr sweep from the model's current weights, with its own optimiser."""
    from dragontrainer.optim.optimizers import create_optimizer
    from dragontrainer.optim.param_groups import build_param_groups
    from dragontrainer.optim.regularizers import clip_gradients

    spec = recipe.lr_find
    groups, _ = build_param_groups(model, recipe.optim.weight_decay)
    optimizer = create_optimizer(groups, recipe.optim, 1.0)  # base_lr = lr_mult: the sweep sets the lr
    parameters = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    device = data.train.device
    generator = torch.Generator(device).manual_seed(seed + 1)
    ratio = spec.end_lr / spec.start_lr
    lrs, losses, smoothed = [], [], []
    average, best, diverged = 0.0, math.inf, False
    model.train()

    def batches() -> Any:
        epoch = 0
        while True:  # later "epochs" far from the training's own, so orders differ per sweep
            yield from data.train.batches(epoch=1_000_000 * (index + 1) + epoch)
            epoch += 1

    for step, (x, y) in zip(range(spec.steps), batches(), strict=False):
        lr = spec.start_lr * ratio ** (step / (spec.steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr
        pixels, targets = augment(x.float().div_(255.0), y, generator)
        inputs = data.preprocessor.normalize(pixels)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(inputs)
        loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(parameters, recipe.regularize)
        optimizer.step()
        value = float(loss.detach())  # one sync per step: a few hundred steps
        if not math.isfinite(value):
            diverged = True
            break
        average = spec.smoothing * average + (1 - spec.smoothing) * value
        smooth = average / (1 - spec.smoothing ** (step + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        best = min(best, smooth)
        if step >= 5 and smooth > spec.diverge_factor * best:
            diverged = True
            break
    optimizer.zero_grad(set_to_none=True)
    return analyse(Sweep(seed, lrs, losses, smoothed, diverged), spec)


def analyse(result: Sweep, spec: LrFindSpec) -> Sweep:
    """Steepest descent of the smoothed loss against log lr, before its minimum; the minimum itself."""
    smoothed = np.asarray(result.smoothed)
    if len(smoothed) < 3:
        result.minimum = result.lrs[0] if result.lrs else spec.start_lr
        result.early_minimum = True
        return result
    x = np.log10(np.asarray(result.lrs))
    lowest = int(np.argmin(smoothed))
    head = max(3, len(result.losses) // 20)
    start = float(np.mean(result.losses[:head]))
    result.minimum = float(result.lrs[lowest])
    result.drop = (start - float(smoothed[lowest])) / start if start > 0 else 0.0
    result.early_minimum = lowest <= len(smoothed) // 10
    k = max(1, spec.steps // 40)  # slope over ±k steps: steadier than neighbouring differences
    centres = np.arange(k, lowest - k + 1)
    if len(centres):
        slopes = (smoothed[centres + k] - smoothed[centres - k]) / (x[centres + k] - x[centres - k])
        result.steepest = float(result.lrs[int(centres[int(np.argmin(slopes))])])
    return result


# ------------------------------------------------------------------------------ several sweeps


def range_test(
    model: nn.Module, recipe: Recipe, data: Any, augment: Any, criterion: nn.Module, *,
    initial_states: Sequence[dict[str, torch.Tensor]], amp: torch.dtype | None = None,
    console: Console | None = None,
) -> LrFindResult:  # fmt: skip
    """`len(initial_states)` sweeps (sweep i from state i, seed recipe.seed + i); the model's weights,
    buffers and train/eval mode and every RNG stream are restored afterwards."""
    from dragontrainer.optim.optimizers import effective_lr

    started = time.perf_counter()
    kept = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    scratch = torch.Generator()
    rng = capture_rng(scratch)
    sweeps = []
    try:
        for index, state in enumerate(initial_states):
            model.load_state_dict(state)
            seed = recipe.seed + index
            sweeps.append(sweep(model, recipe, data, augment, criterion, seed, index, amp))
            if console is not None:
                done = sweeps[-1]
                console.print(
                    f"lr-find sweep {index + 1}/{len(initial_states)}: {len(done.lrs)} steps, steepest descent at "
                    f"{'—' if done.steepest is None else format(done.steepest, '.3g')} (effective lr)"
                )
    finally:
        model.load_state_dict(kept)
        model.train(was_training)
        for p in model.parameters():
            p.grad = None
        restore_rng(rng, scratch)
    batch = recipe.train.batch_size * recipe.train.accumulate_steps
    scale = effective_lr(recipe.optim.model_copy(update={"lr": 1.0}), batch)
    return summarise(sweeps, recipe, scale, time.perf_counter() - started)


def summarise(sweeps: list[Sweep], recipe: Recipe, scale: float, seconds: float) -> LrFindResult:
    """Median and spread of the per-sweep suggestions, in optim.lr units, and the reasons to doubt them."""
    spec = recipe.lr_find
    found = [s.steepest for s in sweeps if s.steepest is not None]
    conservative = 10 ** statistics.median(math.log10(s.minimum / spec.conservative_factor) for s in sweeps)
    warnings = []
    if statistics.median(s.drop for s in sweeps) < FLAT_DROP:
        drop = statistics.median(s.drop for s in sweeps)
        warnings.append(
            f"too flat: the loss fell only {drop:.0%} over the sweep, so the curve says little about the learning "
            f"rate (check the data and model with dragon doctor, or widen lr_find.start_lr/end_lr)"
        )
    if sum(s.early_minimum and s.diverged for s in sweeps) * 2 > len(sweeps) or not found:
        warnings.append(
            f"diverging from the start: the loss rose from the first steps, so lr_find.start_lr="
            f"{spec.start_lr:g} is already too high; lower it"
        )
    if found and max(found) / min(found) > NOISY_SPREAD:
        warnings.append(
            f"too noisy: the sweeps disagree by a factor of {max(found) / min(found):.1f} (more than "
            f"{NOISY_SPREAD:g}); prefer the conservative value or raise lr_find.repeats / lr_find.steps"
        )
    if not any(s.diverged for s in sweeps):
        warnings.append(
            f"the loss never blew up up to lr_find.end_lr={spec.end_lr:g}: the steepest descent may lie "
            f"beyond it; raise lr_find.end_lr"
        )
    effective = found or [s.minimum / spec.conservative_factor for s in sweeps]
    median = 10 ** statistics.median(math.log10(v) for v in effective)
    return LrFindResult(
        suggestion=median / scale, low=min(effective) / scale, high=max(effective) / scale,
        conservative=conservative / scale, use=spec.use, warnings=warnings, scale=scale,
        batch_size=recipe.train.batch_size, optimizer=recipe.optim.name, seconds=seconds, sweeps=sweeps,
    )  # fmt: skip


# -------------------------------------------------------------------------------- plot and files


def plot(result: LrFindResult) -> bytes:
    """Every sweep's smoothed loss against optim.lr (raw losses faint), the spread band, both suggestions."""
    from dragontrainer.report.plots import plt, png

    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    for i, s in enumerate(result.sweeps):
        lrs = np.asarray(s.lrs) / result.scale
        axis.plot(lrs, s.losses, color=f"C{i % 10}", alpha=0.15, linewidth=0.7)
        axis.plot(lrs, s.smoothed, color=f"C{i % 10}", label=f"sweep {i + 1} (seed {s.seed})")
    axis.axvspan(result.low, result.high, color="green", alpha=0.15, label="spread of the suggestions")
    axis.axvline(result.suggestion, color="green", label=f"suggestion {result.suggestion:.3g}")
    axis.axvline(result.conservative, color="grey", linestyle="--", label=f"conservative {result.conservative:.3g}")
    finite = [v for s in result.sweeps for v in s.smoothed]
    if finite:
        axis.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.05)
    title = "learning-rate range test" + ("" if result.trusted else " (not to be trusted: see warnings)")
    axis.set(xscale="log", xlabel=f"optim.lr (effective lr = optim.lr × {result.scale:g})", ylabel="training loss",
             title=title)  # fmt: skip
    axis.legend(fontsize=8)
    return png(figure)


def write_outputs(folder: Path, result: LrFindResult) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "lr_find.json", result.to_dict())
    atomic_write_bytes(folder / "lr_find.png", plot(result))
    return folder / "lr_find.json", folder / "lr_find.png"


def apply_to_recipe_file(path: Path, lr: float) -> None:
    """Write `optim.lr: lr` into a YAML recipe file (created if missing; other keys kept, comments lost)."""
    import yaml

    from dragontrainer.recipe import read_yaml_mapping

    data = read_yaml_mapping(path) if path.exists() else {}
    optim = data.get("optim") if isinstance(data.get("optim"), dict) else {}
    data["optim"] = {**optim, "lr": float(f"{lr:.3g}")}
    Recipe.from_dict(data, origin=str(path))  # still a valid recipe
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------ entry points


def criterion_for(recipe: Recipe, data: Any) -> nn.Module:
    """The training loss of the main task (its class weights, data.balance=class_weights included): the
    range test measures the loss the run will minimise."""
    from dragontrainer.train.build import loss_weights
    from dragontrainer.train.multitask import create_criterion

    weights = loss_weights(recipe, data)
    device = data.train.device
    return create_criterion(recipe, None if weights is None else weights.to(device), None).to(device)


def lr_find(
    recipe: Recipe | Any = None, overrides: Sequence[str] = (), *, repeats: int | None = None,
    out: str | Path | None = None, progress: bool = False,
) -> LrFindResult:  # fmt: skip
    """Run the range test for a recipe: `repeats` sweeps, each from its own initialisation (seed, seed+1,
    ...). With `out`, writes lr_find.json and lr_find.png there."""
    from dragontrainer.api import as_recipe
    from dragontrainer.data.augment import create_augmenter
    from dragontrainer.data.prepare import prepare_data
    from dragontrainer.nn.models import create_model
    from dragontrainer.nn.pretrained import load_pretrained
    from dragontrainer.train.device import configure_determinism, resolve_device
    from dragontrainer.train.precision import autocast_dtype
    from dragontrainer.train.state import seed_everything

    recipe = as_recipe(recipe, overrides)
    if repeats is not None:
        recipe = recipe.with_overrides({"lr_find.repeats": repeats})
    console = Console(stderr=True, quiet=not progress)
    device = resolve_device(recipe.train.device)
    configure_determinism(recipe.train.deterministic, device)
    seed_everything(recipe.seed)
    if out is not None:
        check_out_folder(Path(out))  # before any work: never write into a user's folder
    data = prepare_data(recipe, device)
    channels, size, _ = data.images.image_shape
    augment = create_augmenter(recipe.augment, data.images.image_shape, data.images.flip_safe,
                               data.training_images(), data.num_classes)  # fmt: skip
    states, model = [], None
    for index in range(recipe.lr_find.repeats):
        seed_everything(recipe.seed + index)
        model = create_model(recipe.model, in_channels=channels, num_classes=data.num_classes, image_size=size)
        model = model.to(device)
        if recipe.model.weights is not None:
            load_pretrained(model, recipe.model.weights)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert model is not None
    result = range_test(model, recipe, data, augment, criterion_for(recipe, data), initial_states=states,
                        amp=autocast_dtype(recipe.train.precision, device), console=console)  # fmt: skip
    if out is not None:
        write_outputs(Path(out), result)
    return result


def check_out_folder(out: Path) -> None:
    """--out: a new or empty folder, or one holding only an earlier lr-find's two files (rewritten)."""
    if out.is_dir() and {p.name for p in out.iterdir()} <= {"lr_find.json", "lr_find.png"}:
        return
    check_usable_folder(out, what="--out")


def resolve_found_lr(
    recipe: Recipe, run: RunDir, model: nn.Module, data: Any, augment: Any, console: Console, *,
    amp: torch.dtype | None, resume: bool,
) -> Recipe:  # fmt: skip
    """`optim.lr=find` inside `fit`: the range test from the model as it will train (same weights for every
    sweep), its files in the run folder, and the run's recipe.yaml given the number (so resume, report and
    diagnosis see a float). A resumed run reads the number back instead of searching again."""
    saved = run.file("lr_find.json")
    if resume and saved.is_file():
        lr = float(json.loads(saved.read_text(encoding="utf-8"))["chosen"])
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result = range_test(model, recipe, data, augment, criterion_for(recipe, data),
                            initial_states=[state] * recipe.lr_find.repeats, amp=amp, console=console)  # fmt: skip
        write_outputs(run.path, result)
        lr = result.chosen
        console.print(f"optim.lr=find: training with {lr:.4g} ({result.use}); " + result.describe())
    resolved = recipe.with_overrides({"optim.lr": lr})
    atomic_write_text(run.recipe_path, RunDir.open(run.path).recipe().with_overrides({"optim.lr": lr}).to_yaml())
    return resolved


def report_section(run_path: Path) -> tuple[bytes | None, str]:
    """The report's figure and caption for a run trained with optim.lr=find (None when it was not)."""
    png_file, json_file = run_path / "lr_find.png", run_path / "lr_find.json"
    if not png_file.is_file() or not json_file.is_file():
        return None, ""
    found = json.loads(json_file.read_text(encoding="utf-8"))
    caption = (
        f"optim.lr=find: {len(found['sweeps'])} range-test sweeps; suggestion {found['suggestion']:.3g} "
        f"(spread {found['low']:.3g}–{found['high']:.3g}), conservative {found['conservative']:.3g}; trained with "
        f"{found['chosen']:.3g}. " + " ".join(f"Warning: {w}." for w in found["warnings"])
    )
    return png_file.read_bytes(), caption
