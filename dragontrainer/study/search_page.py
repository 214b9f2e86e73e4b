"""The search's outputs for people: the terminal summary and the self-contained `index.html`
(best trials, value against each parameter with the range borders and any warning drawn on the plot,
the optimisation history, the ranges of each stage, parameter importances)."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

from dragontrainer.study.space import Param, fmt

if TYPE_CHECKING:
    from rich.console import Console

    from dragontrainer.study.search import SearchResult
    from dragontrainer.study.worker import SearchSettings

TOP_ROWS = 10


def cell(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    return "—" if value is None else str(value)


def table_rows(result: SearchResult, keys: list[str]) -> list[list[str]]:
    from dragontrainer.study.search import value_summary

    rows = []
    for row in result.table(TOP_ROWS):
        params = [cell(row["params"].get(k)) for k in keys]
        rows.append([str(row["number"]), str(row["stage"]), value_summary(row), cell(row["epochs"]), *params])
    return rows


def print_summary(result: SearchResult, settings: SearchSettings, console: Console) -> None:
    """The best trials, the ranges of each stage, the warnings and where the files are."""
    from rich.markup import escape
    from rich.table import Table

    keys = [p["key"] for p in settings.space]
    states = [t["state"] for t in result.trials]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL") if s in states)
    table = Table("#", "stage", "value", "epochs", *keys, title=f"best trials ({counts})")
    for row in table_rows(result, keys):
        table.add_row(*map(escape, row))
    console.print(table)
    if settings.stages > 1:
        for stage in result.stages:
            ranges = "  ".join(f"{k} {v}" for k, v in stage["ranges"].items())
            console.print(f"stage {stage['stage']}: {escape(ranges)}", highlight=False, soft_wrap=True)
    for warning in result.warnings:
        console.print(f"[yellow]{escape(warning)}[/]", highlight=False, soft_wrap=True)
    first = result.importances.get("1") or {}
    if first:
        line = "importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in first.items())
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"search folder {escape(str(result.out))} (index.html, trials.csv, best.yaml)", highlight=False)


# --------------------------------------------------------------------------------------- plots


def png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_param(param: Param, trials: list[dict[str, Any]], warning: str | None) -> str:
    """Value against one parameter: complete trials as dots, pruned as crosses, the range borders as
    dashed lines, the border warning written on the plot."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.2, 3.4))
    for state, marker, colour in (("COMPLETE", "o", "C0"), ("PRUNED", "x", "C7")):
        points = [(t["params"][param.key], t["value"]) for t in trials
                  if t["state"] == state and t["value"] is not None and param.key in t["params"]]  # fmt: skip
        if points:
            xs, ys = zip(*points, strict=True)
            if not param.numeric:
                xs = [str(x) for x in xs]
            axis.scatter(xs, ys, marker=marker, color=colour, label=state.lower(), s=22)
    if param.numeric:
        if param.log:
            axis.set_xscale("log")
        for edge in (param.low, param.high):
            axis.axvline(edge, color="C3", linestyle="--", linewidth=1)
    if warning:
        axis.set_title(warning.removeprefix("warning: "), fontsize=7, color="C3", wrap=True)
    axis.set(xlabel=param.key + (" (log)" if param.log else ""), ylabel="value (lower is better)")
    axis.ticklabel_format(axis="y", useOffset=False)
    axis.legend(fontsize=7)
    return png(figure)


def plot_history(trials: list[dict[str, Any]]) -> str:
    """Every trial's value in order and the best value so far."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 3.4))
    ordered = sorted((t for t in trials if t["value"] is not None), key=lambda t: t["number"])
    best, running = [], float("inf")
    for t in ordered:
        if t["state"] == "COMPLETE":
            running = min(running, t["value"])
        best.append(running if running < float("inf") else None)
    axis.scatter([t["number"] for t in ordered], [t["value"] for t in ordered], s=18,
                 c=["C0" if t["state"] == "COMPLETE" else "C7" for t in ordered])  # fmt: skip
    axis.step([t["number"] for t in ordered], best, where="post", color="C3", label="best so far")
    axis.set(xlabel="trial", ylabel="value (lower is better)", title="optimisation history")
    axis.legend(fontsize=7)
    return png(figure)


# ---------------------------------------------------------------------------------------- page


def render_page(result: SearchResult, settings: SearchSettings) -> str:
    """A self-contained page; every user string escaped."""
    keys = [p["key"] for p in settings.space]
    params = settings.params()
    warned = {p.key: next((w for w in result.warnings if f" {p.key} " in w), None) for p in params}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["#", "stage", "value", "epochs", *keys])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(result, keys)
    )
    stage_rows = "".join(
        f"<tr><td>{s['stage']}</td>" + "".join(f"<td>{html.escape(s['ranges'][k])}</td>" for k in keys) + "</tr>"
        for s in result.stages
    )
    stage_head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    warnings = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in result.warnings)
    importance = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in (result.importances.get("1") or {}).items()
    )
    plots = "".join(
        f'<img alt="value against {html.escape(p.key)}" src="data:image/png;base64,'
        f'{plot_param(p, result.trials, warned[p.key])}">'
        for p in params
    )
    counts = {s: sum(t["state"] == s for t in result.trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dragon search</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.warn{{color:#b00;font-weight:bold}}
img{{margin:4px;border:1px solid #eee}}</style></head>
<body><h1>dragon search</h1>
<p>{settings.trials} trials × {settings.stages} stage(s), {settings.sampler} sampler, {settings.pruner} pruner,
{settings.folds} fold(s): {html.escape(summary)}. Value: {html.escape(settings.monitor)} at the best epoch
(as a loss; lower is better){", mean ± std over folds" if settings.folds > 1 else ""}.</p>
{warnings}
<h2>Best trials</h2><table><tr>{head}</tr>{body}</table>
<h2>Ranges of each stage</h2><table><tr><th>stage</th>{stage_head}</tr>{stage_rows}</table>
<h2>Value against each parameter</h2><div>{plots}</div>
<h2>Optimisation history</h2><img alt="optimisation history" src="data:image/png;base64,{plot_history(result.trials)}">
<h2>Parameter importance (fANOVA, stage 1)</h2>
<table>{importance or "<tr><td>too few complete trials</td></tr>"}</table>
</body></html>
"""
