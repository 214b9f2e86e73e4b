"""`dragon compare`'s outputs: the summary over seeds, summary.csv/json, curves.png, index.html and the
console table (the planning and running are in study/compare.py)."""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dragontrainer.console import text
from dragontrainer.run import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from dragontrainer.study.compare import RunRow


def row_dict(row: RunRow) -> dict[str, Any]:
    """A row as JSON-safe values: NaN (a diverged run) becomes null."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in asdict(row).items()}


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
                                             "runs": [row_dict(r) for r in rows], "summary": summary})  # fmt: skip
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
    from dragontrainer.recipe import Recipe, dotted_values

    recipes = [Path(r.run_dir) / "recipe.yaml" for r in rows]
    if not recipes or not all(p.is_file() for p in recipes):
        return {}
    runs = [dotted_values(Recipe.load(p).model_dump(mode="json")) for p in recipes]
    defaults = dotted_values(Recipe().model_dump(mode="json"))
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
        table.add_row(*map(text, row))
    console.print(table)
