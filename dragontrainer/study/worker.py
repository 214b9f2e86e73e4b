"""One search worker: claims trials from the shared study, trains each as an ordinary run folder, tells
the outcome. Several workers (processes, machines) can run on one study; a killed one's trial is
taken over and continued from its run folder's `last` checkpoint by the next worker that finds it.

A trial in progress holds an exclusive lock file (`.locks/s<stage>-<number>.lock`); the lock dies with
its process, so a RUNNING trial whose lock is free was interrupted. Claims are made under one more
lock (`.locks/claim.lock`), so two local workers never take the same trial or start one too many.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from dragontrainer.data.memo import remember_images
from dragontrainer.errors import DragonError
from dragontrainer.recipe import Recipe
from dragontrainer.study.optuna_backend import LiveTrial, Study, TrialRecord, create_storage
from dragontrainer.study.space import Param, narrow
from dragontrainer.train.callbacks import Callback, Logs
from dragontrainer.train.outcomes import TrainingDiverged
from dragontrainer.train.state import TrainState

POLL_SECONDS = 1.0  # a worker with nothing to claim looks again after this long
PRUNED_REASON = "pruned by the search"


@dataclass(frozen=True)
class SearchSettings:
    """Everything that defines a search; saved as search.json, so the same command continues it."""

    recipe: dict[str, Any]  # the base recipe with the fixed overrides applied
    space: list[dict[str, Any]]  # Param records
    trials: int  # per stage
    stages: int
    folds: int
    sampler: str
    pruner: str
    seed: int
    top_k: int

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def study_name(self, stage: int) -> str:
        return f"dragon-{self.key()}-stage{stage}"

    def params(self) -> list[Param]:
        return [Param(**p) for p in self.space]

    def base(self) -> Recipe:
        return Recipe.from_dict(self.recipe)

    @property
    def monitor(self) -> str:
        return self.base().train.early_stopping.monitor


def as_loss(value: float, monitor: str) -> float:
    """The value a search minimises: validation loss, or the error rate for an accuracy monitor."""
    return 1.0 - value if monitor.endswith("accuracy") else value


def ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    """Complete trials, best (lowest value) first."""
    return sorted((r for r in records if r.state == "COMPLETE" and r.value is not None), key=lambda r: r.value)


class ReportToStudy(Callback):
    """Reports the epoch's value to the study and stops the run when the pruner says so (never after
    the last epoch: there is nothing left to save, and the finished trial is worth keeping)."""

    def __init__(self, trial: LiveTrial, monitor: str, *, prune: bool, epochs: int) -> None:
        self.trial, self.monitor, self.prune, self.epochs = trial, monitor, prune, epochs

    def on_epoch_end(self, state: TrainState, logs: Logs) -> None:
        epoch = state.epoch + 1  # `state.epoch` counts completed epochs; this one completes now
        if self.monitor not in logs:
            return  # an epoch without validation (train.val_every): nothing to report or prune on
        self.trial.report(as_loss(float(logs[self.monitor]), self.monitor), epoch)
        if self.prune and epoch < self.epochs and self.trial.should_prune():
            state.request_stop(f"{PRUNED_REASON} after epoch {epoch} ({self.monitor} {logs[self.monitor]:.4f})")


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool) -> Iterator[IO[str] | None]:
    """An exclusive flock on `path`; yields None when `wait` is false and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield handle
    finally:
        handle.close()  # closing releases the lock


