"""SIGKILL at random moments (seeded), `dragon resume` each time: the final weights must be bit for
bit those of an uninterrupted run, and metrics.jsonl must hold exactly one line per epoch and split.

Kills are timed off observed progress (a new metrics line, then a random delay), so they land
mid-epoch, mid-evaluation and mid-checkpoint-write, not only while Python starts up."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from dragontrainer import Recipe, train

EPOCHS = 24
RECIPE = ["model.name=mlp", "model.widths=[32]", "model.dropout=0.2", "augment.crop.p=1", f"train.epochs={EPOCHS}",
          "train.batch_size=32", "schedule.warmup_epochs=1", "train.early_stopping.patience=null"]  # fmt: skip
MIN_KILLS = 10
STARTUP_KILLS = 2


def launch(argv: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dragontrainer.cli", *argv, "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def metric_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_progress(process: subprocess.Popen[bytes], run_dir: Path, timeout: float = 120) -> None:
    start, deadline = metric_lines(run_dir), time.time() + timeout
    while process.poll() is None and metric_lines(run_dir) <= start and time.time() < deadline:
        time.sleep(0.02)


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    reference = train(Recipe.load(overrides=[*RECIPE, f"run.dir={tmp_path / 'reference'}"]))
    # kills come a random fraction of an epoch after progress, so each cycle advances at most ~2 epochs
    # whatever the machine's speed (a fixed delay in seconds spans many epochs on a fast machine)
    epoch_seconds = reference.seconds / EPOCHS
    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    kills, kills_while_training = 0, 0
    process = launch(["train", *RECIPE, f"run.dir={run_dir}"])
    while kills < MIN_KILLS:
        if kills < STARTUP_KILLS:
            time.sleep(rng.uniform(0.1, 2.5))
        else:
            wait_for_progress(process, run_dir)
            time.sleep(rng.uniform(0.0, 1.0) * epoch_seconds)
        if process.poll() is not None:
            break  # finished before the kill: nothing to kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        kills_while_training += metric_lines(run_dir) > 0  # training had produced output
        started = (run_dir / "recipe.yaml").exists()
        process = launch(["resume", str(run_dir)] if started else ["train", *RECIPE, f"run.dir={run_dir}"])
    code = process.wait(timeout=300)
    assert code == 0, process.stderr.read().decode() if process.stderr else ""
    assert kills >= MIN_KILLS and kills_while_training >= MIN_KILLS - STARTUP_KILLS, (kills, kills_while_training)

    ours = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    theirs = load_file(str(reference.run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in lines] == [(e, s) for e in range(1, EPOCHS + 1) for s in ("train", "val")]
    assert [r["loss"] for r in lines] == [r["loss"] for r in reference.history]
    # the monitor's lines survive the kills too: the same steps, measured the same, once each
    ours_stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    reference_stats = [json.loads(line) for line in (reference.run_dir / "stats.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in ours_stats] == [(r["kind"], r["step"]) for r in reference_stats]
    steps = [r for r in ours_stats if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert steps == [r for r in reference_stats if r["kind"] == "step"]
