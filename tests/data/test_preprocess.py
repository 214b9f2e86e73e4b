from __future__ import annotations

import pytest
import torch

from dragontrainer.data.preprocess import PREPROCESSORS, create_preprocessor
from dragontrainer.errors import RecipeError
from dragontrainer.recipe import PreprocessSpec


def images(n: int = 256, c: int = 3, size: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, c, size, size), generator=gen).float()
    base[:, :, :, 1:] = 0.6 * base[:, :, :, 1:] + 0.4 * base[:, :, :, :-1]  # correlated neighbours
    if c > 1:
        base[:, 1] = base[:, 1] / 4  # a darker channel
    return base.round().clamp(0, 255).to(torch.uint8)


def fitted(name: str, x: torch.Tensor, **spec: object):
    return create_preprocessor(PreprocessSpec(name=name, **spec)).fit(x)


def test_standardize_gives_zero_mean_unit_std_per_channel_on_train() -> None:
    x = images()
    out = fitted("standardize", x).apply(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std((0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_centering_and_pixel_standardization() -> None:
    x = images()
    torch.testing.assert_close(fitted("center_channel", x).apply(x).mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(fitted("center_pixel", x).apply(x).mean(0), torch.zeros(3, 6, 6), atol=1e-5, rtol=0)
    out = fitted("standardize_pixel", x).apply(x)
    torch.testing.assert_close(out.std(0), torch.ones(3, 6, 6), atol=1e-3, rtol=0)


def test_minmax_maps_the_training_range_to_minus_one_one() -> None:
    x = images()
    out = fitted("minmax", x).apply(x)
    torch.testing.assert_close(out.amin((0, 2, 3)), -torch.ones(3))
    torch.testing.assert_close(out.amax((0, 2, 3)), torch.ones(3))


@pytest.mark.parametrize("name", ["pca_whiten", "zca_whiten"])
def test_whitening_gives_identity_covariance(name: str) -> None:
    x = images(n=2000, c=1, size=5)  # 25 features, 2000 samples
    out = fitted(name, x, eps=1e-8).apply(x).reshape(len(x), -1).double()
    covariance = torch.cov(out.T)
    torch.testing.assert_close(covariance, torch.eye(25, dtype=torch.float64), atol=2e-3, rtol=0)


def test_zca_stays_close_to_the_image_and_pca_is_rotated() -> None:
    x = images(n=2000, c=1, size=5)
    zca = fitted("zca_whiten", x).apply(x).reshape(len(x), -1)
    centred = (x.float() / 255).reshape(len(x), -1)
    centred = centred - centred.mean(0)
    # ZCA is the whitening closest to the input: strongly correlated with it pixel by pixel
    correlation = torch.corrcoef(torch.stack([zca[:, 12], centred[:, 12]]))[0, 1]
    assert correlation > 0.5


def test_reference_eps_damps_tiny_components() -> None:
    x = images(n=500, c=1, size=4)
    x[:, :, 0, 0] = 7  # a constant pixel: eigenvalue 0, divided by √(0 + eps), not by 0
    out = fitted("pca_whiten", x).apply(x)
    assert torch.isfinite(out).all()


def test_whitening_refuses_too_many_features() -> None:
    with pytest.raises(RecipeError, match="exceed preprocess.max_features"):
        fitted("zca_whiten", images(n=4, c=3, size=40))


@pytest.mark.parametrize("name", PREPROCESSORS.names())
def test_state_round_trip_applies_identically(name: str) -> None:
    x, other = images(n=64, c=1, size=4), images(n=8, c=1, size=4, seed=1)
    fit = fitted(name, x)
    fresh = create_preprocessor(PreprocessSpec(name=name))
    fresh.load_state_dict(fit.state_dict())
    torch.testing.assert_close(fresh.apply(other), fit.apply(other))
    assert torch.isfinite(fit.apply(torch.full((2, 1, 4, 4), 7, dtype=torch.uint8))).all()
