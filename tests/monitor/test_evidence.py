"""Eval-mode training accuracy and the label-noise estimate, against independent computations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from dragontrainer.monitor.evidence import estimate_label_noise, out_of_sample_probabilities
from tests.conftest import TINY
from tests.monitor.scenarios import digits, flipped_labels


def digit_features() -> tuple[np.ndarray, np.ndarray]:
    x, y = digits()
    return np.stack(x).reshape(len(x), -1).astype(np.float64) / 255, y


def test_flipped_labels_are_found_with_their_rate_and_clean_labels_are_not() -> None:
    features, clean = digit_features()
    _, noisy = flipped_labels(list(features), clean, share=0.3)
    true_rate = float((noisy != clean).mean())
    rate, issues = estimate_label_noise(noisy, out_of_sample_probabilities(features, noisy, 10, seed=0))
    assert abs(rate - true_rate) <= 0.10
    assert (noisy[issues] != clean[issues]).mean() > 0.8  # the suspects are mostly truly wrong
    clean_rate, _ = estimate_label_noise(clean, out_of_sample_probabilities(features, clean, 10, seed=0))
    assert clean_rate < 0.05


def test_a_run_on_noisy_labels_reports_them_with_suspects(tmp_path: Path) -> None:
    from dragontrainer import train

    x, y = digits()
    x, noisy = flipped_labels(x, y, share=0.3)
    np.savez(tmp_path / "noisy.npz", x=np.stack(x), y=noisy)
    data = ["data.source=npz", f"data.path={tmp_path / 'noisy.npz'}", f"run.dir={tmp_path / 'run'}"]
    result = train(overrides=["model.widths=[16,32,32]", "train.epochs=6", "schedule.warmup_epochs=1", *data])
    found = {f["key"]: f for f in result.findings}
    assert "label_noise" in found, result.findings
    assert abs(found["label_noise"]["evidence"]["rate"] - float((noisy != y).mean())) <= 0.10
    rows = list(csv.DictReader((tmp_path / "run" / "suspect_labels.csv").open()))
    wrong = [int(r["index"]) for r in rows[:50]]
    assert np.mean(noisy[wrong] != y[wrong]) > 0.8  # `index` is the image's position in the source file
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'id="plot-suspects"' in page and 'href="#plot-suspects"' in page  # the finding links its gallery


def test_training_accuracy_is_also_measured_in_eval_mode_on_a_fixed_probe(tmp_path: Path) -> None:
    """With mixup and dropout the train-mode number is low by construction; the eval-mode one is what
    the final weights score on the probe images, recomputed here independently."""
    from dragontrainer import train
    from dragontrainer.data.prepare import prepare_data
    from dragontrainer.data.preprocess import create_preprocessor
    from dragontrainer.nn.models import create_model
    from dragontrainer.recipe import Recipe
    from dragontrainer.train.checkpoint import load_model_weights

    overrides = [*TINY, "augment.mixup.p=1.0", "model.dropout=0.5", f"run.dir={tmp_path}"]
    result = train(overrides=overrides)
    records = [r for r in result.history if r["split"] == "train"]
    probed = [r for r in records if "eval_accuracy" in r]  # every 2nd validation and the last epoch
    assert [r["epoch"] for r in probed] == [2, 3]
    assert all(0 <= r["eval_accuracy"] <= 1 and r["eval_images"] == min(512, 1437) for r in probed)
    assert records[-1]["eval_accuracy"] > records[-1]["accuracy"]  # mixup + dropout lower only train mode
    recipe = Recipe.load(overrides=overrides)
    data = prepare_data(recipe, torch.device("cpu"))
    model = create_model(recipe.model, in_channels=1, num_classes=10, image_size=8)
    load_model_weights(tmp_path / "checkpoints" / "last", model)
    model.eval()
    index = torch.linspace(0, data.train.num_images - 1, 512).long()
    preprocessor = create_preprocessor(recipe.preprocess).fit(torch.from_numpy(data.images.x[data.split.train]))
    with torch.no_grad():
        predictions = model(preprocessor.apply(data.train.x[index])).argmax(1)
    assert float((predictions == data.train.y[index]).float().mean()) == records[-1]["eval_accuracy"]


def test_every_run_starts_with_the_doctors_cheap_checks(tmp_path: Path) -> None:
    from dragontrainer import train

    train(overrides=[*TINY, f"run.dir={tmp_path}"])
    lines = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    checks = next(r for r in lines if r["kind"] == "checks")
    assert set(checks["checks"]) == {"input_statistics", "class_balance", "batch_labels", "split_overlap",
                                     "label_consistency"}  # fmt: skip
    assert checks["checks"]["label_consistency"]["numbers"]["agreement"] > 0.8  # the digits' labels are real
