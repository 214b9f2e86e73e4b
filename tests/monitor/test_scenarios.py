"""A representative subset of the scenario suite (tests/monitor/scenarios.py): every rule's scenario
once, every data set, every healthy control. The first finding of a broken run must name its cause;
a healthy run (strong regularisation included) must stay silent: false alarms are a babysitter's
worst failure. Every piece of advice must parse as recipe overrides. The full matrix:
`python -m tests.monitor.scenarios --all`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dragontrainer.monitor.diagnose import RULES
from dragontrainer.recipe import Recipe
from tests.monitor.scenarios import BY_NAME, DATASETS, SCENARIOS, problems, run_scenario

NOT_A_SCENARIO = {
    "noise_scale": "info only: it judges the batch size, never a problem",
    "loss_not_decreasing": "a symptom: it shows beneath its cause in the lr_too_low, zero_init, vanishing scenarios",
    "val_better_than_train": "eval-mode validation above eval-mode training needs a split-specific fault; "
    "tested on records in test_diagnose.py",
}
SUBSET = [("digits", "healthy"), ("shapes", "healthy"), ("letters", "healthy"),
          ("letters", "healthy_dropout_mlp"), ("shapes", "healthy_mixup"), ("digits", "healthy_adamw_decay"),
          ("digits", "healthy_small_dense")]  # fmt: skip
BROKEN = [s.name for s in SCENARIOS if s.expect]
SUBSET += [(BY_NAME[name].datasets[i % len(BY_NAME[name].datasets)], name) for i, name in enumerate(BROKEN)]
# Known misses, measured in the full suite and listed in README: a batch of 8 with the learning rate scaled
# linearly trains the letters better than the control does, so no finding is the right one for what the run
# shows (its loss swings 6-12% of the loss still to lose). It stays in the script's figures; here it is
# left out so the required subset states what holds, not what is hoped.
KNOWN_MISSES = {("letters", "noisy")}
SUBSET = [case for case in SUBSET if case not in KNOWN_MISSES]
KEY_VALUE = re.compile(r"\b([a-z_]+(?:\.[a-z_]+)+=[^\s,;)]+)")


def assert_advice_parses(finding: dict) -> None:
    Recipe.load(overrides=finding["overrides"])  # the overrides of one finding go together
    for item in KEY_VALUE.findall(finding["advice"]):
        Recipe.load(overrides=[item])


@pytest.mark.parametrize(("dataset", "name"), SUBSET, ids=[f"{d}/{n}" for d, n in SUBSET])
def test_scenario_first_finding_names_the_cause(dataset: str, name: str, tmp_path: Path) -> None:
    scenario = BY_NAME[name]
    findings = run_scenario(scenario, tmp_path, dataset)
    found = problems(findings)
    for finding in findings:
        assert_advice_parses(finding)
    if not scenario.expect:
        assert found == [], findings
        return
    assert found and found[0]["key"] in scenario.expect, [(f["key"], f["verdict"]) for f in found]
    assert found[0]["because"] is None
    assert any(ch.isdigit() for ch in found[0]["verdict"]), "a verdict carries the measured numbers"
    keys = [f["key"] for f in findings]
    assert len(keys) == len(set(keys))
    settings = {}
    for finding in findings:  # consistent advice: no knob set to two values in one run
        for item in finding["overrides"]:
            key, value = item.split("=", 1)
            assert settings.setdefault(key, value) == value, findings


def test_every_rule_has_a_scenario_on_every_data_set() -> None:
    covered = {key for s in SCENARIOS for key in s.expect[:1]} | {k for s in SCENARIOS for k in s.expect}
    assert set(RULES.names()) - set(NOT_A_SCENARIO) <= covered
    assert {d for d, _ in SUBSET} == set(DATASETS)
    assert all(len(s.datasets) >= 2 for s in SCENARIOS) and sum(len(s.datasets) == 3 for s in SCENARIOS) > 20
