"""The Python API; the CLI is a thin layer over these functions.

>>> from dragontrainer import Recipe, train
>>> result = train(Recipe.load(overrides=["train.epochs=2"]))   # doctest: +SKIP
>>> result.val_accuracy, result.run_dir                          # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from dragontrainer.data.augment import flip_averaged_logits
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.prepare import prepare_data
from dragontrainer.data.preprocess import Preprocessor, create_preprocessor
from dragontrainer.data.residency import whole_set_loader
from dragontrainer.data.sources import convert_color, decode_for_network, load_images
from dragontrainer.errors import DataError, DragonError, RecipeError, RunError
from dragontrainer.nn.models import create_model
from dragontrainer.nn.multitask import create_multitask_model
from dragontrainer.recipe import Recipe
from dragontrainer.run import RunDir
from dragontrainer.run_files import DataInfo, read_json, read_tensors
from dragontrainer.train import distributed
from dragontrainer.train.callbacks import Callback
from dragontrainer.train.checkpoint import checkpoint_folder, load_model_weights
from dragontrainer.train.class_metrics import per_class_metrics
from dragontrainer.train.device import resolve_device
from dragontrainer.train.evaluate import evaluate
from dragontrainer.train.loop import fit
from dragontrainer.train.multitask import (
    TaskSet,
    check_same_tasks,
    create_criterion,
    evaluate_tasks,
    resolve_tasks,
    task_data,
    task_rows,
)
from dragontrainer.train.outcomes import TrainingDiverged, TrainingInterrupted, TrainResult


def as_recipe(recipe: Recipe | Mapping[str, Any] | str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """A Recipe from a Recipe, a nested dict, a YAML path or None (defaults), then overrides."""
    if recipe is None or isinstance(recipe, (str, Path)):
        return Recipe.load(recipe, overrides)
    base = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
    return base.with_overrides(overrides) if overrides else base


def train(
    recipe: Recipe | Mapping[str, Any] | str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    console: Console | None = None,
    nproc: int | None = None,
) -> TrainResult:
    """Train a recipe into a new run folder and return the result (run_dir, history, final metrics).

    `nproc=N` trains with N ranks on this machine (DistributedDataParallel, `torchrun --standalone`);
    a script launched by torchrun itself calls `train(recipe)` on every rank: each joins the process
    group, and every rank gets rank 0's result (train/distributed.py)."""
    resolved = as_recipe(recipe, overrides)
    if nproc is not None and nproc != 1:
        from dragontrainer.train.launch import train_ranks

        return train_ranks(resolved, nproc, callbacks=callbacks, progress=progress)
    with distributed.session(resolved.train.device) as ranks:
        run = distributed.create_run(resolved, ranks)  # rank 0 creates it and tells the others where
        try:
            with run.lock():
                return fit(run.recipe(), run, progress=progress, callbacks=callbacks, console=console)
        except (TrainingDiverged, TrainingInterrupted):
            raise  # training ran: its statistics, findings and report are the evidence
        except BaseException:
            run.discard_if_unstarted()  # whatever stopped it before training began: leave nothing half-made
            raise


