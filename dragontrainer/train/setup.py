"""What `fit` builds before the first step besides model and optimiser: the monitor, the loss weights,
the files a run keeps for eval/predict/report, and the message when a run is lengthened.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dragontrainer.data.augment import Augmenter
from dragontrainer.data.prepare import PreparedData
from dragontrainer.data.preprocess import Preprocessor
from dragontrainer.errors import RecipeError
from dragontrainer.monitor.stats import Monitor, watched_parameters
from dragontrainer.optim.schedules import create_schedule
from dragontrainer.recipe import Recipe
from dragontrainer.run import RunDir
from dragontrainer.run_files import read_tensors
from dragontrainer.train.state import capture_rng, restore_rng


def create_monitor(
    recipe: Recipe, run: RunDir, model: nn.Module, data: PreparedData, criterion: nn.Module, steps_per_epoch: int,
    *, resume: bool,
) -> Monitor | None:  # fmt: skip
    """The monitor with its fixed probe batch (training images spread over the split) and the initial
    weights (saved in init.safetensors so a resumed run still measures the distance from them)."""
    if not recipe.monitor.enabled:
        return None
    from safetensors.torch import save

    train = data.train
    device = train.device
    count = min(recipe.monitor.probe_size, train.num_images)
    index = torch.linspace(0, train.num_images - 1, count, device=device).long()
    probe_images, probe_labels = train.take(index)
    probe = data.preprocessor.apply(probe_images)

    def noise_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        picks = torch.randint(train.num_images, (max(count, 8),), generator=generator).to(device)
        images, labels = train.take(picks)
        return data.preprocessor.apply(images), labels

    init_file = run.file("init.safetensors")
    initial = None
    if resume and init_file.exists():
        initial = {k: v.to(device) for k, v in read_tensors(init_file).items()}
    monitor = Monitor(
        model, recipe.monitor, steps_per_epoch=steps_per_epoch, probe=probe, noise_batch=noise_batch,
        criterion=criterion, initial=initial,
    )  # fmt: skip
    if initial is None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in watched_parameters(model).items()}
        run.write_bytes(init_file.name, save(tensors))
    if not resume:  # a fresh start (also after a kill before the first checkpoint): a fresh file
        run.keep_stats_through(-1)
        run.append_stats([monitor.probe_record(data.num_classes, probe_labels)])
        from dragontrainer.monitor.doctor import start_checks

        run.append_stats([start_checks(recipe, data, device)])
    return monitor


def class_weights(choice: str | list[float], train_labels: Any, num_classes: int) -> torch.Tensor | None:
    """Loss weight per class: `balanced` gives N / (C · count_c) from the training split (King & Zeng),
    so every class carries the same total weight; a list is taken as given (one value per class)."""
    if choice == "none":
        return None
    if isinstance(choice, list):
        if len(choice) != num_classes:
            raise RecipeError(f"recipe field train.class_weights: {len(choice)} weights for {num_classes} classes")
        return torch.tensor(choice, dtype=torch.float32)
    counts = torch.bincount(torch.as_tensor(train_labels), minlength=num_classes).float()
    return torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), 0.0)


def save_augmented_samples(run: RunDir, data: PreparedData, augment: Augmenter, seed: int, count: int = 16) -> None:
    """A few training images as the augmentation leaves them, for the report (own generator: the
    training RNG streams are untouched)."""
    from safetensors.torch import save

    x, y = next(data.train.batches(epoch=0))
    x, y = x[:count], y[:count]
    generator = torch.Generator(x.device).manual_seed(seed + 7)
    saved = capture_rng(generator)  # mixers draw λ from NumPy's global generator: put every stream back
    pixels, _ = augment(x.float().div(255.0), y, generator)
    restore_rng(saved, generator)
    images = pixels.clamp(0, 1).mul(255).round().to(torch.uint8).cpu().contiguous()
    run.write_bytes("augment_samples.safetensors", save({"images": images, "labels": y.cpu()}))


def save_preprocessor(run: RunDir, preprocessor: Preprocessor) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in preprocessor.state_dict().items()}
    run.write_bytes("preprocess.safetensors", save(tensors))


def describe_extension(recipe: Recipe, old_epochs: int, steps_per_epoch: int, step: int) -> str:
    """What lengthening the run does to the learning-rate curve (the schedule spans the new length)."""

    def factor(epochs: int) -> float:
        schedule = create_schedule(
            recipe.schedule, steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * epochs
        )
        return schedule(step)

    before, after = factor(old_epochs), factor(recipe.train.epochs)
    return (
        f"extending the run from {old_epochs} to {recipe.train.epochs} epochs: the {recipe.schedule.name} schedule "
        f"now spans {recipe.train.epochs} epochs, so at step {step} the learning rate factor goes from "
        f"{before:.3g} to {after:.3g}"
        + (" (it rises again: the decay had nearly finished)" if after > 1.5 * before else "")
    )
