"""The diagnosis's arithmetic against independent references, and its contract on a run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dragontrainer import RunError
from dragontrainer.monitor.diagnose import (
    RULES,
    Finding,
    diagnose,
    expected_distinct_classes,
    loss_floor,
    symmetric_layers,
)


@pytest.mark.parametrize(("classes", "smoothing"), [(10, 0.1), (3, 0.3), (100, 0.05)])
def test_loss_floor_is_the_loss_of_predicting_the_smoothed_target(classes: int, smoothing: float) -> None:
    target = torch.full((1, classes), smoothing / classes)
    target[0, 0] += 1 - smoothing
    loss = torch.nn.functional.cross_entropy(target.log(), torch.tensor([0]), label_smoothing=smoothing)
    assert loss_floor(classes, smoothing) == pytest.approx(float(loss), rel=1e-5)
    assert loss_floor(classes, 0.0) == 0.0


def test_expected_classes_per_batch_matches_simulation() -> None:
    counts = [500, 100, 50, 10, 10]
    labels = np.repeat(np.arange(5), counts)
    rng = np.random.default_rng(0)
    simulated = np.mean([len(np.unique(rng.choice(labels, 32))) for _ in range(4000)])
    assert expected_distinct_classes(counts, 32) == pytest.approx(simulated, rel=0.02)


def test_symmetric_layers_are_those_whose_units_start_equal() -> None:
    weights = {"same": torch.ones(4, 3, 3, 3), "random": torch.randn(4, 3), "single": torch.randn(1, 5)}
    assert symmetric_layers(weights) == ["same"]


def test_every_rule_is_documented_and_returns_findings_or_none() -> None:
    for name in RULES.names():
        assert RULES.describe()[name], name
    finding = Finding("k", "warning", "v 1", "a=b")
    assert finding.to_dict() == {"key": "k", "severity": "warning", "verdict": "v 1", "advice": "a=b", "evidence": {}}


def test_a_folder_that_never_trained_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text("seed: 0\n")
    with pytest.raises(RunError, match="never started training"):
        diagnose(tmp_path)


def test_a_finished_run_can_be_diagnosed_again_from_files_alone(tmp_path: Path) -> None:
    from dragontrainer import train
    from tests.conftest import TINY

    run = train(overrides=[*TINY, f"run.dir={tmp_path}", "preprocess.name=none"])
    again = [f.to_dict() for f in diagnose(tmp_path)]
    assert again == run.findings == json.loads((tmp_path / "findings.json").read_text())
    assert "unnormalised_inputs" in {f["key"] for f in again}
    assert not math.isnan(again[0]["evidence"].get("mean", 0.0))


def test_printed_findings_keep_user_text_literal() -> None:
    """Class names and paths inside verdicts are text for rich, never markup."""
    from rich.console import Console

    from dragontrainer.monitor.diagnose import print_findings

    console = Console(record=True, width=200)
    findings = [Finding("class_imbalance", "warning", "worst class [bold]x[/bold] at 0%", "train.class_weights=[1]"),
                Finding("noise_scale", "info", "scale 3", "none")]  # fmt: skip
    print_findings(console, findings, with_info=False)
    text = console.export_text()
    assert "worst class [bold]x[/bold] at 0%" in text and "train.class_weights=[1]" in text
    assert "noise_scale" not in text and "no problems" not in text
