"""Training, resuming, scoring and predicting on the streamed path (data.resident=stream)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dragontrainer import Recipe, evaluate_run, predict, resume, train
from dragontrainer.train.outcomes import TrainingInterrupted
from tests.conftest import TINY, make_image_folder
from tests.train.test_loop import InterruptAt, assert_same_weights, weights


@pytest.fixture
def folder(tmp_path: Path) -> list[str]:
    root = make_image_folder(tmp_path / "images", classes=3, per_class=20, size=32)
    return [
        *TINY,
        "train.epochs=2",
        "train.batch_size=16",
        "monitor.report=false",
        f"data.path={root}",
        f"data.cache={tmp_path / 'cache'}",
    ]


def losses(history: list[dict]) -> list[tuple]:
    return [(r["epoch"], r["split"], r["loss"]) for r in history]


def test_streamed_training_is_the_resident_training(tmp_path: Path, folder: list[str]) -> None:
    resident = train(Recipe.load(overrides=[*folder, "data.resident=device", f"run.dir={tmp_path / 'device'}"]))
    streamed = train(Recipe.load(overrides=[*folder, "data.resident=stream", f"run.dir={tmp_path / 'stream'}"]))
    assert_same_weights(weights(resident.run_dir), weights(streamed.run_dir))
    assert losses(resident.history) == losses(streamed.history)
    info = json.loads((streamed.run_dir / "data.json").read_text())
    assert info["resident"] == "stream" and info["resident_reason"] == "data.resident=stream"
    assert json.loads((resident.run_dir / "data.json").read_text())["resident"] == "device"


def test_a_streamed_run_interrupted_mid_epoch_resumes_exactly(tmp_path: Path, folder: list[str]) -> None:
    stream = [*folder, "data.resident=stream", "augment.hflip.p=0.5"]
    full = train(Recipe.load(overrides=[*stream, f"run.dir={tmp_path / 'full'}"]))
    with pytest.raises(TrainingInterrupted):
        train(Recipe.load(overrides=[*stream, f"run.dir={tmp_path / 'cut'}"]), callbacks=[InterruptAt(3)])
    resumed = resume(tmp_path / "cut")
    assert_same_weights(weights(full.run_dir), weights(resumed.run_dir))
    assert losses(full.history) == losses(resumed.history)


def test_photos_stored_at_cache_size_train_on_crops_and_score_on_centres(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(12):
            shape = (30, 40, 3) if i % 2 else (44, 26, 3)  # landscape and portrait
            pixels = rng.integers(0, 90, shape, dtype=np.uint8) + np.uint8(150 * c)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    overrides = [*TINY, "train.epochs=2", "train.batch_size=8", f"data.path={root}", "data.image_size=16",
                 "data.cache_size=20", f"data.cache={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = train(Recipe.load(overrides=overrides))
    info = json.loads((result.run_dir / "data.json").read_text())
    assert info["image_shape"] == [3, 16, 16] and info["resident"] == "stream"
    assert "data.cache_size=20" in info["resident_reason"]
    scored = evaluate_run(result.run_dir)
    assert scored["images"] == info["num_val"] and scored["accuracy"] > 0.9
    predictions = predict(result.run_dir, [root])
    assert len(predictions) == 24 and sum(p.label == Path(p.file).parent.name for p in predictions) >= 20
    other = evaluate_run(result.run_dir, data=root)  # other data: streamed from its cache too
    assert other["images"] == 24 and other["accuracy"] > 0.9


def test_doctor_finds_duplicates_across_splits_of_streamed_data(tmp_path: Path) -> None:
    from dragontrainer.data.prepare import prepare_data
    from dragontrainer.monitor.doctor import Patient, split_overlap
    from tests.conftest import make_npz

    x, y = (np.load(make_npz(tmp_path / "a.npz", n=60, size=8))[k] for k in ("x", "y"))
    np.savez(tmp_path / "twice.npz", x=np.concatenate([x, x]), y=np.concatenate([y, y]))
    checks = {}
    for resident in ("stream", "device"):
        recipe = Recipe.load(overrides=[*TINY, f"data.path={tmp_path / 'twice.npz'}", f"data.resident={resident}"])
        data = prepare_data(recipe, torch.device("cpu"))
        assert data.residency is not None and data.residency.mode == resident
        checks[resident] = split_overlap(Patient(recipe, data, torch.device("cpu")))
    assert checks["stream"].status == "fail" and checks["stream"].numbers["duplicates"] >= 10
    assert checks["stream"].numbers == checks["device"].numbers  # the digests find what the bytes find
