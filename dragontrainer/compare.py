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


def format_stat(value: tuple[float, float], percent: bool = False, digits: int = 3) -> str:
    mean, std = value
    if mean != mean:  # NaN: never reached
        return "—"
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
            format_stat(line["best_epoch"], digits=1),
            format_stat(line["epochs_to_target"], digits=1),
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
    atomic_write_text(out / "index.html", render_html(summary, png, sweeps, target))


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
    accuracy_axis.set(title="validation accuracy", xlabel="epoch", ylim=(0, 1.01))
    loss_axis.set(title="training loss", xlabel="epoch", yscale="log")
    accuracy_axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def render_html(summary: list[dict[str, Any]], png: bytes, sweeps: dict[str, list[str]], target: float) -> str:
    """A self-contained page: the table and the curves (embedded), every user string escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(summary))
    swept = html.escape(", ".join(f"{k} = {', '.join(v)}" for k, v in sweeps.items()))
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dragon compare</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>dragon compare</h1><p>{swept}; epochs to target = first epoch with validation accuracy ≥ {target:.0%}</p>
<table><tr>{head}</tr>{body}</table>
<p><img alt="validation accuracy and training loss of every run" src="data:image/png;base64,{image}"></p>
</body></html>
"""


def print_table(rows: list[RunRow], console: Any) -> None:
    from rich.table import Table

    table = Table(*HEADERS)
    table.columns[0].overflow = "fold"  # labels wrap instead of being cut at narrow widths
    for row in table_rows(aggregate(rows)):
        table.add_row(*row)
    console.print(table)
