from __future__ import annotations

import torch

from dragontrainer.data.preprocess import create_preprocessor
from dragontrainer.recipe import PreprocessSpec


def test_standardize_gives_zero_mean_unit_std_per_channel_on_train() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), generator=gen, dtype=torch.uint8)
    x[:, 1] //= 4  # a darker channel
    prep = create_preprocessor(PreprocessSpec(name="standardize")).fit(x)
    out = prep.apply(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_state_round_trip_applies_identically() -> None:
    x = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    fitted = create_preprocessor(PreprocessSpec()).fit(x)
    fresh = create_preprocessor(PreprocessSpec())
    fresh.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(fresh.apply(x), fitted.apply(x))


def test_constant_channel_does_not_divide_by_zero() -> None:
    x = torch.full((4, 1, 3, 3), 7, dtype=torch.uint8)
    assert torch.isfinite(create_preprocessor(PreprocessSpec()).fit(x).apply(x)).all()
