"""`dragon finetune`: strategies as ordinary run folders, the auto table, resuming after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dragontrainer import finetune, train
from dragontrainer.cli import main
from dragontrainer.errors import RunError
from dragontrainer.study.finetune import choose
from tests.conftest import make_npz

MLP = ["model.name=mlp", "model.widths=[32,16]", "schedule.warmup_epochs=0", "train.batch_size=32",
       "monitor.report=false"]  # fmt: skip


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return train(overrides=[*MLP, "train.epochs=2", f"run.dir={tmp_path / 'source'}"]).run_dir


def target(tmp_path: Path) -> list[str]:
    data = make_npz(tmp_path / "target.npz", n=80, classes=4, size=8)
    return ["data.source=npz", f"data.path={data}", "train.epochs=2", "train.batch_size=16", "monitor.report=false"]


def test_top_trains_a_linear_head_then_the_top_stages_and_resumes_after_a_kill(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "study"
    result = finetune(source, None, target(tmp_path), strategy="top", out=out)
    assert [s.name for s in result.stages] == ["linear", "top"]
    top = out / "stages" / "top"
    groups = json.loads((top / "param_groups.json").read_text())["groups"]
    assert {(g["pattern"], g["lr_mult"]) for g in groups if not g["frozen"]} == {("head", 0.1), ("blocks\\.0", 0.1)}
    assert {g["pattern"] for g in groups if g["frozen"]} == {".*"}
    linear_recipe = (out / "stages" / "linear" / "recipe.yaml").read_text()
    assert str(source) in linear_recipe  # preprocessing and names from the source run
    assert {p["features"] for p in result.probes} == {"blocks.0", "head"}
    # a kill during the last stage: its result is not written; the same command continues it
    (top / "result.json").unlink()
    again = finetune(source, None, target(tmp_path), strategy="top", out=out)
    assert again.stages[-1].best_val_accuracy == pytest.approx(result.stages[-1].best_val_accuracy)
    epochs = [r["epoch"] for r in map(json.loads, (top / "metrics.jsonl").read_text().splitlines())]
    assert epochs == [1, 1, 2, 2]  # nothing trained twice
    with pytest.raises(RunError, match=r"holds a different fine-tuning study \(other settings\)"):
        finetune(source, None, [*target(tmp_path), "optim.lr=0.01"], strategy="top", out=out)


def test_the_linear_stage_starts_from_the_probe_and_names_the_best_on_validation(tmp_path: Path, source: Path) -> None:
    result = finetune(source, None, target(tmp_path), strategy="linear", out=tmp_path / "lin")
    head_probe = next(p for p in result.probes if (p["features"], p["classifier"]) == ("head", "logistic_regression"))
    first = json.loads((tmp_path / "lin" / "stages" / "linear" / "metrics.jsonl").read_text().splitlines()[1])
    assert first["split"] == "val" and first["accuracy"] >= head_probe["val_accuracy"] - 0.15
    assert result.best["val_accuracy"] == max([p["val_accuracy"] for p in result.probes]
                                              + [result.stages[0].best_val_accuracy])  # fmt: skip


@pytest.mark.parametrize(
    ("per_class", "source_probe", "expected"),
    [(10, 0.9, "linear"), (10, 0.5, "linear"), (500, 0.9, "top"), (500, 0.5, "full")],
)
def test_auto_follows_the_reference_table(per_class: int, source_probe: float, expected: str) -> None:
    strategy, reasoning = choose({"min_per_class": per_class, "source_probe": source_probe, "random_probe": 0.6})
    assert strategy == expected
    assert ("similar" if source_probe > 0.6 else "different") in reasoning[1]


def test_cli_auto_prints_its_reasoning(tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["finetune", str(source), *target(tmp_path), "--out", str(tmp_path / "auto"), "--quiet", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["strategy"] == "linear"  # 16 training images per class: small
    assert "small" in summary["reasoning"][0] and "random network" in summary["reasoning"][1]
    assert main(["finetune", str(tmp_path / "nothing"), "--quiet"]) == 2


def test_a_torchvision_layout_weights_file_is_a_source(tmp_path: Path) -> None:
    import torch

    from dragontrainer.nn.models import create_model
    from dragontrainer.recipe import ModelSpec

    model = ["model.name=resnet18", "model.widths=[4,8,8,8]"]
    source = create_model(ModelSpec(name="resnet18", widths=[4, 8, 8, 8]), in_channels=3, num_classes=10, image_size=8)
    weights = tmp_path / "resnet18-tiny.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, weights)
    overrides = [*model, *target(tmp_path), "monitor.enabled=false", "train.epochs=1", "schedule.warmup_epochs=0"]
    result = finetune(weights, None, overrides, strategy="full", out=tmp_path / "rn")
    assert [s.name for s in result.stages] == ["linear", "full"]
    assert {p["features"] for p in result.probes} == {"blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"}
    groups = json.loads((tmp_path / "rn" / "stages" / "full" / "param_groups.json").read_text())["groups"]
    assert {g["pattern"]: g["lr_mult"] for g in groups}["stem"] == pytest.approx(0.1)


def test_sigkill_then_the_same_command_reuses_the_finished_stage(tmp_path: Path, source: Path) -> None:
    """A real `kill -9` of `dragon finetune` once the first stage has finished and the second is under way:
    the same command completes the study, reading the first stage back instead of training it again."""
    out = tmp_path / "study"
    longer = ["train.epochs=20", "train.early_stopping.patience=null"]  # a second stage long enough to be killed in
    command = [sys.executable, "-m", "dragontrainer.cli", "finetune", str(source), *target(tmp_path), *longer,
               "--strategy", "top", "--out", str(out), "--quiet", "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    linear, top = out / "stages" / "linear", out / "stages" / "top"
    deadline = time.time() + 300
    while not (top / "checkpoints").is_dir() or not any((top / "checkpoints").iterdir()):
        assert victim.poll() is None, f"finetune ended before the kill: {victim.communicate()[1].decode()}"
        assert time.time() < deadline, "the second stage never wrote a checkpoint"
        time.sleep(0.02)
    victim.kill()  # SIGKILL: no handler runs, nothing is flushed
    victim.wait()
    assert victim.returncode == -9 and (linear / "result.json").is_file() and not (top / "result.json").exists()
    linear_result = (linear / "result.json").read_bytes()
    linear_metrics = (linear / "metrics.jsonl").read_bytes()
    finished = subprocess.run(command, capture_output=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr.decode()
    summary = json.loads(finished.stdout.decode().strip().splitlines()[-1])
    assert summary["strategy"] == "top" and (top / "result.json").is_file()
    assert (linear / "result.json").read_bytes() == linear_result  # the finished stage was read, not retrained
    assert (linear / "metrics.jsonl").read_bytes() == linear_metrics
    epochs = [r["epoch"] for r in map(json.loads, (top / "metrics.jsonl").read_text().splitlines())]
    assert epochs == sorted(epochs) and epochs[-1] == 20 and len(epochs) == 2 * len(set(epochs))  # none twice
