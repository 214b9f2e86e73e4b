from __future__ import annotations

import math

import pytest
import torch

from dragontrainer.data.augment import (
    AUGMENTATIONS,
    Context,
    CutMix,
    FancyPca,
    HorizontalFlip,
    HsvJitter,
    Mixup,
    PaddedCrop,
    TrainStats,
    create_augmenter,
)
from dragontrainer.errors import RecipeError
from dragontrainer.recipe import AugmentSpec, CropSpec, FancyPcaSpec, FlipSpec, HsvJitterSpec, MixSpec


def pixels(n: int = 64, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def context(c: int = 3, size: int = 8, flip_safe: bool = True) -> Context:
    x = (pixels(256, c, size, seed=9) * 255).to(torch.uint8)
    return Context((c, size, size), flip_safe, x)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_mirrors_exactly_the_sampled_images() -> None:
    flip = HorizontalFlip(FlipSpec(p=0.5), context())
    x = pixels()
    params = flip.sample(len(x), gen())
    out, mask = flip.apply(x, params), params["flip"]
    assert 10 < int(mask.sum()) < 54
    torch.testing.assert_close(out[mask], x[mask].flip(3))
    torch.testing.assert_close(out[~mask], x[~mask])


def test_flip_auto_is_off_for_data_whose_meaning_flips() -> None:
    assert HorizontalFlip(FlipSpec(), context(c=1, flip_safe=False)).p == 0
    assert HorizontalFlip(FlipSpec(), context()).p == 0.5


def test_crop_is_a_shift_of_the_padded_image() -> None:
    crop = PaddedCrop(CropSpec(padding=2, padding_mode="zeros"), context())
    x = pixels(n=32)
    params = crop.sample(len(x), gen(1))
    out = crop.apply(x, params)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        dy, dx = int(params["dy"][i]), int(params["dx"][i])
        torch.testing.assert_close(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
    assert PaddedCrop(CropSpec(), Context((3, 32, 32), True, context().train_images)).padding == 4


# every op, enabled with p=1 (and p=0.5 for the rate), on RGB 8×8 images
ENABLED = {
    "hflip": {"p": 1.0}, "vflip": {"p": 1.0}, "crop": {"p": 1.0, "padding": 3}, "resized_crop": {"p": 1.0},
    "rotate": {"p": 1.0, "degrees": 30}, "translate": {"p": 1.0}, "affine": {"p": 1.0},
    "color_jitter": {"p": 1.0}, "hsv_jitter": {"p": 1.0}, "fancy_pca": {"p": 1.0}, "noise": {"p": 1.0},
    "cutout": {"p": 1.0}, "erasing": {"p": 1.0},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ENABLED))
def test_each_op_keeps_shape_dtype_and_applies_at_its_rate(name: str) -> None:
    spec = AugmentSpec.model_validate({"hflip": {"p": 0}, "crop": {"p": 0}, name: ENABLED[name]})
    x = pixels(n=400)
    y = torch.arange(400) % 10
    always = create_augmenter(spec, (3, 8, 8), True, context().train_images, 10)
    assert len(always.ops) == 1
    out, targets = always(x, y, gen())
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert torch.equal(targets, y)  # labels preserved
    changed = (out - x).abs().flatten(1).amax(1) > 1e-4
    assert changed.float().mean() > 0.9, name
    half = AugmentSpec.model_validate({"hflip": {"p": 0}, "crop": {"p": 0}, name: {**ENABLED[name], "p": 0.5}})
    out, _ = create_augmenter(half, (3, 8, 8), True, context().train_images, 10)(x, y, gen(3))
    rate = ((out - x).abs().flatten(1).amax(1) > 1e-4).float().mean().item()
    assert rate == pytest.approx(0.5, abs=0.08), (name, rate)


@pytest.mark.parametrize("name", sorted(ENABLED))
def test_each_op_replays_from_its_params(name: str) -> None:
    spec = getattr(AugmentSpec.model_validate({name: ENABLED[name]}), name)
    op = AUGMENTATIONS.get(name)(spec, context())
    x = pixels()
    params = op.sample(len(x), gen(4))
    torch.testing.assert_close(op.apply(x, params), op.apply(x, params))


def test_fancy_pca_perturbation_lies_in_the_eigenvector_span_with_the_configured_scale() -> None:
    ctx = context()
    op = FancyPca(FancyPcaSpec(p=1.0, std=0.1), ctx)
    x = pixels(n=4000)
    params = op.sample(len(x), gen(5))
    shift = (op.apply(x, params) - x)[:, :, 0, 0]  # the same shift at every pixel of an image
    torch.testing.assert_close((op.apply(x, params) - x)[:, :, 3, 5], shift)
    coordinates = shift @ ctx.stats.eigenvectors  # in the eigenbasis: αᵢλᵢ
    scale = coordinates.std(0) / ctx.stats.eigenvalues
    torch.testing.assert_close(scale, torch.full((3,), 0.1), atol=0.006, rtol=0)
    torch.testing.assert_close(coordinates @ ctx.stats.eigenvectors.T, shift, atol=1e-5, rtol=0)


def test_hsv_jitter_draws_within_the_reference_ranges() -> None:
    op = HsvJitter(HsvJitterSpec(p=1.0), context())
    params = op.sample(5000, gen(6))
    assert params["power"].min() >= 0.25 and params["power"].max() <= 4.0
    assert params["power"].log().mean().abs() < 0.05  # log-uniform: median 1
    assert params["factor"].min() >= 0.7 and params["factor"].max() <= 1.4
    assert params["offset"].abs().max() <= 0.1 and params["hue"].abs().max() <= 0.1
    out = op.apply(pixels(), op.sample(64, gen(7)))
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


def test_color_ops_refuse_gray_images() -> None:
    with pytest.raises(RecipeError, match="hsv_jitter needs RGB images"):
        HsvJitter(HsvJitterSpec(p=1.0), context(c=1))


@pytest.mark.parametrize("mixer", [Mixup, CutMix])
def test_mixers_give_soft_targets_that_sum_to_one(mixer: type) -> None:
    op = mixer(MixSpec(p=1.0, alpha=1.0), context())
    x, y = pixels(), torch.arange(64) % 10
    onehot = torch.nn.functional.one_hot(y, 10).float()
    out, soft = op(x, onehot, gen(8))
    assert out.shape == x.shape and soft.shape == (64, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(64))
    assert (soft.max(1).values < 1).any()


def test_augmenter_replays_and_turns_labels_soft_only_with_mixers() -> None:
    aug = create_augmenter(AugmentSpec(), (3, 8, 8), True, context().train_images, 10)
    assert [type(op).__name__ for op in aug.ops] == ["HorizontalFlip", "PaddedCrop"] and not aug.soft_targets
    x, y = pixels(), torch.arange(64) % 10
    torch.testing.assert_close(aug(x, y, gen(5))[0], aug(x, y, gen(5))[0])
    mixing = create_augmenter(AugmentSpec(mixup=MixSpec(p=1.0)), (3, 8, 8), True, context().train_images, 10)
    assert mixing(x, y, gen(5))[1].shape == (64, 10)


def test_cutout_fills_with_the_training_mean() -> None:
    ctx = context()
    spec = AugmentSpec.model_validate({"hflip": {"p": 0}, "crop": {"p": 0}, "cutout": {"p": 1.0, "size": 4}})
    out, _ = create_augmenter(spec, (3, 8, 8), True, ctx.train_images, 10)(
        pixels(), torch.zeros(64, dtype=torch.long), gen()
    )
    filled = (out == ctx.stats.mean.view(1, 3, 1, 1)).all(1)
    area = filled.flatten(1).sum(1)
    assert area.max() == 16 and area.min() >= 4  # a 4×4 square, clipped at the border
    assert math.isclose(float(ctx.stats.mean.mean()), 0.5, abs_tol=0.02)


def test_training_statistics_are_fitted_only_when_an_op_needs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    fits = []
    real_fit = TrainStats.fit.__func__
    monkeypatch.setattr(TrainStats, "fit", classmethod(lambda cls, x: fits.append(1) or real_fit(cls, x)))
    x, y = pixels(), torch.zeros(64, dtype=torch.long)
    create_augmenter(AugmentSpec(), (3, 8, 8), True, context().train_images, 10)(x, y, gen())
    assert fits == []  # flips and crops never need them
    pca = create_augmenter(
        AugmentSpec.model_validate({"fancy_pca": {"p": 1.0}}), (3, 8, 8), True, context().train_images, 10
    )
    assert fits == []  # still lazy after construction
    pca(x, y, gen())
    pca(x, y, gen())
    assert fits == [1]  # fitted on first use, then cached