def doctor(recipe: Recipe | Mapping[str, Any] | str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """Pre-flight checks of a recipe (data, initial loss, gradient flow, overfitting one batch, lr):
    a `DoctorReport` whose `failed` says whether training would be wasted."""
    from dragontrainer.monitor.doctor import doctor as run_checks

    return run_checks(as_recipe(recipe, overrides))


def report(run_dir: str | Path) -> tuple[Path, list[Any]]:
    """Diagnose a run folder (again): writes findings.json and report.html; returns the page and findings."""
    from dragontrainer.report.html import write_report

    return write_report(run_dir)


EXTENDABLE = ("train.epochs", "train.early_stopping.")  # what may change when a run is continued


class RunFinished(DragonError):
    """`dragon resume` of a run that has nothing left to do; carries the stored result."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def resume(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    progress: bool = False,
    console: Console | None = None,
    callbacks: Sequence[Callback] = (),
    nproc: int | None = None,
) -> TrainResult:
    """Continue a stopped run from its `last` checkpoint; the result equals an uninterrupted run's.
    `overrides` may lengthen it (`train.epochs=60`) or change early stopping; a finished run with
    nothing to add raises RunFinished (its stored result is not rewritten). `nproc=N`: with N ranks,
    whatever number of ranks the run was started with (the global sample order does not depend on it)."""
    if nproc is not None and nproc != 1:
        from dragontrainer.train.launch import resume_ranks

        return resume_ranks(run_dir, overrides, nproc, callbacks=callbacks, progress=progress)
    with distributed.session(RunDir.open(run_dir).recipe().train.device) as ranks:
        return resume_run(distributed.open_run(run_dir, ranks), overrides, progress=progress, console=console,
                          callbacks=callbacks)  # fmt: skip


def resume_run(
    run: RunDir, overrides: Sequence[str], *, progress: bool, console: Console | None, callbacks: Sequence[Callback]
) -> TrainResult:
    """`resume` in this process (one rank of several, or the only one)."""
    with run.lock():
        run.remove_stale_temporaries()  # a kill during a checkpoint swap leaves .last.XXXXXXXX.tmp behind
        recipe = run.recipe()
        distributed.current().barrier()  # several ranks: all have read the recipe before rank 0 extends it
        extended_from = None
        if overrides:
            recipe, extended_from = extend_recipe(run, recipe, overrides)
        has_checkpoint = checkpoint_folder(run.checkpoints / "last") is not None
        if extended_from is None and has_checkpoint and run.file("result.json").is_file():
            summary = json.loads(run.file("result.json").read_text(encoding="utf-8"))
            raise RunFinished(
                f"{run.path}: finished ({summary.get('epochs')} of {recipe.train.epochs} epochs"
                + (f"; {summary['stop_reason']}" if summary.get("stop_reason") else "")
                + f"); to train longer: dragon resume {run.path} train.epochs=N",
                summary,
            )
        if not has_checkpoint:
            run.keep_metrics_through(0)  # killed before the first checkpoint: start again
        return fit(recipe, run, resume=has_checkpoint, progress=progress, callbacks=callbacks, console=console,
                   extended_from=extended_from if has_checkpoint else None)  # fmt: skip


def extend_recipe(run: RunDir, recipe: Recipe, overrides: Sequence[str]) -> tuple[Recipe, int | None]:
    """Apply the allowed overrides of a continued run and record the new recipe in its folder."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not (key == EXTENDABLE[0] or key.startswith(EXTENDABLE[1])):
            raise RecipeError(
                f"{key}: only train.epochs and train.early_stopping.* can change when a run is continued; "
                f"for anything else start a new run (model.weights={run.path} starts from its weights)"
            )
    changed = recipe.with_overrides(overrides)
    if changed.train.epochs < recipe.train.epochs:
        raise RecipeError(f"train.epochs={changed.train.epochs}: the run is planned for {recipe.train.epochs}; "
                          "a continued run can only be made longer")  # fmt: skip
    run.write_text("recipe.yaml", changed.to_yaml())
    return changed, (recipe.train.epochs if changed.train.epochs > recipe.train.epochs else None)


@dataclass
class LoadedRun:
    """A trained run ready for inference: recipe, model with `best` weights, fitted preprocessing."""

    run: RunDir
    recipe: Recipe
    model: nn.Module
    preprocessor: Preprocessor
    classes: list[str]
    image_shape: tuple[int, int, int]
    device: torch.device
    class_weights: list[float] | None = None
    tasks: TaskSet | None = None  # several tasks or a multi-label target (train/multitask.py)

    def criterion(self) -> nn.Module:
        """The training loss, class weights and label smoothing included, so eval losses compare."""
        weight = None if self.class_weights is None else torch.tensor(self.class_weights, device=self.device)
        return create_criterion(self.recipe, weight, self.tasks).to(self.device)


def load_run(run_dir: str | Path, *, device: str = "auto") -> LoadedRun:
    """Rebuild a run's model from its recipe and load its `best` (else `last`) weights."""
    run = RunDir.open(run_dir)
    recipe = run.recipe()
    info_path = run.file("data.json")
    if not info_path.is_file():
        raise RunError(f"{run.path}: the run never started training (no data.json)")
    info = read_json(info_path, DataInfo).model_dump()
    folder = next((f for f in (run.checkpoints / "best", run.checkpoints / "last") if checkpoint_folder(f)), None)
    if folder is None:
        raise RunError(f"{run.path}: no checkpoint yet (neither best nor last)")
    torch_device = resolve_device(device)
    channels, size, _ = info["image_shape"]
    tasks = TaskSet.from_info(info) if info.get("tasks") else None
    if tasks is not None:
        model = create_multitask_model(recipe.model, recipe.multitask, in_channels=channels, task_sizes=tasks.sizes,
                                       image_size=size)  # fmt: skip
    else:
        model = create_model(recipe.model, in_channels=channels, num_classes=len(info["classes"]), image_size=size)
    model = model.to(torch_device)
    load_model_weights(folder, model)
    model.eval()
    preprocessor = create_preprocessor(recipe.preprocess)
    preprocessor.load_state_dict(read_tensors(run.file("preprocess.safetensors")))
    return LoadedRun(
        run, recipe, model, preprocessor, info["classes"], tuple(info["image_shape"]), torch_device,
        info.get("class_weights"), tasks,
    )  # fmt: skip


def evaluate_run(
    run_dir: str | Path, data: str | Path | None = None, *, source: str | None = None, part: str = "test"
) -> dict[str, Any]:
    """Score the run's best weights: on its own test split (else validation split), or on other data."""
    from dragontrainer.study.ensemble import evaluate_ensemble, is_ensemble

    if is_ensemble(run_dir):  # an ensemble folder scores like a run (loss: the NLL of the combination)
        return evaluate_ensemble(run_dir, data, source=source, part=part)
    loaded = load_run(run_dir)
    criterion = loaded.criterion()
    if loaded.tasks is not None:
        return evaluate_tasks_run(loaded, criterion, data, source=source, part=part)
    if data is None:
        prepared = prepare_data(loaded.recipe, loaded.device)
        loader, split = (prepared.test, "test") if prepared.test is not None else (prepared.val, "val")
        metrics = evaluate(
            loaded.model, loader, criterion, loaded.preprocessor, tta_flip=loaded.recipe.augment.tta_flip,
            num_classes=len(loaded.classes),
        )  # fmt: skip
        metrics["per_class"] = per_class_metrics(torch.tensor(metrics.pop("confusion")), loaded.classes)
        return {"run_dir": str(loaded.run.path), "data": split, "images": loader.num_images, **metrics}
    path = Path(data)
    channels, size, _ = loaded.image_shape
    spec = loaded.recipe.data.model_copy(
        update={"source": source or "auto", "path": path, "part": part, "image_size": size,
                "color": "gray" if channels == 1 else "rgb", "class_names": None}
    )  # fmt: skip
    # on the device, or streamed from the decoded cache when the folder is larger than memory (data.resident)
    images, loader = whole_set_loader(spec, loaded.device, loaded.recipe.train.eval_batch_size)
    if images.y.max() >= len(loaded.classes):
        raise DataError(f"{path}: label {int(images.y.max())} but the run was trained on {len(loaded.classes)} classes")
    metrics = evaluate(
        loaded.model, loader, criterion, loaded.preprocessor, tta_flip=loaded.recipe.augment.tta_flip,
        num_classes=len(loaded.classes),
    )  # fmt: skip
    metrics["per_class"] = per_class_metrics(torch.tensor(metrics.pop("confusion")), loaded.classes)
    return {"run_dir": str(loaded.run.path), "data": str(path), "images": len(images.y), **metrics}


def evaluate_tasks_run(
    loaded: LoadedRun, criterion: nn.Module, data: str | Path | None, *, source: str | None, part: str
) -> dict[str, Any]:
    """`evaluate_run` for a multi-task or multi-label run: every task's metrics under `tasks`, the main
    task's (or, multi-label, each label's) precision/recall/F1 under `per_class`."""
    if data is None:
        prepared = task_data(prepare_data(loaded.recipe, loaded.device))
        loader, split = (prepared.test, "test") if prepared.test is not None else (prepared.val, "val")
    else:
        channels, size, _ = loaded.image_shape
        spec = loaded.recipe.data.model_copy(
            update={"source": source or "auto", "path": Path(data), "part": part, "image_size": size,
                    "color": "gray" if channels == 1 else "rgb", "class_names": None}
        )  # fmt: skip
        images = load_images(spec)
        tasks = resolve_tasks(images, loaded.recipe.model_copy(update={"data": spec}))
        check_same_tasks(tasks, loaded.tasks, str(data))  # type: ignore[arg-type]
        x = torch.from_numpy(images.x).to(loaded.device)
        loader = DeviceLoader(x, tasks.target_tensor().to(loaded.device), loaded.recipe.train.eval_batch_size,
                              shuffle=False)  # fmt: skip
        split = str(data)
    metrics = evaluate_tasks(loaded.model, loader, criterion, loaded.preprocessor, num_classes=1)
    metrics["per_class"] = task_rows(metrics, loaded.tasks)  # type: ignore[arg-type]
    return {"run_dir": str(loaded.run.path), "data": split, "images": loader.num_images, **metrics}


@dataclass
class Prediction:
    file: str
    label: str
    probability: float
    top: list[tuple[str, float]]


def image_files(items: Sequence[str | Path]) -> list[Path]:
    """Files to predict: image files, folders (searched recursively, image suffixes only) and globs."""
    import glob

    from dragontrainer.data.sources import IMAGE_SUFFIXES

    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{item}: the pattern matches no file")
            found += matches
        else:
            raise DataError(f"{path}: no such image file or folder")
    if not found:
        raise DataError(
            f"{', '.join(map(str, items))}: no image files found (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return found


def predict(run_dir: str | Path, files: Sequence[str | Path], *, top_k: int = 3) -> list[Prediction]:
    """Class and probability for each image (files, folders, globs), with the run's own preprocessing."""
    from dragontrainer.study.ensemble import is_ensemble, predict_ensemble

    paths = image_files(files)
    if is_ensemble(run_dir):  # an ensemble folder predicts like a run
        return predict_ensemble(run_dir, paths, top_k=top_k)
    loaded = load_run(run_dir)
    channels, size, _ = loaded.image_shape
    spec = loaded.recipe.data.model_copy(update={"image_size": size})
    k = min(top_k, len(loaded.classes))
    predictions = []
    chunk = loaded.recipe.train.eval_batch_size
    for start in range(0, len(paths), chunk):  # bounded memory for a folder of any size
        batch = paths[start : start + chunk]
        rgb = np.stack([decode_for_network(path, spec) for path in batch]).transpose(0, 3, 1, 2)
        x = torch.from_numpy(np.ascontiguousarray(convert_color(rgb, "gray" if channels == 1 else "rgb")))
        with torch.inference_mode():
            inputs = loaded.preprocessor.apply(x.to(loaded.device))
            model = loaded.model
            logits = flip_averaged_logits(model, inputs) if loaded.recipe.augment.tta_flip else model(inputs)
            logits = logits if loaded.tasks is None else logits[:, loaded.tasks.slices()[0]]  # the main task
            sigmoid = loaded.recipe.train.loss == "sigmoid"  # independent per-class probabilities
            probabilities = (torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), dim=1)).cpu()
        for path, row in zip(batch, probabilities, strict=True):
            values, indices = row.topk(k)
            top = [(loaded.classes[i], float(v)) for v, i in zip(values, indices, strict=True)]
            predictions.append(Prediction(str(path), top[0][0], top[0][1], top))
    return predictions
