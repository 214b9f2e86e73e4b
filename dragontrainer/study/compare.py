"""`dragon compare`: the same recipe once per value of one or more knobs (and per seed), side by side.

    dragon compare model.init=zeros,standard_normal,uniform,xavier,he
    dragon compare model.dropout=0.0,0.1,0.3,0.5,0.7,0.9 --seeds 3

Writes `<out>/runs/<label>/...` (ordinary run folders), `summary.csv`, `summary.json`,
`curves.png` (validation accuracy and training loss of every run overlaid) and `index.html`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dragontrainer.errors import RecipeError, RunError
from dragontrainer.recipe import Recipe, parse_override
from dragontrainer.run import (
    RunDir,
    atomic_write_json,
    open_plan_folder,
)
from dragontrainer.study.compare_page import write_outputs


@dataclass
class RunRow:
    """One run of the comparison: which values, which seed, and how it went."""

    label: str
    seed: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    best_val_accuracy: float
    best_epoch: int
    epochs_to_target: int | None
    seconds: float
    run_dir: str
    status: str = "finished"  # or "diverged" (loss became NaN/Inf; its numbers are NaN)


def split_values(raw: str) -> list[str]:
    """`0.1,0.2` -> ['0.1', '0.2']; commas inside brackets stay (`[8,16],[32,64]` is two values)."""
    values, depth, current = [], 0, ""
    for char in raw:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v.strip() for v in values if v.strip()]


def parse_sweeps(items: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """KEY=v1,v2 items are sweeps; KEY=v items are fixed overrides of the base recipe."""
    sweeps: dict[str, list[str]] = {}
    fixed: list[str] = []
    for item in items:
        key, _ = parse_override(item)
        values = split_values(item.partition("=")[2])
        if len(values) > 1:
            sweeps[key] = values
        else:
            fixed.append(item)
    if not sweeps:
        raise RecipeError("dragon compare: give at least one KEY=v1,v2,... to compare, e.g. model.init=xavier,he")
    return sweeps, fixed


def label_of(combination: dict[str, str]) -> str:
    return " ".join(f"{key.rpartition('.')[2]}={value}" for key, value in combination.items())


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)[:80]


def epochs_to(history: list[dict[str, Any]], target: float) -> int | None:
    return next((r["epoch"] for r in history if r["split"] == "val" and r["accuracy"] >= target), None)


PLAN_FILE = "compare.json"


@dataclass
class PlannedRun:
    """One run of the plan: its label, seed and folder (relative to the comparison folder)."""

    label: str
    seed: int
    folder: str
    recipe: Recipe


def plan_runs(base: Recipe, sweeps: dict[str, list[str]], seeds: int, zip_values: bool) -> list[PlannedRun]:
    """Every combination (or the zipped values) × seeds, each recipe built — so validated — up front."""
    if seeds < 1:
        raise RecipeError(f"--seeds must be at least 1, got {seeds}")
    if zip_values and len({len(v) for v in sweeps.values()}) > 1:
        raise RecipeError("dragon compare --zip: every KEY=v1,v2,... needs the same number of values")
    value_rows = zip(*sweeps.values(), strict=True) if zip_values else itertools.product(*sweeps.values())
    combinations = [dict(zip(sweeps, values, strict=True)) for values in value_rows]
    planned = []
    for combination in combinations:
        # each value is read as YAML, as on the command line: [8,16] is a list, 1e-3 a number
        parsed = dict(parse_override(f"{key}={value}") for key, value in combination.items())
        label = label_of(combination)
        for offset in range(seeds):
            recipe = base.with_overrides({**parsed, "seed": base.seed + offset})
            folder = f"runs/{safe_name(label)}-seed{recipe.seed}"
            planned.append(PlannedRun(label, recipe.seed, folder, recipe))
    return planned


def plan_record(base: Recipe, sweeps: dict[str, list[str]], seeds: int, zip_values: bool, target: float) -> dict:
    """What compare.json stores: enough to run the same comparison again (`dragon compare --resume`)."""
    return {
        "kind": "dragon compare",
        "base": base.model_dump(mode="json"),
        "sweeps": sweeps,
        "seeds": seeds,
        "zip": zip_values,
        "target_accuracy": target,
    }


def fingerprint(record: dict[str, Any]) -> str:
    """Identity of a comparison: the base recipe (without its run folder), the sweeps, seeds and pairing."""
    base = {k: v for k, v in record["base"].items() if k != "run"}
    key = {"base": base, "sweeps": record["sweeps"], "seeds": record["seeds"], "zip": record["zip"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_out(record: dict[str, Any]) -> Path:
    """compare/<swept keys>-<fingerprint>: the same command finds (and finishes) the same comparison."""
    keys = "+".join(key.rpartition(".")[2] for key in record["sweeps"])
    return Path("compare") / f"{safe_name(keys)[:40]}-{fingerprint(record)[:8]}"


def open_comparison(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Start a comparison folder, or continue the same comparison; never write into anything else."""
    if (out / PLAN_FILE).is_file():
        saved = read_plan(out)
        if fingerprint(saved) != fingerprint(record):
            raise RunError(
                f"{out}: holds a different comparison ({', '.join(saved['sweeps'])}); "
                f"continue it with `dragon compare --resume {out}` or choose another --out"
            )
        return saved
    fresh = {**record, "status": {}}
    open_plan_folder(out, fresh, file_name=PLAN_FILE, kind="comparison")  # a new or empty folder only
    return fresh


