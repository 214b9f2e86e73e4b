from __future__ import annotations

import numpy as np
import pytest

from dragontrainer.data.split import fold_split, split_for, stratified_split
from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import Recipe


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


def test_folds_partition_the_non_test_images_and_keep_the_test_split_fixed() -> None:
    y = np.repeat(np.arange(4), 30)
    splits = [fold_split(y, 3, k, test_fraction=0.1, seed=0) for k in range(3)]
    test = splits[0].test
    assert len(test) == 12 and all(np.array_equal(s.test, test) for s in splits)
    vals = np.concatenate([s.val for s in splits])
    assert sorted(vals.tolist()) == sorted(np.setdiff1d(np.arange(120), test).tolist())  # each image once
    for s in splits:
        assert not np.intersect1d(s.train, s.val).size and not np.intersect1d(s.train, test).size
        assert np.bincount(y[s.val]).tolist() == [9, 9, 9, 9]  # stratified


def test_fold_knobs_are_validated_and_reach_the_split() -> None:
    with pytest.raises(RecipeError, match="fold must be below folds"):
        Recipe.load(overrides=["data.folds=3", "data.fold=3"])
    spec = Recipe.load(overrides=["data.folds=4", "data.fold=1"]).data
    y = np.repeat(np.arange(2), 8)
    assert len(split_for(y, spec).val) == 4
    with pytest.raises(DataError, match="data.folds=4: the smallest class has 3"):
        split_for(np.array([0, 0, 0, 1, 1, 1, 1, 1]), spec)
