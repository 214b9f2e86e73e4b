"""`dragon search` end to end on the digits: border warnings, pruning, stages, folds, workers, kills.

Tiny recipes and 1-3 epochs; the sampler's seed makes the sampled values (and so the outcomes) repeat.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import dragontrainer
from dragontrainer.cli import main
from dragontrainer.data.sources import load_images
from dragontrainer.data.split import split_for
from dragontrainer.recipe import Recipe
from dragontrainer.run import read_jsonl
from dragontrainer.study.space import Param
from tests.conftest import TINY

# no monitor, no report: the searches below measure the search, not the babysitting
FAST = [*TINY, "train.epochs=1", "monitor.enabled=false", "monitor.report=false", "monitor.tensorboard=off"]
ROOT = Path(__file__).resolve().parents[2]


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def epochs_logged(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"]


def test_misplaced_learning_rate_range_warns_at_the_border(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """[1e-6, 1e-5] is far too low for the digits: the best lr sits at the top of the range."""
    space = write_space(tmp_path / "space.yaml", {"optim.lr": {"low": 1e-6, "high": 1e-5}})
    out = tmp_path / "s"
    argv = ["search", str(space), *FAST, "--trials", "8", "--pruner", "none", "--seed", "20", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    expected = (
        "warning: the best optim.lr (9.6e-06) lies at the border of its range [1e-06, 1e-05]: "
        "widen it to [1e-06, 1e-04]"
    )
    assert expected in captured.out and "trial 8/8" in captured.err
    assert expected in (out / "index.html").read_text()
    trials = json.loads((out / "trials.json").read_text())
    assert [t["number"] for t in trials] == list(range(8)) and {t["state"] for t in trials} == {"COMPLETE"}
    best = min(trials, key=lambda t: t["value"])
    assert Recipe.load(out / "best.yaml").optim.lr == best["params"]["optim.lr"]
    assert (out / best["run_dir"] / "result.json").is_file()  # each trial is an ordinary run folder
    header = (out / "trials.csv").read_text().splitlines()[0]
    assert header.startswith("number,stage,state,value") and "optim.lr" in header


def test_well_placed_range_gives_no_warning(tmp_path: Path) -> None:
    result = dragontrainer.search(
        None, {"optim.lr": {"low": 1e-2, "high": 10.0}}, overrides=FAST, trials=8, pruner="none", seed=20,
        out=tmp_path / "s",
    )  # fmt: skip
    assert result.warnings == []
    assert 0.2 < result.best_recipe.optim.lr < 5  # inside: neither border holds the best


def test_pruning_stops_bad_learning_rates_early_and_a_divergence_fails_the_trial(tmp_path: Path) -> None:
    """Successive halving from 1 epoch: high learning rates stop after 1 of 3 epochs; lr ≈ 50 without
    normalisation turns the loss to NaN, which fails that trial (with its finding), not the study."""
    result = dragontrainer.search(
        None, {"optim.lr": {"low": 0.1, "high": 100.0}}, trials=5, seed=3, out=tmp_path / "s",
        overrides=[*TINY, "model.norm=none", "monitor.tensorboard=off"],
    )  # fmt: skip
    trials = result.trials
    assert len(trials) == 5
    for t in trials:
        if t["params"]["optim.lr"] > 5:
            assert t["state"] in ("PRUNED", "FAIL") and t["epochs"] < 3, t
    failed = [t for t in trials if t["state"] == "FAIL"]
    assert failed and "diverged" in failed[0]["error"] and failed[0]["findings"]
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert pruned and all(t["epochs"] < 3 and t["stop_reason"].startswith("pruned by the search") for t in pruned)
    assert all(t["epochs"] == 3 for t in trials if t["state"] == "COMPLETE")


def test_stages_narrow_the_ranges_around_the_top_trials(tmp_path: Path) -> None:
    result = dragontrainer.search(
        None, {"optim.lr": {"low": 1e-3, "high": 10.0}, "model.dropout": {"low": 0.0, "high": 0.5}},
        overrides=FAST, trials=4, stages=2, top_k=2, pruner="none", seed=1, out=tmp_path / "s",
    )  # fmt: skip
    first, second = ([Param(**p) for p in stage["space"]] for stage in result.stages)
    stage1 = sorted((t for t in result.trials if t["stage"] == 1), key=lambda t: t["value"])
    for wide, narrow in zip(first, second, strict=True):
        top = [t["params"][wide.key] for t in stage1[:2]]
        assert wide.low <= narrow.low <= min(top) and max(top) <= narrow.high <= wide.high
        assert narrow.high - narrow.low < wide.high - wide.low
        for t in result.trials:
            if t["stage"] == 2:
                assert narrow.low <= t["params"][wide.key] <= narrow.high
    assert [t["number"] for t in result.trials] == list(range(8))
    page = (tmp_path / "s" / "index.html").read_text()
    ranges = page.split("Ranges of each stage")[1].split("</table>")[0]
    assert all(f"<td>{p.describe()}</td>" in ranges for p in [*first, *second])


def test_folds_give_mean_and_std_and_never_touch_the_test_split(tmp_path: Path) -> None:
    result = dragontrainer.search(
        None, {"optim.lr": {"low": 0.05, "high": 1.0}}, overrides=[*FAST, "data.test_fraction=0.1"],
        trials=2, folds=3, pruner="none", out=tmp_path / "s",
    )  # fmt: skip
    labels = load_images(Recipe().data).y
    for trial in result.trials:
        assert trial["state"] == "COMPLETE" and len(trial["run_dirs"]) == 3 and len(trial["fold_values"]) == 3
        assert trial["value"] == pytest.approx(statistics.fmean(trial["fold_values"]))
        assert trial["value_std"] == pytest.approx(statistics.stdev(trial["fold_values"]))
        vals = []
        for k, run_dir in enumerate(trial["run_dirs"]):
            run_recipe = Recipe.load(tmp_path / "s" / run_dir / "recipe.yaml")
            assert (run_recipe.data.folds, run_recipe.data.fold) == (3, k)
            split = split_for(labels, run_recipe.data)
            assert not np.intersect1d(np.concatenate([split.train, split.val]), split.test).size
            assert len(split.test) > 0
            vals.append(split.val)
            assert json.loads((tmp_path / "s" / run_dir / "result.json").read_text())["test_accuracy"] is None
        assert sorted(np.concatenate(vals).tolist()) == sorted(np.concatenate([split.train, split.val]).tolist())
    assert result.best_recipe.data.folds == 1  # best.yaml trains on all the training data


def test_two_workers_on_one_sqlite_study_lose_nothing_and_repeat_nothing(tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = dragontrainer.search(
        None, {"optim.lr": {"low": 0.05, "high": 1.0}}, overrides=FAST, trials=4, workers=2, pruner="none",
        out=out,
    )  # fmt: skip
    assert [t["number"] for t in result.trials] == [0, 1, 2, 3]
    assert {t["state"] for t in result.trials} == {"COMPLETE"}
    assert len({t["params"]["optim.lr"] for t in result.trials}) == 4
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"s1-000{i}" for i in range(4)]
    for t in result.trials:
        assert epochs_logged(out / t["run_dir"]) == [1]  # trained once, not twice


def run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dragontrainer.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_sigkill_then_the_same_command_completes_the_study(tmp_path: Path) -> None:
    space = write_space(tmp_path / "space.yaml", {"optim.lr": {"low": 0.05, "high": 1.0}})
    args = ["search", str(space), *TINY, "train.epochs=3", "monitor.tensorboard=off", "--trials", "3",
            "--pruner", "none", "--out", "s", "--json", "--quiet"]  # fmt: skip
    process = run_cli(args, tmp_path)
    deadline = time.monotonic() + 300
    while not (tmp_path / "s" / "trials" / "s1-0001" / "checkpoints" / "last").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the search never reached its second trial"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-study: trial 1 is running
    process.wait()
    again = run_cli(args, tmp_path)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr.decode()
    trials = json.loads(stdout.decode().splitlines()[-1])["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and {t["state"] for t in trials} == {"COMPLETE"}
    for t in trials:
        assert epochs_logged(tmp_path / "s" / t["run_dir"]) == [1, 2, 3]  # each epoch counted once


def test_bad_space_is_refused_before_anything_is_created(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    space = write_space(tmp_path / "space.yaml", {"optim.lrr": {"low": 0.01, "high": 1.0}})
    assert main(["search", str(space), *FAST, "--out", str(tmp_path / "s")]) == 2
    assert "unknown key optim.lrr, did you mean optim.lr?" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    good = write_space(tmp_path / "good.yaml", {"optim.lr": {"low": 0.01, "high": 1.0}})
    assert main(["search", str(good), *FAST, "--out", str(tmp_path / "busy")]) == 2
    assert "not empty and holds no search" in capsys.readouterr().err


def test_a_trial_whose_machine_died_is_failed_and_the_search_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared storage: trial 0 was started on a machine that then died (its heartbeat stopped). Lock files
    cannot see another machine, so without heartbeats the stage would wait for it forever."""
    import threading

    from dragontrainer.study import optuna_backend
    from dragontrainer.study.worker import SearchSettings, Worker

    monkeypatch.setattr(optuna_backend, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(optuna_backend, "SILENT_SECONDS", 2)
    base = Recipe.load(overrides=FAST)
    space = [Param("optim.lr", low=0.05, high=1.0).to_dict()]
    settings = SearchSettings(base.model_dump(mode="json"), space, trials=2, stages=1, folds=1, sampler="random",
                              pruner="none", seed=0, top_k=2)  # fmt: skip
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = optuna_backend.create_storage(url)
    study = optuna_backend.Study(storage, settings.study_name(1), "random", "none", seed=0, max_epochs=1)
    lost = study.ask(settings.params())
    lost.set_attr("host", "dead-machine")
    storage.record_heartbeat(lost._trial._trial_id)  # it was alive once
    time.sleep(2.5)
    worker = Worker(settings, tmp_path / "s", url, 0, local_storage=False)  # storage shared across machines
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    thread.join(timeout=240)
    assert not thread.is_alive(), "the search waited for the dead machine's trial"
    records = {r.number: r for r in study.trials(settings.params())}
    assert records[0].state == "FAIL" and "dead-machine sent no heartbeat" in records[0].attrs["error"]
    assert records[1].state == "COMPLETE"
