"""The order of one training epoch as a pure function of (labels, epoch, seed, mode): nothing to save,
so a resumed run replays the same order and starts mid-epoch at `start_step`, and a streamed loader or
DDP shards can compute the same order independently.

Modes (`data.balance`):
- none / class_weights: a permutation of every training image (the natural class frequencies);
- oversample: every class repeated up to the largest class's count (whole permutations of the class,
  then a random part of one), C × max images per epoch;
- undersample: every class cut to the smallest class's count (a fresh random subset each epoch),
  C × min images per epoch;
- two_stage: class-balanced draws (each class N/C of the N slots, cycling through permutations of
  the class) before `switch_epoch`, the natural permutation from it on.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import numpy as np
import torch

BALANCE_MODES = ("none", "oversample", "undersample", "class_weights", "two_stage")


def generator_for(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def class_members(labels: torch.Tensor) -> list[torch.Tensor]:
    """Indices of each present class, in index order."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    return [part for part in torch.split(order, counts.tolist()) if len(part)]


def draws(members: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` draws from one class: whole permutations of it, then the start of one more."""
    full, rest = divmod(count, len(members))
    parts = [members[torch.randperm(len(members), generator=generator)] for _ in range(full)]
    if rest:
        parts.append(members[torch.randperm(len(members), generator=generator)[:rest]])
    return torch.cat(parts) if parts else members[:0]


def balanced(labels: torch.Tensor, per_class: list[int], generator: torch.Generator) -> torch.Tensor:
    picked = torch.cat([draws(m, n, generator) for m, n in zip(class_members(labels), per_class, strict=True)])
    return picked[torch.randperm(len(picked), generator=generator)]


def per_class_counts(labels: torch.Tensor, mode: str, epoch: int, switch_epoch: int | None) -> list[int] | None:
    """How many draws each present class gets this epoch; None for the natural permutation."""
    counts = [int(c) for c in torch.bincount(labels) if c > 0]
    if mode == "oversample":
        return [max(counts)] * len(counts)
    if mode == "undersample":
        return [min(counts)] * len(counts)
    if mode == "two_stage" and (switch_epoch is None or epoch < switch_epoch):
        share, extra = divmod(len(labels), len(counts))
        return [share + (i < extra) for i in range(len(counts))]
    return None


def epoch_order(
    labels: torch.Tensor | np.ndarray, epoch: int, seed: int, mode: str = "none", *, switch_epoch: int | None = None
) -> torch.Tensor:
    """Indices into `labels` (CPU int64) for epoch `epoch`; the same arguments give the same order."""
    if mode not in BALANCE_MODES:
        raise ValueError(f"unknown balance mode {mode!r}")
    labels = torch.as_tensor(labels).cpu().long()
    generator = generator_for(seed, epoch)
    counts = per_class_counts(labels, mode, epoch, switch_epoch)
    if counts is None:
        return torch.randperm(len(labels), generator=generator)
    return balanced(labels, counts, generator)


def epoch_size(labels: torch.Tensor | np.ndarray, mode: str) -> int:
    """Images per epoch (the same for every epoch of a mode: two_stage draws N in both phases)."""
    labels = torch.as_tensor(labels).cpu().long()
    counts = per_class_counts(labels, mode, 0, None)
    return len(labels) if counts is None else sum(counts)


Batches = TypeVar("Batches", bound="GlobalBatches")


class GlobalBatches:
    """What every loader shares: an epoch of `epoch_images` positions cut into global batches of
    `batch_size`, of which rank `rank` of `world` takes `order[lo:hi][rank::world]` (the DDP contract:
    the steps per epoch and the order do not depend on the rank count)."""

    batch_size: int
    epoch_images: int
    shuffle: bool
    rank: int
    world: int

    def __len__(self) -> int:
        full, rest = divmod(self.epoch_images, self.batch_size)
        if self.shuffle:
            # a lone last training sample would make batch norm fail on a batch of one: it waits
            # for the next epoch's permutation instead
            return full + (rest > 1)
        return full + (rest > 0)

    def bounds(self, step: int) -> tuple[int, int]:
        """Positions [lo, hi) in the epoch's order of global batch `step` (the last one may be short)."""
        return step * self.batch_size, min((step + 1) * self.batch_size, self.epoch_images)

    def sharded(self: Batches, shard: tuple[int, int]) -> Batches:
        """The same loader serving another shard of each global batch ((0, 1): the whole batch)."""
        copied = copy.copy(self)
        copied.rank, copied.world = shard
        return copied
