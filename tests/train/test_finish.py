"""The end of a run: the stop message only when the run really stopped early, result.json's findings
equal findings.json's, and the adaptive warm-up lets a one-epoch run train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dragontrainer import Recipe, train
from dragontrainer.cli import main
from dragontrainer.train.callbacks import Callback
from dragontrainer.train.state import TrainState
from tests.conftest import TINY


class StopAt(Callback):
    """Requests a stop at the end of epoch `epoch`, as early stopping does when patience runs out."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state: TrainState, logs: dict) -> None:
        if state.epoch + 1 == self.epoch:
            state.request_stop(f"early stopping: asked at epoch {self.epoch}")


def test_a_stop_requested_at_the_last_epoch_is_no_early_stop(tmp_path: Path) -> None:
    last = train(overrides=[*TINY, f"run.dir={tmp_path / 'a'}", "monitor.report=false"], callbacks=[StopAt(3)])
    assert last.epochs == 3 and last.stop_reason is None
    early = train(overrides=[*TINY, f"run.dir={tmp_path / 'b'}", "monitor.report=false"], callbacks=[StopAt(2)])
    assert early.epochs == 2 and early.stop_reason == "early stopping: asked at epoch 2"


def test_cli_says_nothing_of_early_stopping_when_patience_ran_out_at_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # min_delta 100: no epoch after the first improves, so patience 1 asks to stop after epoch 2
    argv = ["train", *TINY, "train.early_stopping.patience=1", "train.early_stopping.min_delta=100",
            "monitor.report=false"]  # fmt: skip
    assert main([*argv, "train.epochs=2", f"run.dir={tmp_path / 'complete'}", "--quiet"]) == 0
    assert "early stopping" not in capsys.readouterr().out
    assert main([*argv, "train.epochs=4", f"run.dir={tmp_path / 'stopped'}", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "early stopping: val_loss has not improved" in out and "2 epochs in" in out


def test_result_json_holds_the_findings_of_findings_json(tmp_path: Path) -> None:
    run = train(overrides=[*TINY, "preprocess.name=none", "model.init=zeros", f"run.dir={tmp_path}"])
    findings = json.loads((tmp_path / "findings.json").read_text())
    assert findings and run.findings == findings
    assert json.loads((tmp_path / "result.json").read_text())["findings"] == findings
    (tmp_path / "findings.json").unlink()
    assert main(["report", str(tmp_path)]) == 0  # a new diagnosis updates both
    assert json.loads((tmp_path / "result.json").read_text())["findings"] == json.loads(
        (tmp_path / "findings.json").read_text()
    )


def test_one_epoch_run_trains_with_the_adaptive_warmup(tmp_path: Path) -> None:
    recipe = Recipe.load(overrides=["model.name=mlp", "model.widths=[32]", "train.epochs=1", f"run.dir={tmp_path}"])
    assert recipe.schedule.warmup_epochs == "auto"
    result = train(recipe)
    assert result.epochs == 1
    lrs = [r["lr"] for r in json.loads(f"[{','.join((tmp_path / 'stats.jsonl').read_text().splitlines())}]")
           if r.get("kind") == "step"]  # fmt: skip
    steps = len(lrs)
    warm = round(0.1 * steps)
    assert lrs[0] == pytest.approx(lrs[warm - 1] / warm)  # linear warm-up over a tenth of the run
    assert max(lrs) == pytest.approx(lrs[warm - 1])
