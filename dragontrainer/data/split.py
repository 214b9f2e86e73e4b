"""Seeded, stratified train / validation / test split, as index arrays (never copies)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dragontrainer.errors import DataError


@dataclass(frozen=True)
class Split:
    """Sorted indices into the ImageSet for each split; `test` is empty when not asked for."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratified_split(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Each class is split in the same proportions; every class keeps at least one training image.

    A class needs at least one image per requested split, else the split cannot be stratified.
    """
    rng = np.random.default_rng(seed)
    wanted = 1 + (val_fraction > 0) + (test_fraction > 0)
    train, val, test = [], [], []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        if len(members) < wanted:
            raise DataError(
                f"class {int(label)} has {len(members)} image(s); a stratified split into "
                f"{wanted} parts needs at least {wanted} per class (lower data.val_fraction/test_fraction "
                f"or add images)"
            )
        members = rng.permutation(members)
        n_val = _share(len(members), val_fraction)
        n_test = _share(len(members), test_fraction)
        while n_val + n_test > len(members) - 1:  # keep one training image; shrink the larger
            if n_test > 1 and n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        val.append(members[:n_val])
        test.append(members[n_val : n_val + n_test])
        train.append(members[n_val + n_test :])
    return Split(*(np.sort(np.concatenate(part)).astype(np.int64) for part in (train, val, test)))


def _share(count: int, fraction: float) -> int:
    """Rounded share of a class, at least 1 whenever the fraction is positive."""
    return 0 if fraction <= 0 else max(1, round(count * fraction))
