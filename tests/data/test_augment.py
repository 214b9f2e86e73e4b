from __future__ import annotations

import torch

from dragontrainer.data.augment import HorizontalFlip, PaddedCrop, create_augmenter
from dragontrainer.recipe import AugmentSpec, CropSpec, FlipSpec


def batch(n: int = 64, c: int = 3, size: int = 8) -> torch.Tensor:
    return torch.arange(n * c * size * size, dtype=torch.float32).reshape(n, c, size, size)


def test_flip_mirrors_exactly_the_sampled_images() -> None:
    flip = HorizontalFlip(FlipSpec(p=0.5), (3, 8, 8), flip_safe=True)
    x = batch()
    params = flip.sample(len(x), torch.Generator().manual_seed(0))
    out = flip.apply(x, params)
    mask = params["flip"]
    assert 10 < int(mask.sum()) < 54
    torch.testing.assert_close(out[mask], x[mask].flip(3))
    torch.testing.assert_close(out[~mask], x[~mask])


def test_flip_auto_is_off_for_data_whose_meaning_flips() -> None:
    assert HorizontalFlip(FlipSpec(), (1, 8, 8), flip_safe=False).p == 0
    assert HorizontalFlip(FlipSpec(), (3, 32, 32), flip_safe=True).p == 0.5


def test_crop_is_a_shift_of_the_padded_image() -> None:
    crop = PaddedCrop(CropSpec(padding=2, padding_mode="zeros"), (3, 8, 8), flip_safe=True)
    x = batch(n=32)
    params = crop.sample(len(x), torch.Generator().manual_seed(1))
    out = crop.apply(x, params)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        dy, dx = int(params["dy"][i]), int(params["dx"][i])
        torch.testing.assert_close(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
    assert len({(int(a), int(b)) for a, b in zip(params["dy"], params["dx"], strict=True)}) > 5


def test_crop_with_p_zero_is_identity_and_auto_padding_scales() -> None:
    crop = PaddedCrop(CropSpec(p=0.0, padding=3), (1, 8, 8), flip_safe=True)
    x = batch(c=1)
    torch.testing.assert_close(crop(x, torch.Generator().manual_seed(0)), x)
    assert PaddedCrop(CropSpec(), (3, 32, 32), True).padding == 4
    assert PaddedCrop(CropSpec(), (1, 8, 8), True).padding == 1


def test_augmenter_preserves_shape_and_replays_with_the_same_generator_state() -> None:
    aug = create_augmenter(AugmentSpec(), (3, 8, 8), flip_safe=True)
    assert [type(op).__name__ for op in aug.ops] == ["HorizontalFlip", "PaddedCrop"]
    x = batch()
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape
    assert create_augmenter(AugmentSpec(hflip=FlipSpec(p=0), crop=CropSpec(p=0)), (3, 8, 8), True).ops == []
