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
    EXPLAINS,
    RULES,
    Finding,
    diagnose,
    expected_distinct_classes,
    loss_floor,
    rank,
    reconcile,
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
    finding = Finding("k", "warning", "v 1", ["a=b"])
    assert Finding.from_dict(finding.to_dict()) == finding


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
    findings = [Finding("class_imbalance", "warning", "worst class [bold]x[/bold] at 0%", ["train.class_weights=[1]"]),
                Finding("noise_scale", "info", "scale 3", [], "none")]  # fmt: skip
    print_findings(console, findings, with_info=False)
    text = console.export_text()
    assert "worst class [bold]x[/bold] at 0%" in text and "train.class_weights=[1]" in text
    assert "noise_scale" not in text and "no problems" not in text


def finding(key: str, severity: str = "warning", strong: bool = False, overrides: tuple[str, ...] = ()) -> Finding:
    return Finding(key, severity, f"{key} 1", list(overrides), strong=strong)  # type: ignore[arg-type]


@pytest.mark.parametrize("cause_severity", ["info", "warning", "error"])
def test_a_cause_outranks_the_symptom_it_explains_whatever_the_severities(cause_severity: str) -> None:
    symptoms = [finding("loss_not_decreasing", "error"), finding("lr_too_high", "error"), finding("dead_units")]
    ranked = rank([*symptoms, finding("unshuffled_data", cause_severity, strong=True)])
    assert ranked[0].key == "unshuffled_data"
    assert ranked[0].severity == "error"  # a cause is as serious as the worst consequence it explains
    assert all(f.because is not None for f in ranked[1:])
    # a chain: the cause, then lr_too_high, then what lr_too_high explains beneath it
    by_key = {f.key: f for f in ranked}
    assert by_key["lr_too_high"].because == "unshuffled_data"
    assert by_key["dead_units"].because == "lr_too_high"


def test_unrelated_roots_rank_by_severity_then_strong_evidence_not_by_name() -> None:
    ranked = rank([finding("class_imbalance", strong=True), finding("noisy_loss"), finding("overfitting", "error")])
    assert [f.key for f in ranked] == ["overfitting", "class_imbalance", "noisy_loss"]
    assert all(f.because is None for f in ranked)


def test_the_explanation_graph_names_rules_and_has_no_cycle() -> None:
    names = set(RULES.names())
    assert all(explained <= names for explained in EXPLAINS.values())
    state: dict[str, int] = {}

    def visit(key: str) -> None:
        assert state.get(key) != 1, f"cycle through {key}"
        if state.get(key) == 2:
            return
        state[key] = 1
        for child in EXPLAINS[key]:
            visit(child)
        state[key] = 2

    for name in names:
        visit(name)


def test_reconcile_keeps_the_higher_findings_knob_and_drops_the_contradiction() -> None:
    ranked = [finding("overfitting", overrides=("model.dropout=0.5",)),
              finding("over_regularisation", overrides=("model.dropout=0.3", "optim.weight_decay=0.0005"))]  # fmt: skip
    kept = reconcile(ranked)
    assert kept[0].overrides == ["model.dropout=0.5"]
    assert kept[1].overrides == ["optim.weight_decay=0.0005"]
    assert kept[1].evidence["overridden_by_higher_finding"] == ["model.dropout=0.3"]


def test_explained_findings_print_beneath_their_cause() -> None:
    from rich.console import Console

    from dragontrainer.monitor.diagnose import print_findings

    console = Console(record=True, width=200)
    print_findings(console, rank([finding("loss_not_decreasing", "error", overrides=("optim.lr=0.02",)),
                                  finding("unshuffled_data", strong=True, overrides=("train.shuffle=true",))]),
                   with_info=False)  # fmt: skip
    lines = console.export_text().splitlines()
    assert lines[0].startswith("error unshuffled_data") and "train.shuffle=true" in lines[1]
    assert "which is why loss_not_decreasing" in lines[2]
