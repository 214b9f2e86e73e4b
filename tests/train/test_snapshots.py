"""Snapshots at cycle ends, weight averages (SWA with recomputed batch-norm statistics, EMA)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from dragontrainer import Recipe, train
from dragontrainer.optim.schedules import create_schedule, warmup_epochs
from dragontrainer.train.snapshots import cycle_end_steps, snapshot_files
from tests.conftest import TINY


def test_cycle_ends_are_where_the_schedule_restarts() -> None:
    for overrides in (["schedule.name=cosine_restarts", "schedule.restart_epochs=2", "schedule.restart_mult=2"],
                      ["schedule.name=cyclic", "schedule.cycle_epochs=3", "schedule.warmup_epochs=1"]):  # fmt: skip
        spec = Recipe.load(overrides=[*overrides, "train.epochs=20"]).schedule
        factor = create_schedule(spec, steps_per_epoch=7, total_steps=140)
        ends = cycle_end_steps(spec, 7, 140)
        assert ends
        previous = round(warmup_epochs(spec, 20) * 7)
        for end in ends:  # each cycle reaches the top and ends at its low, the last step before a snapshot
            assert max(factor(step) for step in range(previous, end)) > 0.9
            assert min(factor(end - 1), factor(end)) < 0.2
            previous = end


def test_snapshots_are_written_at_cycle_ends(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(overrides=[*TINY, "train.epochs=6", "schedule.name=cosine_restarts", "schedule.restart_epochs=2",
                     "train.snapshots=cycles", f"run.dir={run}"])  # fmt: skip
    assert [f.name for f in snapshot_files(run)] == [f"epoch-000{e}.safetensors" for e in (2, 4, 6)]
    last = load_file(run / "checkpoints" / "last" / "model.safetensors")
    final = load_file(snapshot_files(run)[-1])
    assert all(torch.equal(last[k], final[k]) for k in last)


def test_swa_averages_epoch_ends_and_recomputes_batch_norm(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(overrides=[*TINY, "train.epochs=4", "train.snapshots=every_k", "train.snapshot_every=1",
                     "train.weight_average=swa", "train.swa_start=0.5", f"run.dir={run}"])  # fmt: skip
    swa = load_file(run / "checkpoints" / "swa" / "model.safetensors")
    epochs = [load_file(f) for f in snapshot_files(run)[2:]]  # epochs 3 and 4
    norm_stats = [k for k in swa if "running_" in k]
    assert norm_stats, "the tiny MLP has batch norm"
    for key, value in swa.items():
        if value.is_floating_point() and key not in norm_stats:
            assert torch.allclose(value, (epochs[0][key] + epochs[1][key]) / 2, atol=1e-6)
    # the running statistics are measured for the averaged weights, not averaged
    assert any(not torch.allclose(swa[k], (epochs[0][k] + epochs[1][k]) / 2) for k in norm_stats)


def test_ema_keeps_a_moving_average(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(overrides=[*TINY, "train.weight_average=ema", "train.ema_decay=0.9", f"run.dir={run}"])
    ema = load_file(run / "checkpoints" / "ema" / "model.safetensors")
    last = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert ema.keys() == last.keys()
    assert any(not torch.equal(ema[k], last[k]) for k in ema if ema[k].is_floating_point())
    assert not (run / "checkpoints" / "ema-running.safetensors").exists()
