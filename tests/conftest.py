"""Shared fixtures: small recipes and makers of small data files in every supported format."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

# two pytest-xdist workers on two cores: one torch thread each avoids oversubscription
torch.set_num_threads(1)

# A tiny recipe: seconds, not minutes. Tests that need real accuracy use the default recipe.
TINY = [
    "model.name=mlp",
    "model.widths=[64]",
    "train.epochs=3",
    "schedule.warmup_epochs=0",
    "train.batch_size=64",
]


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default run folders (runs/...) land in the test's own temporary folder, never the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    return [*TINY, f"run.dir={tmp_path / 'run'}"]


def make_npz(path: Path, n: int = 40, classes: int = 4, size: int = 8, channels: int = 0, seed: int = 0) -> Path:
    """Images whose class is visible (a bright block at a class-dependent row), so nets can learn them."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    for i, label in enumerate(y):
        x[i, label * size // classes : (label + 1) * size // classes] += 150
    if channels:
        x = np.repeat(x[..., None], channels, axis=-1)
    np.savez(path, x=x, y=y)
    return path


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 12, fmt: str = "PNG") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            suffix = "png" if fmt == "PNG" else "jpg"
            Image.fromarray(pixels).save(folder / f"{i}.{suffix}", format=fmt)
    return root


def idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_idx(root: Path, n: int = 30, prefix: str = "train", gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(n, 28, 28), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write = gzip.compress if gz else (lambda b: b)
    (root / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(write(idx_bytes(x)))
    (root / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(write(idx_bytes(y)))
    return root


def make_cifar10_binary(root: Path, per_batch: int = 20) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = (np.arange(per_batch) % 10).astype(np.uint8)[:, None]
        pixels = rng.integers(0, 255, size=(per_batch, 3072), dtype=np.uint8)
        (root / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n")
    return root


def make_cifar10_python(root: Path, per_batch: int = 20) -> Path:
    """The python version, pickled the way the original was: a dict of bytes keys, numpy data, list labels."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, size=(per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(i % 10) for i in range(per_batch)]}  # fmt: skip
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


class PlantMarker:
    """A pickle payload that would create a marker file if it were ever executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
