"""What a search trial costs on top of a plain training run of the same length.

    python bench/search_overhead.py --trials 6

Trains the same recipe N times in one process with `dragontrainer.train` (the warm cost of `dragon train`
without the interpreter start-up), then runs an N-trial search of it (random sampler, no pruning, a
learning-rate range too narrow to change the run's length) and prints seconds per run and per trial
(mean ± std over n), the ratio, and the once-per-search costs (writing trials.*, importances, index.html).
Also times one `dragon train` subprocess, the start-up a search worker pays once instead of per trial.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPE = ["model.name=mlp", "model.widths=[128]", "train.epochs=3", "schedule.warmup_epochs=0"]


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f} s (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import dragontrainer
    from dragontrainer.study.search import collect
    from dragontrainer.study.worker import SearchSettings

    work = Path(tempfile.mkdtemp(prefix="dragon-bench-search-"))
    dragontrainer.train(None, [*RECIPE, f"run.dir={work / 'warm'}"])  # first-use costs (imports, kernels)

    plain = []
    for i in range(args.trials):
        started = time.perf_counter()
        dragontrainer.train(None, [*RECIPE, "optim.lr=0.15", f"run.dir={work / f'plain-{i}'}"])
        plain.append(time.perf_counter() - started)

    started = time.perf_counter()
    result = dragontrainer.search(
        None, {"optim.lr": {"low": 0.1, "high": 0.2}}, overrides=RECIPE, trials=args.trials, pruner="none",
        out=work / "search",
    )  # fmt: skip
    search_total = time.perf_counter() - started
    settings = SearchSettings(**__import__("json").loads((work / "search" / "search.json").read_text()))
    started = time.perf_counter()
    collect(settings, work / "search", f"sqlite:///{(work / 'search' / 'study.db').resolve()}")
    outputs = time.perf_counter() - started
    per_trial = (search_total - outputs) / args.trials

    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "dragontrainer.cli", "train", *RECIPE, f"run.dir={work / 'cli'}", "--quiet"],
        check=True, capture_output=True,
    )  # fmt: skip
    cli = time.perf_counter() - started

    epochs = {t["epochs"] for t in result.trials}
    print(f"recipe: {' '.join(RECIPE)}  (digits, {args.threads} torch thread(s))")
    print(f"plain dragontrainer.train, warm process : {mean_std(plain)} per run")
    print(f"search trial (total minus outputs) / n  : {per_trial:.2f} s per trial (n={args.trials}, epochs {epochs})")
    print(f"ratio trial / plain run                 : {per_trial / statistics.fmean(plain):.3f}")
    print(f"once per search: outputs {outputs:.2f} s; whole search {search_total:.2f} s")
    print(f"one `dragon train` subprocess (start-up included): {cli:.2f} s")


if __name__ == "__main__":
    main()
