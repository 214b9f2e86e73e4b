"""Streamed batches: images stay on disk (a decoded cache) or in host memory; a background thread reads
the next few batches while the device trains on the current one.

The loader protocol is DeviceLoader's: `len`, `num_images`, `labels`, `batches(epoch, start_step)`,
`take(index)`, `device`, `shard=(rank, world)`. The epoch order is `data/sampler.py::epoch_order`, the
same function DeviceLoader uses, so for the same seed both give the same batches (shuffling, class
balance, two-stage, folds and exact mid-epoch resume need nothing new here). Each batch is one vectorised
gather of its rows (sorted by row, for locality on disk), an optional crop, a pinned copy on CUDA and a
non-blocking transfer: no per-sample Python.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from dragontrainer.data.sampler import GlobalBatches, epoch_order, epoch_size

PREFETCH_BATCHES = 4
_DONE = object()


class StreamLoader(GlobalBatches):
    """Batches of `images[index[...]]` (uint8 N×C×H×W on disk or in host memory) moved to `device` per batch.

    `crop`: output side length when the stored images are larger (data.cache_size): training loaders
    (shuffle) take a random crop per image, seeded by (seed, epoch, step) so a resumed epoch replays it;
    evaluation loaders take the centre crop.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, index: np.ndarray, batch_size: int, *, shuffle: bool,
        device: torch.device | str = "cpu", seed: int = 0, balance: str = "none", switch_epoch: int | None = None,
        crop: int | None = None, shard: tuple[int, int] = (0, 1), prefetch: int = PREFETCH_BATCHES,
        read_rows: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> None:  # fmt: skip
        self.images = images
        self.rows = np.asarray(index, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle, self.seed = shuffle, seed
        self.balance, self.switch_epoch = balance, switch_epoch  # data.balance: see data/sampler.py
        self.device = torch.device(device)
        self.crop = crop if crop is not None and crop < images.shape[-1] else None
        self.rank, self.world = shard
        self.prefetch = prefetch
        self.read_rows = read_rows  # a decoded cache's RowFile.read (pread: no pages mapped), else np.take
        self.labels = torch.from_numpy(np.asarray(labels)[self.rows].astype(np.int64))
        self.epoch_images = epoch_size(self.labels, balance) if shuffle else len(self.rows)
        self.pin = self.device.type == "cuda"

    @property
    def num_images(self) -> int:
        return len(self.rows)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.images.shape[1:]
        return (channels, self.crop, self.crop) if self.crop else (channels, height, width)

    def order(self, epoch: int) -> np.ndarray:
        """Positions (into this loader's images) of epoch `epoch`, the same as DeviceLoader's."""
        if not self.shuffle:
            return np.arange(len(self.rows))
        return epoch_order(self.labels, epoch, self.seed, self.balance, switch_epoch=self.switch_epoch).numpy()

    def batches(self, epoch: int = 0, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from `start_step` on, read ahead by a background thread."""
        order = self.order(epoch)
        steps = range(start_step, len(self))
        if not steps:
            return
        ready: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        reader = threading.Thread(target=self._read_ahead, args=(order, epoch, steps, ready, stop), daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                images, labels = item
                yield self._to_device(images), self._to_device(labels)
        finally:
            stop.set()
            reader.join()

    def take(self, index: torch.Tensor | np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (centre-cropped) and labels at positions `index` of this loader, on the device."""
        positions = torch.as_tensor(index).cpu().numpy().astype(np.int64).reshape(-1)
        images, labels = self._read(positions, None)
        return self._to_device(images), self._to_device(labels)

    # ------------------------------------------------------------------------- the reading side

    def _read_ahead(self, order: np.ndarray, epoch: int, steps: range, ready: queue.Queue[Any],
                    stop: threading.Event) -> None:  # fmt: skip
        try:
            for step in steps:
                lo, hi = self.bounds(step)
                positions = order[lo:hi]
                crops = self._crop_offsets(len(positions), epoch, step)
                positions = positions[self.rank :: self.world]  # DDP: this rank's part of the global batch
                if crops is not None:
                    crops = crops[self.rank :: self.world]
                item = self._read(positions, crops)
                if not self._put(ready, item, stop):
                    return
            self._put(ready, _DONE, stop)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(ready, exc, stop)

    @staticmethod
    def _put(ready: queue.Queue[Any], item: object, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _crop_offsets(self, count: int, epoch: int, step: int) -> np.ndarray | None:
        """Random (top, left) per image of the global batch; None for no crop or the centre crop."""
        if self.crop is None or not self.shuffle:
            return None
        room = np.array(self.images.shape[2:]) - self.crop + 1
        return np.random.default_rng([self.seed, epoch, step]).integers(0, room, size=(count, 2))

    def _read(self, positions: np.ndarray, crops: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[positions]
        by_row = np.argsort(rows, kind="stable")
        gathered = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        if self.read_rows is not None:
            self.read_rows(rows[by_row], gathered)  # in file order: sequential reads
        else:
            np.take(self.images, rows[by_row], axis=0, out=gathered)
        images = np.empty_like(gathered)
        images[by_row] = gathered  # back to the sampler's order
        images = self._cropped(images, crops)
        batch = torch.from_numpy(images)
        labels = self.labels[torch.from_numpy(positions)]
        if self.pin:
            batch, labels = batch.pin_memory(), labels.pin_memory()
        return batch, labels

    def _cropped(self, images: np.ndarray, crops: np.ndarray | None) -> np.ndarray:
        if self.crop is None:
            return images
        size = self.crop
        if crops is None:
            top, left = (images.shape[2] - size) // 2, (images.shape[3] - size) // 2
            return np.ascontiguousarray(images[:, :, top : top + size, left : left + size])
        steps = np.arange(size)
        rows = (crops[:, 0, None] + steps)[:, None, :, None]  # (B, 1, size, 1)
        cols = (crops[:, 1, None] + steps)[:, None, None, :]  # (B, 1, 1, size)
        batch = np.arange(len(images))[:, None, None, None]
        channels = np.arange(images.shape[1])[None, :, None, None]
        return images[batch, channels, rows, cols]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            return tensor
        return tensor.to(self.device, non_blocking=self.pin)
