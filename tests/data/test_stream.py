from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dragontrainer.data.cache import open_cache
from dragontrainer.data.image_folder import list_folder
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.sources import load_images
from dragontrainer.data.stream import StreamLoader
from dragontrainer.recipe import DataSpec
from tests.conftest import make_image_folder


def images_and_labels(n: int = 50, classes: int = 3, size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(n, 3, size, size), dtype=np.uint8)
    y = np.minimum(np.arange(n) % 7, classes - 1).astype(np.int64)  # imbalanced: class 2 is the largest
    return x, y


@pytest.mark.parametrize("balance", ["none", "oversample", "undersample", "two_stage"])
def test_streamed_batches_equal_the_device_loaders_for_the_same_seed(balance: str) -> None:
    x, y = images_and_labels()
    rows = np.arange(3, 50, 2)  # a split: every other image
    device = DeviceLoader(torch.from_numpy(x[rows]), torch.from_numpy(y[rows]), 8, shuffle=True, seed=5,
                          balance=balance, switch_epoch=1)  # fmt: skip
    stream = StreamLoader(x, y, rows, 8, shuffle=True, seed=5, balance=balance, switch_epoch=1)
    assert len(stream) == len(device) and stream.num_images == len(rows)
    assert torch.equal(stream.labels, torch.from_numpy(y[rows]))
    for epoch in (0, 2):
        for (a, b), (c, d) in zip(device.batches(epoch), stream.batches(epoch), strict=True):
            assert torch.equal(a, c) and torch.equal(b, d)


def test_an_epoch_sees_every_image_exactly_once() -> None:
    x, y = images_and_labels(37)
    x[:, 0, 0, 0] = np.arange(37)  # each image carries its own number
    stream = StreamLoader(x, y, np.arange(37), 5, shuffle=True, seed=1)
    seen = torch.cat([images[:, 0, 0, 0] for images, _ in stream.batches(3)]).tolist()
    assert sorted(seen) == list(range(37)) and seen != list(range(37))
    evaluation = StreamLoader(x, y, np.arange(37), 5, shuffle=False)
    assert torch.cat([images[:, 0, 0, 0] for images, _ in evaluation.batches()]).tolist() == list(range(37))


def test_resume_mid_epoch_replays_the_rest_of_the_epoch_exactly() -> None:
    x, y = images_and_labels()
    stream = StreamLoader(x, y, np.arange(50), 6, shuffle=True, seed=2, crop=3)
    full = list(stream.batches(4))
    tail = list(stream.batches(4, start_step=3))
    assert len(tail) == len(full) - 3
    for (a, b), (c, d) in zip(full[3:], tail, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_shards_split_each_global_batch_between_ranks() -> None:
    x, y = images_and_labels()
    whole = StreamLoader(x, y, np.arange(50), 8, shuffle=True, seed=4, crop=3)
    ranks = [StreamLoader(x, y, np.arange(50), 8, shuffle=True, seed=4, crop=3, shard=(r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(whole)
    for (images, labels), *parts in zip(whole.batches(1), *(r.batches(1) for r in ranks), strict=True):
        assert torch.equal(images[0::2], parts[0][0]) and torch.equal(images[1::2], parts[1][0])
        assert torch.equal(labels[1::2], parts[1][1])


def test_crops_random_in_training_centred_in_evaluation() -> None:
    x, y = images_and_labels(20, size=6)
    train = StreamLoader(x, y, np.arange(20), 20, shuffle=True, seed=0, crop=4)
    evaluation = StreamLoader(x, y, np.arange(20), 20, shuffle=False, crop=4)
    assert train.image_shape == (3, 4, 4)
    (centred, _), *_ = evaluation.batches()
    assert torch.equal(centred, torch.from_numpy(x[:, :, 1:5, 1:5]))
    (cropped, labels), *_ = train.batches(0)
    order = train.order(0)
    windows = {
        (int(i), top, left): torch.from_numpy(x[i, :, top : top + 4, left : left + 4])
        for i in order for top in range(3) for left in range(3)
    }  # fmt: skip
    offsets = [
        next(k for k, w in windows.items() if k[0] == i and torch.equal(w, c))
        for i, c in zip(order, cropped, strict=True)
    ]
    assert len({(top, left) for _, top, left in offsets}) > 1  # not one offset for the whole batch
    assert torch.equal(train.take([3, 0])[0], centred[[3, 0]]) and torch.equal(labels, torch.from_numpy(y[order]))


def test_take_reads_arbitrary_positions_of_the_split() -> None:
    x, y = images_and_labels()
    rows = np.array([9, 2, 40, 17])
    stream = StreamLoader(x, y, rows, 2, shuffle=False)
    images, labels = stream.take(torch.tensor([2, 0, 2]))
    assert torch.equal(images, torch.from_numpy(x[[40, 9, 40]]))
    assert torch.equal(labels, torch.from_numpy(y[[40, 9, 40]]))


def test_stopping_early_ends_the_reader_thread_and_errors_reach_the_caller() -> None:
    x, y = images_and_labels()
    before = threading.active_count()
    stream = StreamLoader(x, y, np.arange(50), 2, shuffle=True, prefetch=1)
    for _step, _batch in zip(range(2), stream.batches(0), strict=False):
        pass
    assert threading.active_count() == before

    broken = StreamLoader(x, y, np.arange(50), 2, shuffle=False)

    def unreadable(positions: np.ndarray, crops: object) -> None:
        raise OSError("disk gone")

    broken._read = unreadable  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk gone"):
        list(broken.batches())
    assert threading.active_count() == before


@pytest.mark.parametrize("gray", [False, True])
def test_rows_read_from_a_decoded_cache_equal_the_resident_batches(tmp_path: Path, gray: bool) -> None:
    from PIL import Image

    root = make_image_folder(tmp_path / "images", classes=3, per_class=7, size=32)
    if gray:
        for path in root.glob("*/*.png"):
            Image.open(path).convert("L").save(path)
    spec = DataSpec(path=root, cache=tmp_path / "cache")
    decoded = open_cache(list_folder(root), spec)
    resident = load_images(spec)
    assert decoded.images.shape == resident.x.shape == (21, 1 if gray else 3, 32, 32)
    rows = np.array([0, 1, 2, 5, 6, 9, 10, 11, 12, 20])  # runs of consecutive rows and lone ones
    device = DeviceLoader(torch.from_numpy(resident.x[rows]), torch.from_numpy(resident.y[rows]), 4, shuffle=True)
    stream = StreamLoader(decoded.images, decoded.labels, rows, 4, shuffle=True, read_rows=decoded.rows.read)
    for (a, b), (c, d) in zip(device.batches(1), stream.batches(1), strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert torch.equal(stream.take([9, 0, 9])[0], torch.from_numpy(resident.x[[20, 0, 20]]))
