"""Every diagnosis rule is triggered by a recipe change on the digits, and the healthy control stays
silent (no warning, no error): a babysitter's false alarms are its worst failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragontrainer.monitor.diagnose import RULES
from tests.monitor.scenarios import SCENARIOS, run_scenario

ALWAYS_INFORMATIONAL = {"noise_scale"}  # info only: it judges the batch size, never a problem


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_produces_its_finding(scenario, tmp_path: Path) -> None:
    findings = run_scenario(scenario, tmp_path)
    problems = {f["key"] for f in findings if f["severity"] in ("error", "warning")}
    if scenario.expect is None:
        assert problems == set(), findings
    else:
        assert scenario.expect in problems, findings
        finding = next(f for f in findings if f["key"] == scenario.expect)
        assert any(ch.isdigit() for ch in finding["verdict"]), "a verdict carries the measured numbers"
        assert "=" in finding["advice"] or "dragon " in finding["advice"], "advice names a knob or a command"


def test_every_rule_has_a_scenario() -> None:
    covered = {s.expect for s in SCENARIOS if s.expect}
    assert set(RULES.names()) - ALWAYS_INFORMATIONAL <= covered
