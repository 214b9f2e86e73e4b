from __future__ import annotations

import torch

from dragontrainer.data.loader import DeviceLoader


def test_epoch_covers_every_image_once_in_a_seeded_order() -> None:
    x = torch.arange(10).float().view(10, 1, 1, 1)
    loader = DeviceLoader(x, torch.arange(10), batch_size=4, shuffle=True, seed=0)
    assert len(loader) == 3
    seen = torch.cat([y for _, y in loader.batches(epoch=0)])
    assert sorted(seen.tolist()) == list(range(10))
    again = torch.cat([y for _, y in loader.batches(epoch=0)])
    other = torch.cat([y for _, y in loader.batches(epoch=1)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def test_resume_mid_epoch_continues_the_same_order() -> None:
    loader = DeviceLoader(torch.zeros(9, 1, 1, 1), torch.arange(9), batch_size=2, shuffle=True, seed=3)
    full = [y for _, y in loader.batches(epoch=2)]
    tail = [y for _, y in loader.batches(epoch=2, start_step=2)]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], tail, strict=True))


def test_a_lone_training_sample_is_dropped_but_eval_sees_all() -> None:
    x, y = torch.zeros(9, 1, 1, 1), torch.arange(9)
    assert len(DeviceLoader(x, y, 4, shuffle=True)) == 2
    assert len(DeviceLoader(x, y, 4, shuffle=False)) == 3
