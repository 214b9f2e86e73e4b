from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dragontrainer.cli import main
from dragontrainer.errors import RecipeError
from dragontrainer.study.compare import parse_sweeps, split_values
from tests.conftest import TINY


def test_values_split_on_top_level_commas_only() -> None:
    assert split_values("0.1,0.2") == ["0.1", "0.2"]
    assert split_values("[8,16],[32,64]") == ["[8,16]", "[32,64]"]
    sweeps, fixed = parse_sweeps(["model.init=zeros,he", "model.widths=[8,16]", "optim.lr=0.1"])
    assert sweeps == {"model.init": ["zeros", "he"]} and fixed == ["model.widths=[8,16]", "optim.lr=0.1"]
    with pytest.raises(RecipeError, match="give at least one KEY=v1,v2"):
        parse_sweeps(["optim.lr=0.1"])


def test_compare_reproduces_the_zero_init_symmetry_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The reference's experiment on the digits: all-zero weights never break symmetry, He does."""
    out = tmp_path / "cmp"
    code = main(["compare", *TINY, "model.init=zeros,he", "--seeds", "2", "--out", str(out), "--json", "--quiet"])
    assert code == 0
    runs = json.loads(capsys.readouterr().out.splitlines()[-1])["runs"]
    assert [(r["label"], r["seed"]) for r in runs] == [
        ("init=zeros", 0),
        ("init=zeros", 1),
        ("init=he", 0),
        ("init=he", 1),
    ]
    zeros = [r["val_accuracy"] for r in runs if r["label"] == "init=zeros"]
    he = [r["val_accuracy"] for r in runs if r["label"] == "init=he"]
    assert max(zeros) < 0.2 and min(he) > 0.75  # 3 epochs of a tiny MLP; chance is 0.1
    for name in ("summary.csv", "summary.json", "curves.png", "index.html"):
        assert (out / name).is_file(), name
    page = (out / "index.html").read_text()
    assert "init=zeros" in page and "data:image/png;base64," in page
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "runs").iterdir())) == 4


def test_compare_checks_every_value_before_training(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["compare", *TINY, "model.init=he,hee", "--out", str(tmp_path / "c"), "--quiet"])
    assert code == 2 and "unknown init 'hee'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_zip_pairs_values_instead_of_all_combinations(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [
        "compare",
        *TINY,
        "train.epochs=1",
        "optim.name=sgd,adam",
        "optim.lr=0.2,0.002",
        "--zip",
        "--json",
        "--quiet",
    ]
    assert main([*argv, "--out", str(tmp_path / "z")]) == 0
    runs = json.loads(capsys.readouterr().out.splitlines()[-1])["runs"]
    assert [r["label"] for r in runs] == ["name=sgd lr=0.2", "name=adam lr=0.002"]


def compare_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(["compare", *argv, "--json", "--quiet"])
    out = capsys.readouterr().out.splitlines()
    return code, (json.loads(out[-1]) if code == 0 else {})


def test_list_values_are_swept_as_lists(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, result = compare_json(
        capsys, *TINY, "train.epochs=1", "model.widths=[8,16],[16]", "--out", str(tmp_path / "w")
    )
    assert code == 0 and [r["label"] for r in result["runs"]] == ["widths=[8,16]", "widths=[16]"]
    saved = [
        yaml.safe_load((Path(r["run_dir"]) / "recipe.yaml").read_text())["model"]["widths"] for r in result["runs"]
    ]
    assert saved == [[8, 16], [16]]


def test_out_into_a_users_folder_is_refused_and_untouched(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("summary.csv", "index.html", "curves.png", "summary.json"):
        (mine / name).write_text(f"my own {name}")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    code = main(["compare", *TINY, "model.init=zeros,he", "--out", str(mine), "--quiet"])
    assert code == 2 and "mine: not empty and not a dragontrainer" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


def test_finished_comparison_redraws_without_training(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The state a kill while plotting leaves (runs finished, pages missing): the same command finishes it."""
    argv = [*TINY, "train.epochs=1", "model.init=zeros,he", "--out", str(tmp_path / "c")]
    code, first = compare_json(capsys, *argv)
    assert code == 0
    results = sorted((tmp_path / "c").glob("runs/*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    for name in ("summary.csv", "summary.json", "index.html", "curves.png"):
        (tmp_path / "c" / name).unlink()
    code, again = compare_json(capsys, *argv)
    assert code == 0 and again["runs"] == first["runs"]
    assert [p.stat().st_mtime_ns for p in results] == stamps  # nothing trained again
    assert (tmp_path / "c" / "index.html").is_file() and (tmp_path / "c" / "curves.png").is_file()
    code, resumed = compare_json(capsys, "--resume", str(tmp_path / "c"))
    assert code == 0 and resumed["runs"] == first["runs"]
    code = main(["compare", *TINY, "train.epochs=1", "model.init=xavier,he", "--out", str(tmp_path / "c"), "--quiet"])
    assert code == 2 and "holds a different comparison" in capsys.readouterr().err


def test_default_folder_is_found_again_by_the_same_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, first = compare_json(capsys, *TINY, "train.epochs=1", "model.init=zeros,he")
    code, again = compare_json(capsys, *TINY, "train.epochs=1", "model.init=zeros,he")
    assert code == 0 and again["out"] == first["out"] and again["runs"] == first["runs"]


def test_a_diverged_run_is_a_row_not_a_crash(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [*TINY, "model.norm=none", "model.init=standard_normal", "optim.lr=0.2,100", "--out", str(tmp_path / "d")]
    code, result = compare_json(capsys, *argv)
    assert code == 0
    statuses = {r["label"]: (r["status"], r["val_accuracy"]) for r in result["runs"]}
    assert statuses["lr=100"] == ("diverged", None) and statuses["lr=0.2"][0] == "finished"
    assert compare_json(capsys, *argv)[1]["runs"] == result["runs"]  # recorded, not re-run


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def compare_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "dragontrainer.cli", "compare", *argv, "--quiet", "--json"]


def launch_compare(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(compare_command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("kill_when", ["first run mid-training", "second run mid-training", "first run finished"])
def test_sigkill_then_the_same_command_finishes_the_same_comparison(tmp_path: Path, kill_when: str) -> None:
    sweep = [*TINY, "train.epochs=6", "model.init=xavier,he"]
    reference = launch_compare([*sweep, "--out", str(tmp_path / "ref")])
    out = tmp_path / "cmp"
    victim = launch_compare([*sweep, "--out", str(out)])
    marker = {
        "first run mid-training": out / "runs" / "init=xavier-seed0" / "metrics.jsonl",
        "second run mid-training": out / "runs" / "init=he-seed0" / "metrics.jsonl",
        "first run finished": out / "runs" / "init=xavier-seed0" / "result.json",
    }[kill_when]
    wait_for(marker, victim)
    victim.kill()
    victim.wait()
    finished = subprocess.run(compare_command([*sweep, "--out", str(out)]), capture_output=True, env=ENV, timeout=600)
    assert finished.returncode == 0, finished.stderr.decode()
    ref_out, _ = reference.communicate(timeout=600)
    runs = json.loads(finished.stdout.decode().splitlines()[-1])["runs"]
    expected = json.loads(ref_out.decode().splitlines()[-1])["runs"]
    keys = ("label", "seed", "train_loss", "val_loss", "val_accuracy", "best_epoch")
    assert [[r[k] for k in keys] for r in runs] == [[r[k] for k in keys] for r in expected]  # bit for bit
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["init=he-seed0", "init=xavier-seed0"]