def read_plan(out: Path) -> dict[str, Any]:
    """compare.json of a comparison folder, checked before anything is trusted."""
    plan_path = out / PLAN_FILE
    if not plan_path.is_file():
        raise RunError(f"{out}: not a comparison folder (no {PLAN_FILE})")
    try:
        saved = json.loads(plan_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{plan_path}: not readable JSON ({exc})") from None
    required = {"base": dict, "sweeps": dict, "seeds": int, "zip": bool, "target_accuracy": (int, float)}
    if not isinstance(saved, dict) or any(not isinstance(saved.get(k), t) for k, t in required.items()):
        raise RunError(f"{plan_path}: not a dragon compare plan (needs {', '.join(required)})")
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in saved["sweeps"].values()):
        raise RunError(f"{plan_path}: sweeps must map each key to a list of values")
    saved.setdefault("status", {})
    return saved


class ComparisonInterrupted(Exception):
    """Ctrl-C or SIGTERM during a comparison: the current run is saved; the same command continues."""

    def __init__(self, signum: int, out: Path) -> None:
        self.exit_code = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name}: the comparison stopped; finished runs are kept and the "
            f"interrupted one is saved — continue with: dragon compare --resume {out}"
        )


def compare(
    base: Recipe,
    sweeps: dict[str, list[str]],
    *,
    seeds: int = 1,
    out: Path | None = None,
    target_accuracy: float = 0.95,
    zip_values: bool = False,
    progress: bool = False,
) -> tuple[Path, list[RunRow]]:
    """Train every combination of the sweep values (× seeds) and write the comparison folder.

    With `zip_values`, the i-th values of every key go together (optim.name=sgd,adam with
    optim.lr=0.2,0.002 gives two runs, not four). Resumable: in a folder holding the same comparison,
    finished runs are kept, an interrupted run continues from its `last` checkpoint, and the table
    and plots are drawn again.
    """
    planned = plan_runs(base, sweeps, seeds, zip_values)
    record = plan_record(base, sweeps, seeds, zip_values, target_accuracy)
    out = out or default_out(record)
    saved = open_comparison(out, record)
    rows, histories = [], []
    for run in planned:
        row, history = run_planned(out, run, saved, target_accuracy, progress)
        rows.append(row)
        histories.append((run.label, run.seed - base.seed, history))
    write_outputs(out, rows, histories, sweeps, target_accuracy)
    return out, rows


def resume_comparison(out: Path, *, progress: bool = False) -> tuple[Path, list[RunRow]]:
    """`dragon compare --resume DIR`: the comparison recorded in DIR/compare.json, continued."""
    saved = read_plan(out)
    base = Recipe.from_dict(saved["base"], origin=str(out / PLAN_FILE))
    return compare(base, saved["sweeps"], seeds=saved["seeds"], out=out, target_accuracy=saved["target_accuracy"],
                   zip_values=saved["zip"], progress=progress)  # fmt: skip


def run_planned(
    out: Path, run: PlannedRun, saved: dict[str, Any], target: float, progress: bool
) -> tuple[RunRow, list[dict[str, Any]]]:
    """Train one planned run, continue it if it was interrupted, or read it back if it is finished."""
    from dragontrainer.api import resume, train
    from dragontrainer.train.outcomes import TrainingDiverged, TrainingInterrupted

    run_dir = out / run.folder
    status = saved["status"].get(run.folder)
    try:
        if status == "diverged":
            return diverged_row(run, run_dir), RunDir.open(run_dir).history()
        if (run_dir / "result.json").is_file():
            return finished_row(run, run_dir, target)
        if (run_dir / "recipe.yaml").is_file():
            result = resume(run_dir, progress=progress)
        else:
            result = train(run.recipe.with_overrides({"run.dir": str(run_dir)}), progress=progress)
    except TrainingInterrupted as exc:
        raise ComparisonInterrupted(exc.signum, out) from None
    except TrainingDiverged:
        mark(out, saved, run.folder, "diverged")
        return diverged_row(run, run_dir), RunDir.open(run_dir).history()
    mark(out, saved, run.folder, "finished")
    return row_of(run, result.summary(), result.history, target), result.history


def mark(out: Path, saved: dict[str, Any], folder: str, status: str) -> None:
    saved["status"][folder] = status
    atomic_write_json(out / PLAN_FILE, saved)


def finished_row(run: PlannedRun, run_dir: Path, target: float) -> tuple[RunRow, list[dict[str, Any]]]:
    """A finished run read back from its folder (result.json and metrics.jsonl), without training."""
    opened = RunDir.open(run_dir)
    try:
        summary = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
        history = opened.history()
        return row_of(run, summary, history, target), history
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RunError(f"{run_dir / 'result.json'}: not a readable run result ({type(exc).__name__})") from None


def row_of(run: PlannedRun, summary: dict[str, Any], history: list[dict[str, Any]], target: float) -> RunRow:
    return RunRow(
        run.label, run.seed, float(summary["train_loss"]), float(summary["train_accuracy"]),
        float(summary["val_loss"]), float(summary["val_accuracy"]), float(summary["best_val_accuracy"]),
        int(summary["best_epoch"]), epochs_to(history, target), float(summary["seconds"]), str(summary["run_dir"]),
    )  # fmt: skip


def diverged_row(run: PlannedRun, run_dir: Path) -> RunRow:
    """A run whose loss became NaN: no numbers (shown as —), but a row, so the table says so."""
    nan = float("nan")
    return RunRow(run.label, run.seed, nan, nan, nan, nan, nan, 0, None, nan, str(run_dir), status="diverged")
