"""Device-resident batches: the whole split lives on the device; an epoch is a permutation of it."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dragontrainer.data.sampler import GlobalBatches, epoch_order, epoch_size


class DeviceLoader(GlobalBatches):
    """Slices batches out of tensors already on the device; no DataLoader, no per-sample Python.

    The order of epoch `e` is a permutation drawn from a generator seeded by (seed, e), so it needs
    no saved state: a resumed run replays the same order and can start mid-epoch at `start_step`.
    With `shard=(rank, world)` (DDP) each batch is this rank's part `order[lo:hi][rank::world]` of the
    global batch: the length, the order and the steps per epoch do not depend on the rank count.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0,
        balance: str = "none", switch_epoch: int | None = None, shard: tuple[int, int] = (0, 1),
    ) -> None:  # fmt: skip
        self.x, self.y = x, y
        self.rank, self.world = shard
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.balance, self.switch_epoch = balance, switch_epoch  # data.balance: see data/sampler.py
        self.labels = y.cpu()
        self.epoch_images = epoch_size(self.labels, balance) if shuffle else len(x)

    @property
    def num_images(self) -> int:
        return len(self.x)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at arbitrary indices (probe sets, monitors), on the device."""
        index = index.to(self.x.device)
        return self.x[index], self.y[index]

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.x), device=self.x.device)
        order = epoch_order(self.labels, epoch, self.seed, self.balance, switch_epoch=self.switch_epoch)
        return order.to(self.x.device)

    def batches(self, epoch: int = 0, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order(epoch) if self.shuffle else None
        for step in range(start_step, len(self)):
            lo, hi = self.bounds(step)
            if order is None:
                yield self.x[lo + self.rank : hi : self.world], self.y[lo + self.rank : hi : self.world]
            else:
                index = order[lo:hi][self.rank :: self.world]  # DDP: this rank's part of the global batch
                yield self.x[index], self.y[index]
