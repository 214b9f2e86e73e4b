"""The LR range test: stable across independent invocations, honest warnings, and invisible to the
training that follows it (bitwise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dragontrainer import lr_find, train
from dragontrainer.cli import main
from tests.conftest import TINY

FIND = ["lr_find.steps=120"]


def test_three_independent_invocations_agree_within_their_spread() -> None:
    """Seeds 0, 1, 2: different initialisations, data orders and augmentation draws; five sweeps of
    300 steps each (three sweeps of this noisy, never-diverging tiny MLP are not always enough)."""
    stable = ["lr_find.steps=300", "lr_find.repeats=5"]
    results = [lr_find(overrides=[*TINY, *stable, f"seed={seed}"]) for seed in range(3)]
    for result in results:
        assert len(result.sweeps) == 5 and result.low <= result.suggestion <= result.high
        middle = sorted(s.minimum for s in result.sweeps)[2]  # the loss minimum of the median sweep
        assert result.conservative == pytest.approx(middle / 10 / result.scale)
        for other in results:
            assert other.low <= result.suggestion <= other.high, (result.suggestion, other.low, other.high)


def test_training_after_a_find_is_bitwise_the_training_with_its_number(tmp_path: Path) -> None:
    found = train(overrides=[*TINY, *FIND, "lr_find.repeats=2", "optim.lr=find", f"run.dir={tmp_path / 'found'}"])
    record = json.loads((tmp_path / "found" / "lr_find.json").read_text())
    assert (tmp_path / "found" / "lr_find.png").stat().st_size > 1000
    assert "optim.lr=find: 2 range-test sweeps" in (tmp_path / "found" / "report.html").read_text()
    plain = train(overrides=[*TINY, f"optim.lr={record['chosen']!r}", f"run.dir={tmp_path / 'plain'}"])
    for name in ("last", "best"):
        a = load_file(tmp_path / "found" / "checkpoints" / name / "model.safetensors")
        b = load_file(tmp_path / "plain" / "checkpoints" / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("seconds", "images_per_second")
    same = [{k: v for k, v in r.items() if k not in timing} for r in found.history]
    assert same == [{k: v for k, v in r.items() if k not in timing} for r in plain.history]
    assert "lr: find" not in (tmp_path / "found" / "recipe.yaml").read_text()  # resume sees the number


def test_untrustworthy_curves_are_named() -> None:
    flat = lr_find(overrides=[*TINY, "lr_find.start_lr=1e-7", "lr_find.end_lr=1e-6", "lr_find.steps=30"], repeats=1)
    assert any(w.startswith("too flat") for w in flat.warnings) and not flat.trusted
    hot = lr_find(overrides=[*TINY, "lr_find.start_lr=50", "lr_find.end_lr=1e4", "lr_find.steps=30"], repeats=1)
    assert any(w.startswith("diverging from the start") for w in hot.warnings)


def test_cli_json_and_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  epochs: 3\noptim:\n  name: sgd\n  lr: 0.5\n")
    args = ["lr-find", *TINY, *FIND, "--repeats", "1", "--json", "--apply", str(recipe), "--out", str(tmp_path / "o")]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / "o" / "lr_find.png").is_file() and record["suggestion"] > 0
    written = recipe.read_text()
    assert "epochs: 3" in written and f"lr: {float(format(record['chosen'], '.3g'))}" in written


def test_the_range_test_measures_the_loss_training_minimises(tmp_path: Path) -> None:
    """data.balance=class_weights weights training's loss; the range test's criterion carries the same weights."""
    from dragontrainer import Recipe
    from dragontrainer.data.prepare import prepare_data
    from dragontrainer.monitor.lr_finder import criterion_for
    from dragontrainer.train.build import build_criterion, loss_weights
    from tests.conftest import make_npz

    path = make_npz(tmp_path / "skewed.npz", n=60, classes=3)
    recipe = Recipe.load(overrides=[*TINY, "data.source=npz", f"data.path={path}", "data.balance=class_weights"])
    data = prepare_data(recipe, torch.device("cpu"))
    ours = criterion_for(recipe, data)
    training = build_criterion(recipe, data, loss_weights(recipe, data), torch.device("cpu"))
    assert ours.weight is not None and torch.equal(ours.weight, training.weight)
