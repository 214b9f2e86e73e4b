"""The end of a run: the best weights scored, result.json, label-noise evidence and the report."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from rich.console import Console

from dragontrainer.console import text
from dragontrainer.monitor.evidence import label_noise_record
from dragontrainer.recipe import Recipe
from dragontrainer.run import RunDir
from dragontrainer.train.checkpoint import (
    checkpoint_folder,
    load_model_weights,
)
from dragontrainer.train.class_metrics import per_class_metrics
from dragontrainer.train.engine import Loop
from dragontrainer.train.evaluate import MAX_CONFUSION_CLASSES
from dragontrainer.train.multitask import best_task_metrics, task_rows
from dragontrainer.train.outcomes import TrainResult
from dragontrainer.train.state import TrainState


def finish(loop: Loop, recipe: Recipe, state: TrainState, seconds: float) -> TrainResult:
    """Score the best weights on the test split (if any), write result.json, build the result."""
    history = loop.run.history()
    train = [r for r in history if r["split"] == "train"]
    val = [r for r in history if r["split"] == "val"]
    if not val:  # train.val_every and a callback stopped the run after an epoch without validation
        val = [{"epoch": state.epoch, "split": "val", **loop.evaluate(loop.data.val)}]
    best = next((r for r in val if r["epoch"] == state.best_epoch), val[-1])
    test = None
    if checkpoint_folder(loop.run.checkpoints / "best") is not None:
        load_model_weights(loop.run.checkpoints / "best", loop.model)
    use_test = recipe.train.score_test and loop.data.test is not None  # search trials never look at test
    confusion = loop.data.num_classes <= MAX_CONFUSION_CLASSES
    scored = loop.evaluate(loop.data.test if use_test else loop.data.val, confusion=confusion)  # best weights
    if use_test:
        test = scored
    per_class = None
    if loop.data.tasks is not None:
        per_class = task_rows(scored, loop.data.tasks)
    elif confusion:
        per_class = per_class_metrics(torch.tensor(scored.pop("confusion")), loop.data.images.classes)
    result = TrainResult(
        run_dir=loop.run.path,
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        train_loss=train[-1]["loss"],
        train_accuracy=train[-1]["accuracy"],
        val_loss=val[-1]["loss"],
        val_accuracy=val[-1]["accuracy"],
        best_val_loss=best["loss"],
        best_val_accuracy=best["accuracy"],
        seconds=seconds,
        images_per_second=sum(r["images"] for r in train) / max(sum(r["seconds"] for r in train), 1e-9),
        test_loss=test["loss"] if test else None,
        test_accuracy=test["accuracy"] if test else None,
        # a stop requested at the last epoch stopped nothing: the run completed, so no message
        stop_reason=state.stop_reason if state.epoch < recipe.train.epochs else None,
        best_val_balanced_accuracy=best.get("balanced_accuracy"),
        per_class=per_class,
        per_class_split="test" if test else "val",
        history=history,
        tasks=None if loop.data.tasks is None else best_task_metrics(history, state.best_epoch, test),
    )
    loop.run.write_json("result.json", result.summary())
    if loop.monitor is not None and loop.data.tasks is None:  # confident learning reads one softmax head
        write_label_noise(loop, recipe, state)
    if recipe.monitor.report:  # the report puts its findings into result.json too (findings.json's copy)
        result.findings = report_run(loop.run, loop.console or Console(stderr=True, quiet=True))
    return result


def write_label_noise(loop: Loop, recipe: Recipe, state: TrainState) -> None:
    """Confident learning on the features of the model as `finish` left it (the best checkpoint's
    weights; monitor/evidence.py): a `label_noise` line in stats.jsonl and suspect_labels.csv.
    Failing to estimate it is reported, never fatal."""
    try:
        record = label_noise_record(loop.model, loop.data, loop.run, recipe.seed, state.global_step)
    except (ValueError, RuntimeError, np.linalg.LinAlgError) as exc:
        if loop.console is not None:
            loop.console.print(f"[yellow]label noise could not be estimated: {text(exc)}[/]")
        return
    loop.run.append_stats([record])


def report_run(run: RunDir, console: Console) -> list[dict[str, Any]]:
    """findings.json and report.html; the findings that matter are printed. A failure to draw the
    report is reported, never raised: the trained weights and metrics are already safe."""
    from dragontrainer.monitor.diagnose import print_findings
    from dragontrainer.report.html import write_report

    try:
        page, findings = write_report(run.path)
    except Exception as exc:
        console.print(f"[yellow]the report could not be written: {type(exc).__name__}: {text(exc)}[/]")
        return []
    print_findings(console, findings, with_info=False)
    console.print(f"report: {text(page)}")
    return [f.to_dict() for f in findings]
