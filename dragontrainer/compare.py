"""`dragon compare`: the same recipe once per value of one or more knobs (and per seed), side by side.

    dragon compare model.init=zeros,standard_normal,uniform,xavier,he
    dragon compare model.dropout=0.0,0.1,0.3,0.5,0.7,0.9 --seeds 3

Writes `<out>/runs/<label>/...` (ordinary run folders), `summary.csv`, `summary.json`,
`curves.png` (validation accuracy and training loss of every run overlaid) and `index.html`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dragontrainer.errors import RecipeError
from dragontrainer.recipe import Recipe, parse_override
from dragontrainer.run import atomic_write_bytes, atomic_write_json, atomic_write_text


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
    optim.lr=0.2,0.002 gives two runs, not four).
    """
    from dragontrainer.api import train

    out = out or Path("compare") / time.strftime("%Y%m%d-%H%M%S")
    if (out / "summary.json").exists():
        raise RecipeError(f"{out}: a comparison already exists here; choose another --out")
    if zip_values and len({len(v) for v in sweeps.values()}) > 1:
        raise RecipeError("dragon compare --zip: every KEY=v1,v2,... needs the same number of values")
    value_rows = zip(*sweeps.values(), strict=True) if zip_values else itertools.product(*sweeps.values())
    combinations = [dict(zip(sweeps, values, strict=True)) for values in value_rows]
    # every recipe is built (so validated) before anything trains or any folder is made
    recipes = [
        (c, seed, base.with_overrides({**c, "seed": base.seed + seed})) for c in combinations for seed in range(seeds)
    ]
    rows, histories = [], []
    for combination, seed, recipe in recipes:
        label = label_of(combination)
        run_dir = out / "runs" / f"{safe_name(label)}-seed{recipe.seed}"
        result = train(recipe.with_overrides({"run.dir": str(run_dir)}), progress=progress)
        histories.append((label, seed, result.history))
        rows.append(RunRow(
            label, recipe.seed, result.train_loss, result.train_accuracy, result.val_loss, result.val_accuracy,
            result.best_val_accuracy, result.best_epoch, epochs_to(result.history, target_accuracy), result.seconds,
            str(result.run_dir),
        ))  # fmt: skip
    write_outputs(out, rows, histories, sweeps, target_accuracy)
    return out, rows


def aggregate(rows: list[RunRow]) -> list[dict[str, Any]]:
    """One line per label: mean (± std over seeds) of each number."""
    lines = []
    for label, group in itertools.groupby(rows, key=lambda r: r.label):
        members = list(group)

        def stat(name: str, members: list[RunRow] = members) -> tuple[float, float]:
            values = [float(getattr(m, name)) for m in members if getattr(m, name) is not None]
            if not values:
                return float("nan"), 0.0
            return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

        fields = (
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "best_epoch",
            "epochs_to_target",
            "seconds",
        )
        lines.append({"label": label, "runs": len(members), **{f: stat(f) for f in fields}})
    return lines


def format_stat(value: tuple[float, float], percent: bool = False, digits: int = 3, whole: bool = False) -> str:
    mean, std = value
    if mean != mean:  # NaN: never reached
        return "—"
    if whole and not std and float(mean).is_integer():  # epochs of one run (or equal over seeds): an integer
        return str(int(mean))
    text = f"{mean:.1%}" if percent else f"{mean:.{digits}f}"
    if std:
        text += f" ± {std:.1%}" if percent else f" ± {std:.{digits}f}"
    return text


