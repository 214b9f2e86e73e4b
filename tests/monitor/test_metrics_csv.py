"""metrics.csv: one row per epoch, the same numbers as metrics.jsonl, kept equal when a resume drops epochs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from dragontrainer import train
from dragontrainer.monitor.metrics_csv import metrics_table
from dragontrainer.run import RunDir
from tests.conftest import TINY


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_metrics_csv_has_one_row_per_epoch_equal_to_the_jsonl(tmp_path: Path) -> None:
    result = train(overrides=[*TINY, f"run.dir={tmp_path}", "monitor.report=false"])
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert list(rows[0])[:6] == ["epoch", "step", "train_loss", "train_accuracy", "train_lr", "train_images"]
    val = [r for r in result.history if r["split"] == "val"]
    for row, record in zip(rows, val, strict=True):
        assert float(row["val_loss"]) == record["loss"] and float(row["val_accuracy"]) == record["accuracy"]
        assert int(row["step"]) == record["step"]
    run = RunDir.open(tmp_path)
    run.keep_metrics_through(1)  # what a resume from epoch 1's checkpoint does
    assert [int(r["epoch"]) for r in read_csv(tmp_path / "metrics.csv")] == [1]


def test_table_skips_nested_values_and_keeps_new_columns() -> None:
    history = [
        {"epoch": 1, "split": "train", "step": 5, "loss": 1.0},
        {"epoch": 1, "split": "val", "step": 5, "loss": 2.0, "confusion": [[1]]},
        {"epoch": 2, "split": "train", "step": 10, "loss": 0.5, "extra": 3},
    ]
    columns, rows = metrics_table(history)
    assert columns == ["epoch", "step", "train_loss", "val_loss", "train_extra"]
    assert rows == [
        {"epoch": 1, "step": 5, "train_loss": 1.0, "val_loss": 2.0},
        {"epoch": 2, "step": 10, "train_loss": 0.5, "train_extra": 3},
    ]
    assert json.dumps(rows)  # plain values only
