"""metrics.csv: metrics.jsonl as a spreadsheet, one row per epoch (`train_loss`, `val_accuracy`, ...).

It is a view, rewritten (atomically) from metrics.jsonl whenever that changes, so the two never
disagree — also after a resume drops the epochs past its checkpoint.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from dragontrainer.run import RunDir, atomic_write_text

KEY_COLUMNS = ("epoch", "step")


def metrics_table(history: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns (`epoch`, `step`, then `<split>_<metric>` in order of first appearance) and one row per epoch."""
    columns: dict[str, None] = dict.fromkeys(KEY_COLUMNS)
    rows: dict[int, dict[str, Any]] = {}
    for record in history:
        epoch = record.get("epoch")
        if epoch is None:
            continue
        row = rows.setdefault(epoch, {"epoch": epoch})
        row["step"] = max(row.get("step", 0), record.get("step", 0))
        split = record.get("split", "")
        for key, value in record.items():
            if key in ("epoch", "step", "split") or isinstance(value, (dict, list)):
                continue
            column = f"{split}_{key}" if split else key
            columns[column] = None
            row[column] = value
    return list(columns), [rows[e] for e in sorted(rows)]


def write_metrics_csv(run: RunDir) -> None:
    columns, rows = metrics_table(run.history())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run.file("metrics.csv"), buffer.getvalue())