def table_rows(summary: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for line in summary:
        numbers = [
            format_stat(line["train_loss"]),
            format_stat(line["train_accuracy"], percent=True),
            format_stat(line["val_loss"]),
            format_stat(line["val_accuracy"], percent=True),
            format_stat(line["best_epoch"], digits=1, whole=True),
            format_stat(line["epochs_to_target"], digits=1, whole=True),
            format_stat(line["seconds"], digits=1),
        ]
        rows.append([line["label"], str(line["runs"]), *numbers])
    return rows


HEADERS = ["run", "n", "train loss", "train acc", "val loss", "val acc", "best ep", "to target", "s"]


def write_outputs(out: Path, rows: list[RunRow], histories: list, sweeps: dict[str, list[str]], target: float) -> None:
    summary = aggregate(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    atomic_write_text(out / "summary.csv", buffer.getvalue())
    atomic_write_json(out / "summary.json", {"sweeps": sweeps, "target_accuracy": target,
                                             "runs": [asdict(r) for r in rows], "summary": summary})  # fmt: skip
    png = plot_curves(histories)
    atomic_write_bytes(out / "curves.png", png)
    page = render_html(summary, png, sweeps, target, runs=run_links(out, rows), fixed=fixed_settings(rows, sweeps))
    atomic_write_text(out / "index.html", page)


def run_links(out: Path, rows: list[RunRow]) -> list[dict[str, Any]]:
    """Per run: its label and seed, validation accuracy, a link to its report (relative to the page)
    and its findings (warnings and errors by key; `findings.json` is the source)."""
    import json
    import os

    runs = []
    for row in rows:
        run_dir = Path(row.run_dir)
        report = run_dir / "report.html"
        findings_file = run_dir / "findings.json"
        findings = json.loads(findings_file.read_text(encoding="utf-8")) if findings_file.exists() else None
        runs.append({
            "label": row.label, "seed": row.seed, "val_accuracy": row.val_accuracy,
            "report": os.path.relpath(report, out) if report.exists() else None,
            "findings": None if findings is None else
            [(f["severity"], f["key"]) for f in findings if f["severity"] in ("error", "warning")],
        })  # fmt: skip
    return runs


def fixed_settings(rows: list[RunRow], sweeps: dict[str, list[str]]) -> dict[str, Any]:
    """The settings every run shares that differ from the defaults (the comparison's fixed overrides),
    read from the runs' saved recipes; the swept keys, seed and run folder are left out."""
    from dragontrainer.recipe import Recipe

    def flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, dict):
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    recipes = [Path(r.run_dir) / "recipe.yaml" for r in rows]
    if not recipes or not all(p.is_file() for p in recipes):
        return {}
    runs = [flat(Recipe.load(p).model_dump(mode="json")) for p in recipes]
    defaults = flat(Recipe().model_dump(mode="json"))
    skip = {*sweeps, "seed"}
    return {
        key: value for key, value in runs[0].items()
        if key not in skip and not key.startswith("run.") and value != defaults.get(key)
        and all(run.get(key) == value for run in runs)
    }  # fmt: skip


def plot_curves(histories: list[tuple[str, int, list[dict[str, Any]]]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(label for label, _, _ in histories))}
    for label, seed, history in histories:
        val = [r for r in history if r["split"] == "val"]
        train = [r for r in history if r["split"] == "train"]
        show = label if seed == 0 else None
        accuracy_axis.plot([r["epoch"] for r in val], [r["accuracy"] for r in val], color=colours[label], label=show)
        loss_axis.plot([r["epoch"] for r in train], [r["loss"] for r in train], color=colours[label], label=show)
    from matplotlib.ticker import MaxNLocator

    for axis in (accuracy_axis, loss_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy_axis.set(title="validation accuracy", xlabel="epoch", ylabel="validation accuracy", ylim=(0, 1.01))
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="training loss (log scale)", yscale="log")
    # one legend for both panels, under them: it never covers a curve
    handles, labels = accuracy_axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 4), 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def render_html(
    summary: list[dict[str, Any]],
    png: bytes,
    sweeps: dict[str, list[str]],
    target: float,
    *,
    runs: Sequence[dict[str, Any]] = (),
    fixed: dict[str, Any] | None = None,
) -> str:
    """A self-contained page: what was varied and what was fixed, the summary table, the curves
    (embedded), and each run with a link to its report and its findings. Every user string escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(summary))
    swept = html.escape(", ".join(f"{k} = {', '.join(v)}" for k, v in sweeps.items()))
    fixed_text = html.escape(" ".join(f"{k}={v}" for k, v in (fixed or {}).items()) or "none (defaults)")
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dragon compare</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
td.findings,th:last-child{{text-align:left}}.error{{color:#c62828}}.warning{{color:#ef6c00}}code{{background:#f5f5f5}}</style></head>
<body><h1>dragon compare</h1>
<p id="varied"><b>Varied:</b> {swept}</p>
<p id="fixed"><b>Fixed for every run:</b> <code>{fixed_text}</code></p>
<p>Epochs to target = first epoch with validation accuracy ≥ {target:.0%}.</p>
<table id="summary"><tr>{head}</tr>{body}</table>
<p><img id="plot-curves" alt="validation accuracy and training loss of every run"
 src="data:image/png;base64,{image}"></p>
{runs_table(runs)}
</body></html>
"""


def runs_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run: label, seed, validation accuracy, report link, findings (warnings and errors)."""
    if not runs:
        return ""
    lines = []
    for run in runs:
        link = f'<a href="{html.escape(run["report"])}">report</a>' if run["report"] else "—"
        if run["findings"] is None:
            findings = "not diagnosed"
        elif not run["findings"]:
            findings = "no problems found"
        else:
            findings = ", ".join(f'<span class="{s}">{html.escape(key)}</span>' for s, key in run["findings"])
        lines.append(
            f"<tr><td>{html.escape(run['label'])}</td><td>{run['seed']}</td>"
            f'<td>{run["val_accuracy"]:.1%}</td><td>{link}</td><td class="findings">{findings}</td></tr>'
        )
    head = "<tr><th>run</th><th>seed</th><th>val acc</th><th>report</th><th>findings</th></tr>"
    return f'<h2>Runs</h2><table id="runs">{head}{"".join(lines)}</table>'  # fmt: skip


def print_table(rows: list[RunRow], console: Any) -> None:
    from rich.table import Table

    table = Table(*HEADERS)
    table.columns[0].overflow = "fold"  # labels wrap instead of being cut at narrow widths
    for row in table_rows(aggregate(rows)):
        table.add_row(*row)
    console.print(table)