@dataclass
class Worker:
    settings: SearchSettings
    out: Path
    storage_url: str
    index: int = 0
    on_trial_end: Callable[[int, TrialRecord], None] | None = None
    local_storage: bool = True  # SQLite in the search folder: every trial of the study started here

    def run(self) -> None:
        storage = create_storage(self.storage_url)
        with remember_images():  # the images are decoded once per worker process, not per trial
            for stage in range(1, self.settings.stages + 1):
                study, space = self.open_stage(storage, stage)
                self.run_stage(study, space, stage)

    def open_study(self, storage: Any, stage: int) -> Study:
        s = self.settings
        seed = s.seed + 7919 * stage + 104729 * self.index  # distinct draws per stage and per worker
        return Study(storage, s.study_name(stage), s.sampler, s.pruner, seed=seed, max_epochs=s.base().train.epochs)

    def open_stage(self, storage: Any, stage: int) -> tuple[Study, list[Param]]:
        """Stage 1 searches the given ranges; each later stage narrows them around the previous stage's
        top-k (every worker derives the same ranges from the finished trials)."""
        space = self.settings.params()
        for previous in range(1, stage):
            done = ranked(self.open_study(storage, previous).trials(space))
            top = done[: min(self.settings.top_k, max(2, len(done) // 2))]  # the better half at most
            space = narrow(space, [t.params for t in top])
        study = self.open_study(storage, stage)
        if study.attr("space") is None:
            study.set_attr("space", [p.to_dict() for p in space])
        return study, space

    def lock_path(self, stage: int, number: int) -> Path:
        return self.out / ".locks" / f"s{stage}-{number}.lock"

    def real(self, records: list[TrialRecord]) -> list[TrialRecord]:
        """Trials that count: on shared storage, workers on other machines may overshoot by one each."""
        return [r for r in records if r.number < self.settings.trials]

    def run_stage(self, study: Study, space: list[Param], stage: int) -> None:
        while True:
            with self.claim(study, space, stage) as trial:
                if trial is not None:
                    with study.heartbeat(trial):
                        self.run_trial(study, trial, stage)
                    continue
            records = self.real(study.trials(space))
            if len(records) >= self.settings.trials and all(r.state != "RUNNING" for r in records):
                return
            self.fail_lost_trials(study, records)
            time.sleep(POLL_SECONDS)  # other workers' trials are still running (or died: looked at again)

    def fail_lost_trials(self, study: Study, records: list[TrialRecord]) -> None:
        """A trial started on another machine whose worker fell silent (the machine died) would keep the
        stage RUNNING forever: fail it, saying why. Trials started here are continued instead (lock files)."""
        by_number = {r.number: r for r in records}
        for number in study.silent_trials():
            record = by_number.get(number)
            if record is None or self.started_here(record):
                continue
            host, silent = record.attrs.get("host", "another machine"), study.storage.grace_period
            study.fail(number, f"its worker on {host} sent no heartbeat for {silent} s (the machine or process "
                               "died); failed so that the search can finish")  # fmt: skip

    @contextlib.contextmanager
    def claim(self, study: Study, space: list[Param], stage: int) -> Iterator[LiveTrial | None]:
        """An interrupted trial of this search folder, else a new trial while the stage has room. The
        claim lock is held only while choosing; the trial's own lock until the `with` block ends."""
        with contextlib.ExitStack() as trial_lock:
            with file_lock(self.out / ".locks" / "claim.lock", wait=True):
                trial = self.choose(study, space, stage, trial_lock)
            yield trial

    def choose(
        self, study: Study, space: list[Param], stage: int, trial_lock: contextlib.ExitStack
    ) -> LiveTrial | None:
        records = self.real(study.trials(space))
        for record in records:
            if record.state != "RUNNING" or not self.started_here(record):
                continue
            candidate = contextlib.ExitStack()
            if candidate.enter_context(file_lock(self.lock_path(stage, record.number), wait=False)) is None:
                continue  # its worker is alive
            if self.still_running(study, space, record.number):  # read again under its lock: it may have ended
                trial_lock.enter_context(candidate.pop_all())
                return study.adopt(record.number, space)  # its process died: continue it
            candidate.close()
        if len(records) >= self.settings.trials:
            return None
        trial = study.ask(space)
        if trial.number >= self.settings.trials:  # a worker on another machine took the last place
            trial.set_attr("surplus", True)
            study.tell(trial, "FAIL")
            return None
        trial_lock.enter_context(file_lock(self.lock_path(stage, trial.number), wait=True))
        self.mark(trial, stage)
        return trial

    def still_running(self, study: Study, space: list[Param], number: int) -> bool:
        return any(r.number == number and r.state == "RUNNING" for r in study.trials(space))

    def started_here(self, record: TrialRecord) -> bool:
        if self.local_storage:
            return True
        return record.attrs.get("host") == socket.gethostname() and record.attrs.get("out") == str(self.out.resolve())

    def mark(self, trial: LiveTrial, stage: int) -> None:
        run_dirs = trial_folders(trial.number, stage, self.settings.folds)
        trial.set_attr("host", socket.gethostname())
        trial.set_attr("out", str(self.out.resolve()))
        trial.set_attr("run_dirs", run_dirs)
        trial.set_attr("run_dir", run_dirs[0])

    # ----------------------------------------------------------------------------- one trial

    def run_trial(self, study: Study, trial: LiveTrial, stage: int) -> None:
        """Train (or continue) the trial's run folder(s): one per fold. Pruning judges the first fold's
        curve; a diverged or refused run fails the trial with its finding, the study goes on."""
        s = self.settings
        folds, monitor = s.folds, s.monitor
        run_dirs = [self.out / d for d in trial_folders(trial.number, stage, folds)]
        summaries: list[dict[str, Any]] = []
        state, error = "COMPLETE", None
        for k, run_dir in enumerate(run_dirs):
            try:
                fold = {"data.folds": folds, "data.fold": k} if folds > 1 else {}
                recipe = s.base().with_overrides(
                    {**trial.params, **fold, "run.dir": str(run_dir), "train.score_test": False}
                )
                reporter = ReportToStudy(trial, monitor, prune=k == 0, epochs=recipe.train.epochs)
                summaries.append(train_or_resume(recipe, run_dir, reporter))
            except (DragonError, TrainingDiverged) as exc:
                state, error = "FAIL", str(exc)
            if state == "FAIL":
                trial.set_attr("error", error)
                trial.set_attr("findings", findings_of(run_dir))
                break
            if (summaries[-1].get("stop_reason") or "").startswith(PRUNED_REASON):
                state = "PRUNED"
                break
        values = [as_loss(best_of(r, monitor), monitor) for r in summaries]
        trial.set_attr("epochs", sum(r["epochs"] for r in summaries) if summaries else epochs_run(run_dirs[0]))
        trial.set_attr("seconds", round(sum(r["seconds"] for r in summaries), 3))
        trial.set_attr("fold_values", values)
        if summaries and state != "FAIL":
            trial.set_attr("findings", compact(summaries[0].get("findings") or []))
            trial.set_attr("stop_reason", summaries[-1].get("stop_reason"))
        value = statistics.fmean(values) if state == "COMPLETE" else None
        if state == "COMPLETE":
            trial.set_attr("value_std", statistics.stdev(values) if len(values) > 1 else 0.0)
        study.tell(trial, state, value)
        if self.on_trial_end is not None:
            record = next(r for r in study.trials(self.settings.params()) if r.number == trial.number)
            self.on_trial_end(stage, record)


def trial_folders(number: int, stage: int, folds: int) -> list[str]:
    """Run folders of a trial, relative to the search folder: one, or one per fold."""
    folder = Path("trials") / f"s{stage}-{number:04d}"
    return [str(folder)] if folds == 1 else [str(folder / f"fold-{k}") for k in range(folds)]


def best_of(summary: dict[str, Any], monitor: str) -> float:
    return summary["best_val_loss"] if monitor == "val_loss" else summary["best_val_accuracy"]


def train_or_resume(recipe: Recipe, run_dir: Path, reporter: ReportToStudy) -> dict[str, Any]:
    """A finished run's result.json; an interrupted run continued from `last`; else a new run."""
    from dragontrainer.api import resume, train

    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text(encoding="utf-8"))
    if (run_dir / "recipe.yaml").is_file():
        return resume(run_dir, callbacks=[reporter]).summary()
    return train(recipe, callbacks=[reporter]).summary()


def findings_of(run_dir: Path) -> list[str]:
    path = run_dir / "findings.json"
    if not path.is_file():
        return []
    try:
        return compact(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, OSError):
        return []


def compact(findings: list[dict[str, Any]]) -> list[str]:
    """Errors and warnings as one line each: `error lr_too_high: <verdict>`."""
    return [
        f"{f['severity']} {f['key']}: {f['verdict']}" for f in findings if f.get("severity") in ("error", "warning")
    ]


def epochs_run(run_dir: Path) -> int:
    from dragontrainer.run import read_jsonl

    return max((r.get("epoch", 0) for r in read_jsonl(run_dir / "metrics.jsonl")), default=0)


def worker_main(settings: SearchSettings, out: str, storage_url: str, index: int, local_storage: bool) -> None:
    """Entry point of a spawned worker process (one torch thread each: the cores are shared)."""
    import torch

    torch.set_num_threads(1)
    Worker(settings, Path(out), storage_url, index, local_storage=local_storage).run()
