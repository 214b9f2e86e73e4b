"""data.balance: the epoch order as a pure function; class frequencies per mode, also after a mid-epoch resume."""

from __future__ import annotations

import pytest
import torch

from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.sampler import epoch_order, epoch_size

LABELS = torch.tensor([0] * 100 + [1] * 10 + [2] * 30)


def frequencies(order: torch.Tensor) -> list[int]:
    return torch.bincount(LABELS[order], minlength=3).tolist()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("none", [100, 10, 30]), ("class_weights", [100, 10, 30]), ("oversample", [100, 100, 100]),
     ("undersample", [10, 10, 10]), ("two_stage", [47, 47, 46])],
)  # fmt: skip
def test_each_mode_gives_its_class_frequencies(mode: str, expected: list[int]) -> None:
    order = epoch_order(LABELS, epoch=3, seed=7, mode=mode, switch_epoch=5)
    assert frequencies(order) == expected and len(order) == epoch_size(LABELS, mode)
    assert torch.equal(order, epoch_order(LABELS, epoch=3, seed=7, mode=mode, switch_epoch=5))  # reproducible
    assert not torch.equal(order, epoch_order(LABELS, epoch=4, seed=7, mode=mode, switch_epoch=5))


def test_oversampling_keeps_every_majority_image_and_repeats_the_minority_evenly() -> None:
    order = epoch_order(LABELS, epoch=0, seed=0, mode="oversample")
    assert sorted(order[LABELS[order] == 0].tolist()) == list(range(100))
    assert torch.bincount(order[LABELS[order] == 1] - 100).tolist() == [10] * 10


def test_two_stage_returns_to_the_natural_order_at_its_switch() -> None:
    before = epoch_order(LABELS, epoch=4, seed=0, mode="two_stage", switch_epoch=5)
    after = epoch_order(LABELS, epoch=5, seed=0, mode="two_stage", switch_epoch=5)
    assert frequencies(before) == [47, 47, 46]
    assert torch.equal(after, epoch_order(LABELS, epoch=5, seed=0, mode="none"))


def test_none_is_the_previous_permutation() -> None:
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    assert torch.equal(epoch_order(LABELS, 2, 3), torch.randperm(len(LABELS), generator=generator))


@pytest.mark.parametrize("mode", ["oversample", "undersample", "two_stage"])
def test_a_mid_epoch_resume_replays_the_rest_of_the_epoch(mode: str) -> None:
    x = torch.arange(len(LABELS)).view(-1, 1, 1, 1)
    loader = DeviceLoader(x, LABELS, 16, shuffle=True, seed=1, balance=mode, switch_epoch=9)
    whole = list(loader.batches(epoch=2))
    resumed = list(loader.batches(epoch=2, start_step=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[3:], resumed, strict=True))
    seen = torch.cat([y for _, y in whole[:3]] + [y for _, y in resumed])
    assert torch.bincount(seen, minlength=3).tolist() == frequencies(loader.order(2)[: len(seen)])
