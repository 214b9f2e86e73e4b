from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dragontrainer.data.residency import choose_residency, fit_sample, load_for_training
from dragontrainer.errors import RecipeError
from dragontrainer.recipe import DataSpec
from tests.conftest import make_image_folder

CPU = torch.device("cpu")
MIB = 1 << 20


def test_auto_keeps_what_fits_resident_and_streams_the_rest_saying_why() -> None:
    spec = DataSpec()
    small = choose_residency(spec, 10 * MIB, CPU, room=100 * MIB)
    assert small.mode == "device" and "20.0 MiB of 100.0 MiB host memory" in small.reason
    large = choose_residency(spec, 30 * MIB, CPU, room=100 * MIB)  # twice 30 MiB on CPU: above half
    assert large.mode == "stream" and "above 50%" in large.reason
    assert large.record() == {"resident": "stream", "resident_reason": large.reason, "decoded_bytes": 30 * MIB}


def test_explicit_choices_win_and_cache_size_streams() -> None:
    assert choose_residency(DataSpec(resident="device"), 10**12, CPU, room=1).mode == "device"
    assert choose_residency(DataSpec(resident="stream"), 1, CPU, room=10**12).mode == "stream"
    cropped = DataSpec(image_size=8, cache_size=10)
    assert choose_residency(cropped, 1, CPU, room=10**12).mode == "stream"
    with pytest.raises(RecipeError, match="data.resident: device cannot crop"):
        choose_residency(DataSpec(image_size=8, cache_size=10, resident="device"), 1, CPU)


def test_cache_size_must_hold_the_image_size() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        DataSpec(image_size=16, cache_size=12)
    with pytest.raises(ValueError, match="cache_size"):
        DataSpec(cache_size=12)


def test_an_image_folder_streams_from_the_cache_without_decoding_it_into_memory(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=2, per_class=4, size=32)
    spec = DataSpec(path=root, cache=tmp_path / "cache", resident="auto")
    loaded = load_for_training(spec, CPU, room=32 * 32 * 3 * 8)  # room for the images once, not twice
    assert loaded.residency.mode == "stream" and loaded.read_rows is not None
    assert isinstance(loaded.images.x, np.ndarray) and not loaded.images.x.flags.writeable  # the mapped file
    resident = load_for_training(DataSpec(path=root, cache=tmp_path / "cache"), CPU, room=10**9)
    assert resident.residency.mode == "device" and np.array_equal(resident.images.x, loaded.images.x)


def test_fit_sample_is_bounded_seeded_and_sorted() -> None:
    rows = np.arange(10_000)
    picked = fit_sample(rows, row_bytes=64 * 1024, seed=0)
    assert len(picked) == 1024 and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, fit_sample(rows, row_bytes=64 * 1024, seed=0))
    assert np.array_equal(fit_sample(rows[:10], row_bytes=64, seed=0), np.arange(10))


CAPPED = """
import json, sys
from pathlib import Path
import numpy as np, torch
from torch import nn
from dragontrainer.data.residency import load_for_training
from dragontrainer.data.stream import StreamLoader
from dragontrainer.recipe import DataSpec
from dragontrainer.resources import proc_kib

torch.set_num_threads(1)
root, where, cap = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
model = nn.Sequential(nn.AvgPool2d(16), nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

def step(x, y):
    loss = nn.functional.cross_entropy(model(x.float() / 255), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

def epochs(root, epochs, room):
    loaded = load_for_training(DataSpec(path=root, cache=where), torch.device("cpu"), room=room)
    images, seen = loaded.images, 0
    train = StreamLoader(images.x, images.y, np.arange(len(images.y)), 4, shuffle=True, read_rows=loaded.read_rows)
    for epoch in range(epochs):
        for x, y in train.batches(epoch):
            step(x, y)
            seen += len(y)
    return loaded, seen

epochs(root / "warm-up", 1, room=1)  # the same code on 8 images first: libraries' pages and thread arenas are in place
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
baseline = proc_kib("/proc/self/status", "VmHWM:")
loaded, seen = epochs(root / "large", 2, room=cap)
peak = proc_kib("/proc/self/status", "VmHWM:") - baseline
print(json.dumps({"mode": loaded.residency.mode, "decoded": loaded.residency.decoded_bytes, "peak": peak,
                  "seen": seen}))
"""


def test_training_on_a_folder_larger_than_the_memory_cap_stays_under_it(tmp_path: Path) -> None:
    from PIL import Image

    count, side = 560, 256
    gradient = np.add.outer(np.arange(side), np.arange(side)).astype(np.uint8)
    for i in range(count + 8):
        folder = tmp_path / ("large" if i < count else "warm-up") / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.stack([gradient + np.uint8(i % 256), gradient.T, np.full_like(gradient, i % 2 * 200)], axis=-1)
        Image.fromarray(pixels).save(folder / f"{i}.png", compress_level=1)
    cap = 48 * MIB
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", CAPPED, str(tmp_path), str(tmp_path / "cache"), str(cap)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["mode"] == "stream" and measured["decoded"] == count * 3 * side * side > 2 * cap
    assert measured["seen"] == 2 * count
    assert measured["peak"] < cap, f"peak RSS grew {measured['peak'] / MIB:.1f} MiB over the baseline"


def test_dragon_cache_decodes_ahead_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dragontrainer import cache_images
    from dragontrainer.cli import main

    root = make_image_folder(tmp_path / "images", classes=2, per_class=3, size=8)
    where = f"data.cache={tmp_path / 'cache'}"
    assert main(["cache", f"data.path={root}", where, "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["decoded"] == 6 and first["shape"] == [6, 3, 8, 8]
    assert main(["cache", f"data.path={root}", where]) == 0
    assert "reused: the folder is unchanged" in capsys.readouterr().out
    assert cache_images(DataSpec(path=root, cache=tmp_path / "cache")).decoded == 0
    assert main(["cache", where]) == 2  # the digits are no image folder
    assert "the decoded cache holds image folders" in capsys.readouterr().err
