"""MLflow tracking (optional extra: `pip install 'dragontrainer[mlflow]'`): the recipe as parameters,
the epoch metrics as metrics, in a local file store `<run>/mlruns` unless `monitor.mlflow_uri` (or
MLFLOW_TRACKING_URI) names another. The run folder stays the source of truth; MLflow is a view.

It is a callback: its MLflow run id and the last epoch it logged are saved in every checkpoint, so a
resumed run continues the same MLflow run instead of starting a second one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from dragontrainer.monitor.optional import sink_wanted
from dragontrainer.recipe import MonitorSpec, Recipe, dotted_values
from dragontrainer.run import RunDir
from dragontrainer.train.callbacks import Callback, Logs
from dragontrainer.train.state import TrainState

EXPERIMENT = "dragontrainer"
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


def mlflow_available() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


class MlflowTracker(Callback):
    """Logs the recipe once and each epoch's metrics; the MLflow run is created at the first epoch's end
    (a run that fails before training leaves no MLflow run behind)."""

    def __init__(self, recipe: Recipe, run: RunDir, tracking_uri: str) -> None:
        self.recipe = recipe
        self.run = run
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None
        self.logged_through = 0  # the last epoch logged (restored from the checkpoint on resume)
        self._client: Any = None
        self.failed = False

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.tracking_uri.startswith("file:"):
                # MLflow 3 keeps the file store only on request; a local folder in the run is what we promise
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def safely(self, action: str, call: Callable[[], None]) -> None:
        """Tracking is a view: if MLflow fails, say so once and train on (the run folder has everything)."""
        if self.failed:
            return
        try:
            call()
        except Exception as exc:
            self.failed = True
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            print(f"dragon: MLflow tracking stopped ({action}): {message}; the run folder keeps every metric",
                  file=sys.stderr)  # fmt: skip

    def start(self) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        started = self.client.create_run(
            experiment_id, run_name=self.run.path.name, tags={"run_dir": str(self.run.path)}
        )
        run_id = started.info.run_id
        dotted = dotted_values(self.recipe.model_dump(mode="json"))  # MLflow parameters are flat strings
        params = [Param(k, str(v)[:6000]) for k, v in dotted.items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])
        return run_id

    def on_epoch_end(self, state: TrainState, logs: Logs) -> None:
        epoch = state.epoch + 1
        if epoch > self.logged_through:  # else: logged before a kill; the resumed run recomputed it
            self.safely("logging metrics", lambda: self.log_epoch(epoch, logs))

    def log_epoch(self, epoch: int, logs: Logs) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            self.run_id = self.start()
        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, epoch) for key, value in logs.items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.logged_through = epoch

    def on_fit_end(self, state: TrainState, logs: Logs) -> None:
        if self.run_id is not None:
            run_id = self.run_id
            self.safely("ending the run", lambda: self.client.set_terminated(run_id, "FINISHED"))

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "logged_through": self.logged_through}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id, self.logged_through = state["run_id"], state["logged_through"]


def tracking_uri(spec: MonitorSpec, run: RunDir) -> str:
    """The recipe's URI, else MLFLOW_TRACKING_URI, else a file store inside the run folder."""
    return spec.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run.path / "mlruns").resolve().as_uri()


def create_mlflow(recipe: Recipe, run: RunDir) -> MlflowTracker | None:
    """`auto`: when the mlflow package is installed; `on`: required; `off`: never."""
    spec = recipe.monitor
    if not sink_wanted("monitor.mlflow", spec.mlflow, mlflow_available, "mlflow"):
        return None
    return MlflowTracker(recipe, run, tracking_uri(spec, run))
