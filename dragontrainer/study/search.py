"""`dragon search`: hyperparameter search the way the reference texts teach it, on Optuna.

    dragon search space.yaml --trials 20                       # random search, short budgets first
    dragon search recipe.yaml space.yaml --stages 2 --folds 3  # coarse to fine, 3-fold cross-validation

Random search by default, log scales for learning rate and regularisation strength, successive halving
from 1 epoch, coarse-to-fine stages, and a warning when the best value lies at the border of its range.
Every trial is an ordinary run folder. The study lives in `DIR/study.db` (or `--storage postgresql://...`
for several machines); killed at any moment, the same command continues it.

`DIR/` gets `search.json` (what was asked), `trials/<stage>-<number>/` (run folders), `trials.csv`,
`trials.json`, `best.yaml`, `importances.json` and `index.html`.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from dragontrainer.errors import RecipeError, RunError
from dragontrainer.recipe import Recipe
from dragontrainer.run import atomic_write_json, atomic_write_text
from dragontrainer.study.optuna_backend import PRUNERS, SAMPLERS, Study, TrialRecord, create_storage
from dragontrainer.study.space import Param, border_warnings, load_space
from dragontrainer.study.worker import SearchSettings, Worker, ranked, worker_main

ROW_FIELDS = ("number", "stage", "state", "value", "value_std", "epochs", "seconds", "run_dir")


@dataclass
class SearchResult:
    """What a search found: the best recipe (ready for `dragon train`), every trial, the warnings."""

    out: Path
    best_recipe: Recipe | None
    best: dict[str, Any] | None
    trials: list[dict[str, Any]]
    warnings: list[str]
    stages: list[dict[str, Any]] = field(default_factory=list)  # per stage: its ranges
    importances: dict[str, dict[str, float]] = field(default_factory=dict)  # per stage: fANOVA importances

    def table(self, top: int = 10) -> list[dict[str, Any]]:
        """The best complete trials, best first."""
        done = [t for t in self.trials if t["state"] == "COMPLETE"]
        return sorted(done, key=lambda t: t["value"])[:top]


def search(
    recipe: Recipe | Mapping[str, Any] | str | Path | None = None,
    space: str | Path | Mapping[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    trials: int = 20,
    stages: int = 1,
    folds: int = 1,
    workers: int = 1,
    storage: str | None = None,
    out: str | Path | None = None,
    sampler: str = "random",
    pruner: str = "halving",
    seed: int = 0,
    top_k: int = 5,
    progress: bool = False,
    console: Console | None = None,
) -> SearchResult:
    """Search `space` (a YAML file or a mapping of dotted keys to {low, high} / {choices}) around `recipe`.

    `trials` per stage; `folds` > 1 scores each trial as the mean over stratified folds; `workers` local
    processes share the study. Calling it again with the same arguments continues an interrupted search.

    >>> result = search(None, {"optim.lr": {"low": 1e-3, "high": 1.0}}, trials=8)   # doctest: +SKIP
    >>> result.best_recipe.optim.lr, result.warnings                                 # doctest: +SKIP
    """
    from dragontrainer.api import as_recipe

    if space is None:
        raise RecipeError("dragon search: give a space file (dotted.key: {low: ..., high: ...})")
    check_counts(trials=trials, stages=stages, folds=folds, workers=workers, top_k=top_k)
    if sampler not in SAMPLERS:
        raise RecipeError(f"--sampler {sampler}: expected one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise RecipeError(f"--pruner {pruner}: expected one of {', '.join(PRUNERS)}")
    base = as_recipe(recipe, overrides)
    params = load_space(space, base)  # every key and value validated before anything is created
    settings = SearchSettings(base.model_dump(mode="json"), [p.to_dict() for p in params], trials, stages, folds,
                              sampler, pruner, seed, top_k)  # fmt: skip
    # the default folder is named by the settings, so the same command finds (and continues) it
    stem = Path(space).stem if isinstance(space, (str, Path)) else "space"
    folder = Path(out) if out is not None else Path("search") / f"{stem}-{settings.key()[:8]}"
    local = storage is None or storage.startswith("sqlite")
    if not local:
        create_storage(storage)  # an unreachable server is refused before any folder is made
    prepare_folder(folder, settings)
    url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    console = console or Console(stderr=True, quiet=not progress)
    run_workers(settings, folder, url, workers=workers, local=local, console=console)
    return collect(settings, folder, url)


def check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def prepare_folder(folder: Path, settings: SearchSettings) -> None:
    """A new or empty folder gets search.json; the same search continues; anything else is refused."""
    saved = folder / "search.json"
    if saved.is_file():
        if json.loads(saved.read_text(encoding="utf-8")) != asdict(settings):
            raise RunError(f"{folder}: holds a different search (search.json); choose another --out")
        return
    if folder.exists() and any(folder.iterdir()):
        raise RunError(f"{folder}: the folder is not empty and holds no search; choose another --out")
    atomic_write_json(saved, asdict(settings))


def run_workers(settings: SearchSettings, folder: Path, url: str, *, workers: int, local: bool,
                console: Console) -> None:  # fmt: skip
    """One worker in this process (progress per trial), or several spawned processes watched from here."""
    storage = create_storage(url)  # creates the tables once, before any worker races to
    for stage in range(1, settings.stages + 1):
        Study(storage, settings.study_name(stage), settings.sampler, settings.pruner, seed=settings.seed,
              max_epochs=1)  # fmt: skip
    with SearchProgress(console, settings.trials * settings.stages) as progress:
        seen: set[tuple[int, int]] = set()
        progress.poll(storage, settings, seen, quietly=True)  # a continued search counts what is done
        if workers == 1:
            Worker(settings, folder, url, 0, on_trial_end=progress.trial_end, local_storage=local).run()
        else:
            watch_workers(settings, folder, url, workers=workers, local=local, progress=progress, seen=seen)


def watch_workers(settings: SearchSettings, folder: Path, url: str, *, workers: int, local: bool,
                  progress: SearchProgress, seen: set[tuple[int, int]]) -> None:  # fmt: skip
    """Spawn the worker processes and report their finished trials from the storage until all exit."""
    storage = create_storage(url)
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch threads
    processes = [
        context.Process(target=worker_main, args=(settings, str(folder), url, i, local), daemon=False)
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    while any(p.is_alive() for p in processes):
        time.sleep(1.0)
        progress.poll(storage, settings, seen)
    progress.poll(storage, settings, seen)
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RunError(
            f"{len(failed)} search worker(s) stopped with exit code {failed[0]}; run the same command to continue"
        )


class SearchProgress:
    """One line per finished trial, and on a terminal a bar over all trials below them."""

    def __init__(self, console: Console, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console, self.total, self.done, self.best = console, total, 0, float("inf")
        self.bar = Progress(
            TextColumn("trials"), BarColumn(bar_width=30), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
            TimeElapsedColumn(), console=console, disable=not console.is_terminal or console.quiet,
        )  # fmt: skip
        self.task = self.bar.add_task("trials", total=total, best="—")

    def __enter__(self) -> SearchProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def trial_end(self, stage: int, record: TrialRecord) -> None:
        self.done += 1
        if record.state == "COMPLETE" and record.value is not None:
            self.best = min(self.best, record.value)
        self.bar.update(self.task, completed=self.done, best=f"{self.best:.4f}" if self.best < float("inf") else "—")
        value = "—" if record.value is None else f"{record.value:.4f}"
        params = "  ".join(f"{k}={format_value(v)}" for k, v in record.params.items())
        self.console.print(
            f"trial {self.done}/{self.total} (stage {stage} #{record.number}): {record.state.lower()} value {value} "
            f"epochs {record.attrs.get('epochs', '?')}  best {self.best:.4f}  {params}",
            highlight=False, markup=False, soft_wrap=True,
        )  # fmt: skip

    def poll(
        self, storage: Any, settings: SearchSettings, seen: set[tuple[int, int]], *, quietly: bool = False
    ) -> None:
        """Report the trials finished since the last look (`quietly`: only count them)."""
        for stage in range(1, settings.stages + 1):
            study = Study(storage, settings.study_name(stage), settings.sampler, "none", seed=0, max_epochs=1)
            for record in study.trials(settings.params()):
                finished = record.number < settings.trials and record.state not in ("RUNNING", "WAITING")
                if finished and (stage, record.number) not in seen:
                    seen.add((stage, record.number))
                    if quietly:
                        self.done += 1
                    else:
                        self.trial_end(stage, record)


def format_value(value: Any) -> str:
    from dragontrainer.study.space import fmt

    return fmt(value) if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------ outputs


def collect(settings: SearchSettings, folder: Path, url: str) -> SearchResult:
    """Read every stage from the storage, write the outputs, return the result."""
    storage = create_storage(url)
    rows, stages, importances, records_all = [], [], {}, []
    for stage in range(1, settings.stages + 1):
        study = Study(storage, settings.study_name(stage), settings.sampler, "none", seed=0, max_epochs=1)
        records = [r for r in study.trials(settings.params()) if r.number < settings.trials]
        space = [Param(**p) for p in (study.attr("space") or settings.space)]
        stages.append({"stage": stage, "space": [p.to_dict() for p in space],
                       "ranges": {p.key: p.describe() for p in space}})  # fmt: skip
        importances[str(stage)] = study.importances()
        rows += [trial_row(r, stage, settings) for r in records]
        records_all += records
    best = ranked(records_all)
    warnings = border_warnings(settings.params(), [r.params for r in best], settings.top_k)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    best_row = min(done, key=lambda r: r["value"]) if done else None
    best_recipe = None
    if best_row is not None:
        best_recipe = settings.base().with_overrides(
            {**best_row["params"], "run.dir": None, "data.folds": 1, "data.fold": 0, "train.score_test": True}
        )
    result = SearchResult(folder, best_recipe, best_row, rows, warnings, stages, importances)
    write_outputs(result, settings)
    return result


def trial_row(record: TrialRecord, stage: int, settings: SearchSettings) -> dict[str, Any]:
    """One line of trials.json (the contract `dragon ensemble --search` reads)."""
    attrs = record.attrs
    return {
        "number": (stage - 1) * settings.trials + record.number,
        "stage": stage,
        "stage_number": record.number,
        "state": record.state,
        "value": record.value,
        "value_std": attrs.get("value_std"),
        "fold_values": attrs.get("fold_values", []),
        "epochs": attrs.get("epochs"),
        "seconds": attrs.get("seconds"),
        "run_dir": attrs.get("run_dir"),
        "run_dirs": attrs.get("run_dirs", []),
        "params": record.params,
        "findings": attrs.get("findings", []),
        "error": attrs.get("error"),
        "stop_reason": attrs.get("stop_reason"),
        "host": attrs.get("host"),
    }


def write_outputs(result: SearchResult, settings: SearchSettings) -> None:
    from dragontrainer.study.search_page import render_page

    out = result.out
    atomic_write_json(out / "trials.json", result.trials)
    keys = [p["key"] for p in settings.space]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*ROW_FIELDS, *keys, "findings", "error"])
    for row in result.trials:
        writer.writerow([*(row[f] for f in ROW_FIELDS), *(json_cell(row["params"].get(k)) for k in keys),
                         " | ".join(row["findings"]), row["error"] or ""])  # fmt: skip
    atomic_write_text(out / "trials.csv", buffer.getvalue())
    if result.best_recipe is not None:
        atomic_write_text(out / "best.yaml", result.best_recipe.to_yaml())
    atomic_write_json(out / "importances.json", result.importances)
    atomic_write_text(out / "index.html", render_page(result, settings))


def json_cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def value_summary(row: dict[str, Any]) -> str:
    """`0.1234` or `0.1234 ± 0.0050` over folds."""
    if row["value"] is None:
        return "—"
    values = row.get("fold_values") or []
    if len(values) > 1:
        return f"{row['value']:.4f} ± {statistics.stdev(values):.4f}"
    return f"{row['value']:.4f}"
