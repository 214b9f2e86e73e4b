from __future__ import annotations

import numpy as np
import pytest

from dragontrainer.data.split import stratified_split
from dragontrainer.errors import DataError


def test_split_is_stratified_disjoint_and_complete() -> None:
    y = np.repeat(np.arange(4), [100, 50, 20, 10])
    split = stratified_split(y, 0.2, 0.1, seed=3)
    everything = np.concatenate([split.train, split.val, split.test])
    assert sorted(everything.tolist()) == list(range(len(y)))
    for label, count in zip(range(4), [100, 50, 20, 10], strict=True):
        assert (y[split.val] == label).sum() == round(count * 0.2)
        assert (y[split.test] == label).sum() == round(count * 0.1)


def test_split_depends_on_seed_only() -> None:
    y = np.arange(200) % 5
    a, b, c = (stratified_split(y, 0.2, 0.0, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.val, c.val)
    assert len(a.test) == 0


def test_one_sample_class_cannot_be_stratified() -> None:
    with pytest.raises(DataError, match="class 2 has 1 image"):
        stratified_split(np.array([0, 0, 1, 1, 2]), 0.2, 0.0, seed=0)


def test_small_classes_keep_a_training_image() -> None:
    split = stratified_split(np.array([0, 0, 0, 1, 1, 1]), 0.5, 0.4, seed=0)
    assert set(np.array([0, 0, 0, 1, 1, 1])[split.train]) == {0, 1}
