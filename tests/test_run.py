from __future__ import annotations

from pathlib import Path

import pytest

from dragontrainer.errors import RunError
from dragontrainer.recipe import Recipe
from dragontrainer.run import RunDir, atomic_write_text, read_jsonl


def test_torn_last_line_is_ignored_and_repaired(tmp_path: Path) -> None:
    run = RunDir.create(Recipe.load(overrides=[f"run.dir={tmp_path / 'r'}"]))
    run.append_metrics({"epoch": 1, "split": "train"})
    run.append_metrics({"epoch": 2, "split": "train"})
    with run.metrics_path.open("a") as handle:
        handle.write('{"epoch": 3, "spl')
    assert [r["epoch"] for r in run.history()] == [1, 2]
    run.keep_metrics_through(1)
    assert run.metrics_path.read_text() == '{"epoch": 1, "split": "train"}\n'


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"] and (tmp_path / "a.txt").read_text() == "two"
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_existing_run_is_not_overwritten_and_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    recipe = Recipe.load(overrides=[f"run.dir={tmp_path / 'r'}"])
    run = RunDir.create(recipe)
    with pytest.raises(RunError, match="a run already exists here; continue it with `dragon resume"):
        RunDir.create(recipe)
    with run.lock(), pytest.raises(RunError, match="another dragon process is writing"), RunDir.open(run.path).lock():
        pass
    with pytest.raises(RunError, match="not a run folder"):
        RunDir.open(tmp_path)
