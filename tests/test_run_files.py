"""Files written atomically get the mode the umask gives (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dragontrainer.run import atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    atomic = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert atomic == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert os.umask(previous) == previous  # the umask is left as it was
    os.umask(previous)


def test_checkpoint_folders_respect_the_umask(tmp_path: Path) -> None:
    import torch

    from dragontrainer.train.checkpoint import save_checkpoint

    previous = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "last", torch.nn.Linear(2, 2), None, {"epoch": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "last").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "last" / "model.safetensors").stat().st_mode) == 0o644
