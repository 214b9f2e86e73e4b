from __future__ import annotations

import json
from pathlib import Path

import pytest

from dragontrainer.cli import main
from dragontrainer.compare import parse_sweeps, split_values
from dragontrainer.errors import RecipeError
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
