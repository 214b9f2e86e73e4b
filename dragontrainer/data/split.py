"""Seeded, stratified train / validation / test split, as index arrays (never copies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dragontrainer.errors import DataError

if TYPE_CHECKING:
    from dragontrainer.recipe import DataSpec


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


def split_for(y: np.ndarray, spec: DataSpec, official_test: np.ndarray | None = None) -> Split:
    """The split a recipe's `data` section asks for: a validation fraction, or fold `fold` of `folds`.
    With `official_test` (MNIST/CIFAR test files) those images are the test split and the rest is split."""
    if official_test is not None and official_test.any():
        pool = np.flatnonzero(~official_test)
        inner = split_for(y[pool], spec.model_copy(update={"test_fraction": 0.0}))
        return Split(pool[inner.train], pool[inner.val], np.flatnonzero(official_test).astype(np.int64))
    if spec.folds == 1:
        return stratified_split(y, spec.val_fraction, spec.test_fraction, spec.split_seed)
    return fold_split(y, spec.folds, spec.fold, spec.test_fraction, spec.split_seed)


def fold_split(y: np.ndarray, folds: int, fold: int, test_fraction: float, seed: int) -> Split:
    """K-fold cross-validation: the test split is carved out first (the same for every fold), then the
    rest is cut into `folds` stratified folds (scikit-learn's StratifiedKFold); fold `fold` validates."""
    from sklearn.model_selection import StratifiedKFold

    held_out = stratified_split(y, 0.0, test_fraction, seed)
    pool = held_out.train
    counts = np.bincount(y[pool])
    smallest = int(counts[counts > 0].min())
    if smallest < folds:
        raise DataError(
            f"data.folds={folds}: the smallest class has {smallest} image(s) outside the test split; "
            f"stratified folds need at least {folds} per class (lower data.folds or add images)"
        )
    cuts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(pool)), y[pool])
    train, val = list(cuts)[fold]
    return Split(np.sort(pool[train]), np.sort(pool[val]), held_out.test)
