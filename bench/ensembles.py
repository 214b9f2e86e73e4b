"""Measure what ensembles and the LR finder give on the embedded digits (README "Learning rate" and
"Ensembles" tables). Every number is on a held-out test split the members never saw.

    PYTHONPATH=. python bench/ensembles.py OUT_DIR [--small]

`--small` trains on 10% of the digits (data.val_fraction=0.7, data.test_fraction=0.2): the small-data setting.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from dragontrainer import ensemble, lr_find, train

COMMON = ["data.test_fraction=0.2", "monitor.enabled=false", "monitor.report=false"]


def main(out: Path, small: bool) -> None:
    common = [*COMMON, *(["data.val_fraction=0.7"] if small else [])]
    lines: dict[str, object] = {"setting": "small (10% train)" if small else "full (60% train)"}
    singles = []
    for seed in range(3):
        run = out / "seeds" / f"seed{seed}"
        if not (run / "result.json").exists():
            train(overrides=[*common, f"seed={seed}", f"run.dir={run}"])
        singles.append(json.loads((run / "result.json").read_text())["test_accuracy"])
    lines["single test accuracy (3 seeds)"] = [round(a, 4) for a in singles]
    for method in ("mean", "logit", "vote"):
        result = ensemble([out / "seeds"], combine_method=method, out=out / f"ens-seeds-{method}")
        lines[f"3-seed {method}"] = row(result)
    snap = out / "snapshots-run"
    if not (snap / "result.json").exists():
        train(overrides=[*common, "schedule.name=cosine_restarts", "schedule.restart_epochs=10", "train.epochs=30",
                         "schedule.warmup_epochs=0", "train.snapshots=cycles", "train.weight_average=swa",
                         "train.early_stopping.patience=null", f"run.dir={snap}"])  # fmt: skip
    lines["snapshot ensemble (cosine restarts, 3 cycles, 1 run)"] = row(
        ensemble(snapshots=[snap], out=out / "ens-snapshots")
    )
    ema = out / "ema-run"
    if not (ema / "result.json").exists():
        train(overrides=[*common, "train.weight_average=ema", f"run.dir={ema}"])
    lines["ema run (best checkpoint vs EMA weights)"] = row(ensemble([ema], out=out / "ens-ema"))
    found = lr_find(overrides=common, out=out / "lr-find")
    lines["lr-find"] = {k: v for k, v in found.to_dict().items() if k not in ("sweeps",)}
    found_run = out / "found-lr"
    if not (found_run / "result.json").exists():
        train(overrides=[*common, f"optim.lr={found.chosen}", f"run.dir={found_run}"])
    lines["test accuracy with the found lr"] = json.loads((found_run / "result.json").read_text())["test_accuracy"]
    lines["mean single test accuracy"] = round(statistics.fmean(singles), 4)
    print(json.dumps(lines, indent=1))


def row(result) -> dict[str, object]:
    return {r.name: {"acc": round(r.accuracy, 4), "nll": round(r.nll, 4), "ece": round(r.ece, 4)} for r in result.rows}


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--small" in sys.argv)
