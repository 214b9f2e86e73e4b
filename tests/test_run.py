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


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (folders as b'<dir>'), to compare before and after."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>") for p in folder.rglob("*")}


USER_FILES = [
    "data.json", "provenance.json", "stats.jsonl", "report.html", "result.json", "metrics.jsonl",
    "preprocess.safetensors", "init.safetensors", ".lock", "checkpoints/last/state.json", "notes.txt",
]  # fmt: skip


def user_folder(root: Path, names: list[str] = USER_FILES) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"the user's own {name}\n")
    return root


@pytest.mark.parametrize("data", ["digits", "broken"])
def test_a_users_folder_is_refused_and_left_byte_identical(tmp_path: Path, data: str) -> None:
    from dragontrainer.api import train

    folder = user_folder(tmp_path / "mine")
    before = snapshot(folder)
    extra = ["data.source=npz", f"data.path={tmp_path / 'missing.npz'}"] if data == "broken" else []
    with pytest.raises(RunError, match=r"mine: not empty and not a dragontrainer run; choose another run.dir"):
        train(overrides=["model.name=mlp", "train.epochs=2", "schedule.warmup_epochs=0", f"run.dir={folder}", *extra])
    assert snapshot(folder) == before


def test_a_run_that_lost_its_recipe_is_not_a_run(tmp_path: Path) -> None:
    folder = user_folder(tmp_path / "old", ["metrics.jsonl", "checkpoints/last/state.json"])
    with pytest.raises(RunError, match="not empty and not a dragontrainer run"):
        RunDir.create(Recipe.load(overrides=[f"run.dir={folder}"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="exists and is not a folder"):
        RunDir.create(Recipe.load(overrides=[f"run.dir={tmp_path / 'file'}"]))


def test_a_failed_start_removes_only_what_it_created(tmp_path: Path) -> None:
    from dragontrainer.api import train

    bad = ["data.source=npz", f"data.path={tmp_path / 'missing.npz'}"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="no such file"):
        train(overrides=[*bad, f"run.dir={empty}"])
    assert empty.is_dir() and not any(empty.iterdir())  # the user's empty folder stays, empty
    with pytest.raises(Exception, match="no such file"):
        train(overrides=[*bad, f"run.dir={tmp_path / 'a' / 'b' / 'c'}"])
    assert not (tmp_path / "a").exists()  # every folder it made is gone again


def test_a_failed_start_keeps_a_file_the_user_added_meanwhile(tmp_path: Path) -> None:
    run = RunDir.create(Recipe.load(overrides=[f"run.dir={tmp_path / 'r'}"]))
    run.write_json("data.json", {})
    (run.path / "mine.txt").write_text("mine")
    run.discard_if_unstarted()
    assert [p.name for p in run.path.iterdir()] == ["mine.txt"]


def test_resume_removes_stale_temporaries_of_its_own_scheme_only(tmp_path: Path) -> None:
    run = RunDir.create(Recipe.load(overrides=[f"run.dir={tmp_path / 'r'}"]))
    stale = [run.checkpoints / ".last.ab12_xyz.tmp", run.checkpoints / ".best.0a1b2c3d.tmp"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    (run.path / ".data.json.k2j4h5g6.tmp").write_text("half")
    kept = [run.checkpoints / "last.tmp", run.path / "notes.tmp", run.checkpoints / ".last.old"]
    kept[0].write_text("x"), kept[1].write_text("y"), kept[2].mkdir()
    removed = run.remove_stale_temporaries()
    expected = [".last.ab12_xyz.tmp", ".best.0a1b2c3d.tmp", ".data.json.k2j4h5g6.tmp"]
    assert sorted(p.name for p in removed) == sorted(expected)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
