"""Diagnosis: rules over the files of a run folder (recipe.yaml, data.json, metrics.jsonl,
stats.jsonl, init.safetensors, preprocess.safetensors), so it runs offline and again with
`dragon report RUN`.

`core` holds the findings, the records, the registry and the ranking (causes above the symptoms
they explain); the rules live by family in `data`, `initialisation`, `optimisation` and
`generalisation`. Thresholds follow Karpathy's "A recipe for training neural networks", CS231n's
"babysitting the learning process" (update/weight ≈ 1e-3, initial loss ≈ ln C), AUTOTRAINER and
DeepDiagnosis (dead/saturated units, gradient ratios), confident learning (Northcutt et al. 2021),
judged against chance and the run's own noise. A healthy run must stay silent: in doubt, say nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from dragontrainer.monitor.diagnose import data, generalisation, initialisation, optimisation  # noqa: F401  (rules)
from dragontrainer.monitor.diagnose.core import (
    EXPLAINS,
    FAMILY,
    RULES,
    Finding,
    RunRecords,
    diagnose,
    rank,
    reconcile,
)
from dragontrainer.monitor.diagnose.data import expected_distinct_classes
from dragontrainer.monitor.diagnose.initialisation import symmetric_layers
from dragontrainer.monitor.diagnose.optimisation import loss_floor

__all__ = [
    "EXPLAINS", "FAMILY", "RULES", "Finding", "RunRecords", "diagnose", "expected_distinct_classes", "loss_floor",
    "print_findings", "rank", "reconcile", "symmetric_layers",
]  # fmt: skip


def print_findings(console: Console, findings: Sequence[Finding], *, with_info: bool) -> None:
    """Each cause with its advice, the findings it explains beneath it ("…which is why"); user text
    (class names, paths) is escaped for rich."""
    colours = {"error": "red", "warning": "yellow", "info": "blue"}
    for finding in findings:
        if not with_info and finding.severity == "info":
            continue
        if finding.because is None:
            console.print(
                f"[{colours[finding.severity]}]{finding.severity}[/] [bold]{finding.key}[/]: {escape(finding.verdict)}"
            )
            tried = " ".join(finding.overrides)
            advice = f"{tried}  ({finding.advice})" if tried and finding.advice else tried or finding.advice
            console.print(f"  try: {escape(advice)}", soft_wrap=True)
        else:
            console.print(f"  [dim]…which is why[/] [bold]{finding.key}[/]: {escape(finding.verdict)}", soft_wrap=True)
    if not any(f.severity != "info" for f in findings):
        console.print("[green]the dragon found no problems[/]")
