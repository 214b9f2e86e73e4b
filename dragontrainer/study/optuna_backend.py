"""Optuna, behind one module: a change in Optuna's API touches this file only.

The search asks for trials with explicit distributions (ask-and-tell), reports one value per epoch,
asks the pruner, and tells the outcome. Studies live in an RDB storage (a SQLite file by default,
PostgreSQL for several machines), so several processes can share one study and a killed one can
continue it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from dragontrainer.errors import RecipeError
from dragontrainer.study.space import Param

HEARTBEAT_SECONDS = 30  # a worker records that its trial is alive this often
SILENT_SECONDS = 600  # a trial silent this long lost its worker (machine died): failed, so the search can end
SAMPLERS = ("random", "tpe", "qmc")
PRUNERS = ("none", "median", "halving", "hyperband")
SCALARS = (type(None), bool, int, float, str)


@dataclass
class TrialRecord:
    """One trial as the search sees it: Optuna's state names, our params (decoded), our attributes."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None
    params: dict[str, Any]
    attrs: dict[str, Any]
    intermediate: dict[int, float] = field(default_factory=dict)


def quiet() -> None:
    """Optuna logs every trial at INFO; the search prints its own progress."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def create_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for the file lock instead of failing when workers write at once."""
    quiet()
    sqlite = url.startswith("sqlite")
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}} if sqlite else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=SILENT_SECONDS
            )
    except (ImportError, ModuleNotFoundError) as exc:
        raise RecipeError(
            f"--storage {url}: the database driver is missing ({exc}); pip install 'dragontrainer[postgres]'"
        ) from None
    except Exception as exc:  # SQLAlchemy's connection errors: one line, not a traceback
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"--storage {url}: cannot open the study storage ({reason})") from None


def create_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "qmc":
        with warnings.catch_warnings():  # QMCSampler is marked experimental
            warnings.simplefilter("ignore")
            return optuna.samplers.QMCSampler(seed=seed, scramble=True)
    raise RecipeError(f"--sampler {name}: expected one of {', '.join(SAMPLERS)}")


def create_pruner(name: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """Short budgets first: successive halving from a minimum of 1 epoch (the default)."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1), reduction_factor=3)
    raise RecipeError(f"--pruner {name}: expected one of {', '.join(PRUNERS)}")


def encode_choice(value: Any) -> Any:
    """Optuna's categorical choices must be scalars: lists (model.widths) travel as JSON text."""
    return value if isinstance(value, SCALARS) else json.dumps(value)


def distribution(param: Param) -> BaseDistribution:
    if param.choices is not None:
        return CategoricalDistribution([encode_choice(c) for c in param.choices])
    if param.integer:
        return IntDistribution(int(param.low), int(param.high), log=param.log)
    return FloatDistribution(param.low, param.high, log=param.log)


def decode(params: dict[str, Any], space: list[Param]) -> dict[str, Any]:
    by_key = {p.key: p for p in space}
    decoded = {}
    for key, value in params.items():
        param = by_key.get(key)
        if param is not None and param.choices is not None:
            value = next((c for c in param.choices if encode_choice(c) == value), value)
        decoded[key] = value
    return decoded


class LiveTrial:
    """A running trial: report per-epoch values, ask the pruner, remember attributes."""

    def __init__(self, trial: optuna.trial.Trial, params: dict[str, Any]) -> None:
        self._trial = trial
        self.number: int = trial.number
        self.params = params
        self._reported = set(trial.storage.get_trial(trial._trial_id).intermediate_values)

    def report(self, value: float, step: int) -> None:
        """One value per step; a step already reported (before a kill) is not reported twice."""
        if step in self._reported:
            return
        self._trial.report(value, step)
        self._reported.add(step)

    def should_prune(self) -> bool:
        return self._trial.should_prune()

    def set_attr(self, key: str, value: Any) -> None:
        self._trial.set_user_attr(key, value)


class Study:
    """One Optuna study (one stage of a search), minimising the trial value."""

    def __init__(self, storage: optuna.storages.RDBStorage, name: str, sampler: str, pruner: str, *,
                 seed: int, max_epochs: int) -> None:  # fmt: skip
        self.storage = storage
        self.name = name
        self.study = optuna.create_study(
            storage=storage, study_name=name, direction="minimize", load_if_exists=True,
            sampler=create_sampler(sampler, seed), pruner=create_pruner(pruner, max_epochs),
        )  # fmt: skip

    def trials(self, space: list[Param]) -> list[TrialRecord]:
        records = []
        for t in self.study.get_trials(deepcopy=False):
            value = t.value if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None
            records.append(
                TrialRecord(t.number, t.state.name, value, decode(t.params, space), dict(t.user_attrs),
                            dict(t.intermediate_values))
            )  # fmt: skip
        return records

    def ask(self, space: list[Param]) -> LiveTrial:
        with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": the worker beats itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask({p.key: distribution(p) for p in space})
        return LiveTrial(trial, decode(trial.params, space))

    def adopt(self, number: int, space: list[Param]) -> LiveTrial:
        """Take over a RUNNING trial whose process died (found by the caller's lock check)."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        trial = optuna.trial.Trial(self.study, trial_id)
        return LiveTrial(trial, decode(trial.params, space))

    def tell(self, trial: LiveTrial, state: str, value: float | None = None) -> None:
        """COMPLETE with a value; PRUNED keeps the last reported value; FAIL has none."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.study.tell(trial.number, value if state == "COMPLETE" else None, state=TrialState[state])

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    @contextlib.contextmanager
    def heartbeat(self, trial: LiveTrial) -> Iterator[None]:
        """While the block runs, record every HEARTBEAT_SECONDS that the trial's worker is alive."""
        stop = threading.Event()
        trial_id = trial._trial._trial_id

        def beat() -> None:
            while True:
                with contextlib.suppress(Exception):  # a missed beat is retried; never kill the trial
                    self.storage.record_heartbeat(trial_id)
                if stop.wait(self.storage.heartbeat_interval or HEARTBEAT_SECONDS):
                    return

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def silent_trials(self) -> list[int]:
        """RUNNING trials whose worker recorded no heartbeat for SILENT_SECONDS (the storage's grace period)."""
        ids = self.storage._get_stale_trial_ids(self.study._study_id)  # Optuna's own staleness query
        return sorted(self.storage.get_trial_number_from_id(i) for i in ids)

    def fail(self, number: int, reason: str) -> None:
        """End a trial that no worker will finish, with the reason kept as its error."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker was first
            self.storage.set_trial_user_attr(trial_id, "error", reason)
            self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)

    def attr(self, key: str) -> Any:
        return self.study.user_attrs.get(key)

    def importances(self) -> dict[str, float]:
        """fANOVA importances over the complete trials; empty when too few trials vary."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
                found = optuna.importance.get_param_importances(self.study, evaluator=evaluator)
        except (RuntimeError, ValueError, ZeroDivisionError):
            return {}
        return {key: float(value) for key, value in found.items()}
