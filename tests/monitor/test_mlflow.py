"""MLflow tracking (optional extra), tested against a stand-in `mlflow` module with the client API
the sink uses: the recipe as parameters, one metric point per epoch, one MLflow run across a resume."""

from __future__ import annotations

import sys
import types
from collections import namedtuple
from pathlib import Path
from typing import ClassVar

import pytest

from dragontrainer import RecipeError, resume, train
from dragontrainer.monitor import mlflow as sink
from dragontrainer.train.outcomes import TrainingInterrupted
from tests.conftest import TINY
from tests.train.test_loop import InterruptAt


class FakeClient:
    """Records what an MlflowClient would store."""

    store: ClassVar[dict] = {}

    def __init__(self, tracking_uri: str) -> None:
        self.store.setdefault("uris", []).append(tracking_uri)

    def get_experiment_by_name(self, name: str):
        return self.store.get("experiment")

    def create_experiment(self, name: str) -> str:
        self.store["experiment"] = types.SimpleNamespace(experiment_id="7")
        return "7"

    def create_run(self, experiment_id: str, run_name: str, tags: dict):
        self.store.setdefault("runs", []).append((experiment_id, run_name, tags))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=f"run{len(self.store['runs'])}"))

    def log_batch(self, run_id: str, metrics=(), params=()) -> None:
        self.store.setdefault("params", {}).update({p.key: p.value for p in params})
        self.store.setdefault("metrics", []).extend((run_id, m.key, m.value, m.step) for m in metrics)

    def set_terminated(self, run_id: str, status: str) -> None:
        self.store.setdefault("terminated", []).append((run_id, status))


@pytest.fixture
def fake_mlflow(monkeypatch: pytest.MonkeyPatch) -> dict:
    module = types.ModuleType("mlflow")
    tracking = types.ModuleType("mlflow.tracking")
    entities = types.ModuleType("mlflow.entities")
    tracking.MlflowClient = FakeClient
    entities.Metric = namedtuple("Metric", "key value timestamp step")
    entities.Param = namedtuple("Param", "key value")
    module.tracking, module.entities = tracking, entities
    for name, value in (("mlflow", module), ("mlflow.tracking", tracking), ("mlflow.entities", entities)):
        monkeypatch.setitem(sys.modules, name, value)
    FakeClient.store = {}
    return FakeClient.store


def test_recipe_and_epoch_metrics_go_to_a_file_store_in_the_run(
    tmp_path: Path, fake_mlflow: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train(overrides=[*TINY, f"run.dir={tmp_path}", "monitor.report=false", "optim.lr=0.1"])
    assert fake_mlflow["uris"] == [(tmp_path / "mlruns").resolve().as_uri()]
    assert fake_mlflow["runs"] == [("7", tmp_path.name, {"run_dir": str(tmp_path)})]
    assert fake_mlflow["params"]["optim.lr"] == "0.1" and fake_mlflow["params"]["train.epochs"] == "3"
    val_accuracy = [(step, value) for _, key, value, step in fake_mlflow["metrics"] if key == "val_accuracy"]
    assert val_accuracy == [(r["epoch"], r["accuracy"]) for r in result.history if r["split"] == "val"]
    assert fake_mlflow["terminated"] == [("run1", "FINISHED")]


def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path: Path, fake_mlflow: dict) -> None:
    overrides = [*TINY, f"run.dir={tmp_path}", "monitor.report=false", "monitor.mlflow=on"]
    with pytest.raises(TrainingInterrupted, match="dragon resume"):
        train(overrides=overrides, callbacks=[InterruptAt(30)])  # in epoch 2 (22 steps per epoch)
    resume(tmp_path)
    assert len(fake_mlflow["runs"]) == 1
    steps = [step for _, key, _, step in fake_mlflow["metrics"] if key == "train_loss"]
    assert steps == [1, 2, 3]
    assert {run_id for run_id, *_ in fake_mlflow["metrics"]} == {"run1"}


def test_on_without_the_package_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink, "mlflow_available", lambda: False)
    with pytest.raises(RecipeError, match=r"monitor.mlflow: 'on' needs the mlflow package"):
        train(overrides=[*TINY, "monitor.mlflow=on", f"run.dir={tmp_path / 'on'}"])
    assert not (tmp_path / "on").exists()
    train(overrides=[*TINY, f"run.dir={tmp_path / 'auto'}", "monitor.report=false"])  # auto: silently without
    assert not (tmp_path / "auto" / "mlruns").exists()


def test_a_failing_tracker_never_stops_training(
    tmp_path: Path, fake_mlflow: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(self, run_id, metrics=(), params=()):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(FakeClient, "log_batch", broken)
    result = train(overrides=[*TINY, f"run.dir={tmp_path}", "monitor.report=false", "monitor.mlflow=on"])
    assert result.epochs == 3
    err = capsys.readouterr().err
    assert err.count("MLflow tracking stopped") == 1 and "tracking server unreachable" in err


def test_real_mlflow_reads_back_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = train(overrides=[*TINY, f"run.dir={tmp_path}", "monitor.report=false", "monitor.mlflow=on"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("dragontrainer").experiment_id])
    assert run.data.params["model.name"] == "mlp" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["loss"]) for r in result.history
                                                    if r["split"] == "val"]  # fmt: skip
