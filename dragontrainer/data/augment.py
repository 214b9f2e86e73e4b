"""Per-batch augmentation on the device, in pixel space ([0, 1], before preprocessing).

Each op samples its randomness from the loop's generator, then applies it:
``params = op.sample(n, generator)`` then ``op.apply(x, params)`` — pure and replayable, so an
augmented batch can be reproduced for tests, resume and the report. No per-sample Python.
Kornia does the image math (warps, colour conversions, adjustments); sampling stays here.
Mixers (mixup, cutmix) also turn the labels into soft targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import hsv_to_rgb, rgb_to_hsv
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from kornia.geometry.transform import get_affine_matrix2d, warp_affine

from dragontrainer.errors import RecipeError
from dragontrainer.recipe import AugmentSpec
from dragontrainer.registry import Registry

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainStats:
    """What some ops fit on the training pixels: mean colour (cutout) and RGB eigenpairs (fancy PCA)."""

    mean: torch.Tensor  # (C,)
    eigenvalues: torch.Tensor  # (C,)
    eigenvectors: torch.Tensor  # (C, C), columns

    @classmethod
    def fit(cls, x: torch.Tensor) -> TrainStats:
        """From uint8 NCHW training images: per-channel mean and the C×C pixel covariance's eigenpairs."""
        pixels = x.double().div(255.0).transpose(0, 1).reshape(x.shape[1], -1)
        covariance = torch.atleast_2d(torch.cov(pixels))
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        return cls(pixels.mean(1).float(), eigenvalues.clamp_min(0).float(), eigenvectors.float())


class Augmentation:
    """One batch op; `p` is the probability each image is changed. `apply` is deterministic."""

    p: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.p > 0

    def sample(self, n: int, generator: torch.Generator) -> Params:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), generator))


@dataclass
class Context:
    """What an op may know: image shape, whether mirroring is safe, the training images (uint8)."""

    image_shape: tuple[int, int, int]
    flip_safe: bool
    train_images: torch.Tensor

    @cached_property
    def stats(self) -> TrainStats:
        """Fitted on first use only: a pass over the whole training set that most recipes never need."""
        return TrainStats.fit(self.train_images)


AUGMENTATIONS: Registry[Callable[[Any, Context], Any]] = Registry("augmentation")


def uniform(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def chosen(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which images an op touches: each with probability p."""
    return uniform(n, generator) < p


def where(mask: torch.Tensor, changed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), changed, original)


def needs_rgb(name: str, context: Context) -> None:
    if context.image_shape[0] != 3:
        raise RecipeError(f"augment.{name} needs RGB images; the data has {context.image_shape[0]} channel(s)")


# ------------------------------------------------------------------------------ geometric


@AUGMENTATIONS.register("hflip")
class HorizontalFlip(Augmentation):
    """Mirror left-right with probability p (auto: 0.5, or off for digits and letters)."""

    def __init__(self, spec: Any, context: Context) -> None:
        self.p = (0.5 if context.flip_safe else 0.0) if spec.p == "auto" else float(spec.p)

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {"flip": chosen(n, self.p, generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return where(params["flip"], x.flip(3), x)


@AUGMENTATIONS.register("vflip")
class VerticalFlip(HorizontalFlip):
    """Mirror top-bottom with probability p (for aerial, medical or texture images)."""

    def __init__(self, spec: Any, context: Context) -> None:
        self.p = spec.p

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return where(params["flip"], x.flip(2), x)


@AUGMENTATIONS.register("crop")
class PaddedCrop(Augmentation):
    """Pad by `padding` pixels, then crop a random window of the original size (a random shift)."""

    def __init__(self, spec: Any, context: Context) -> None:
        size = min(context.image_shape[1:])
        self.p = spec.p
        self.padding = max(1, round(size / 8)) if spec.padding == "auto" else int(spec.padding)
        self.mode = "reflect" if spec.padding_mode == "reflect" and self.padding < size else "constant"

    @property
    def enabled(self) -> bool:
        return self.p > 0 and self.padding > 0

    def sample(self, n: int, generator: torch.Generator) -> Params:
        pad = self.padding
        shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)
        keep = ~chosen(n, self.p, generator)
        return {"dy": torch.where(keep, pad, shifts[0]), "dx": torch.where(keep, pad, shifts[1])}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        n, _, h, w = x.shape
        pad = self.padding
        padded = F.pad(x, (pad, pad, pad, pad), mode=self.mode)
        rows = params["dy"].view(n, 1) + torch.arange(h, device=x.device)  # (n, h)
        cols = params["dx"].view(n, 1) + torch.arange(w, device=x.device)  # (n, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1)
        # advanced indexing puts the indexed dims first: (n, h, w, c); the permuted view back to
        # (n, c, h, w) is channels-last in memory, which is what the network wants anyway
        crops = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]
        return crops.permute(0, 3, 1, 2)


class AffineWarp(Augmentation):
    """Rotation (degrees), translation (fraction of the size), scale and shear, one matrix per image,
    warped by Kornia with reflected borders. Unchosen images get the identity."""

    def __init__(self, context: Context, p: float, degrees: float = 0.0, translate: float = 0.0,
                 scale: tuple[float, float] = (1.0, 1.0), shear: float = 0.0) -> None:  # fmt: skip
        self.p, self.degrees, self.translate, self.scale, self.shear = p, degrees, translate, scale, shear
        _, self.h, self.w = context.image_shape

    def sample(self, n: int, generator: torch.Generator) -> Params:
        on = chosen(n, self.p, generator).float()
        log_low, log_high = math.log(self.scale[0]), math.log(self.scale[1])
        return {
            "angle": uniform(n, generator, -self.degrees, self.degrees) * on,
            "tx": uniform(n, generator, -self.translate, self.translate) * self.w * on,
            "ty": uniform(n, generator, -self.translate, self.translate) * self.h * on,
            "scale": torch.exp(uniform(n, generator, log_low, log_high) * on),
            "shear": uniform(n, generator, -self.shear, self.shear) * on,
        }

    def matrices(self, params: Params) -> torch.Tensor:
        n = len(params["angle"])
        device = params["angle"].device
        center = torch.tensor([(self.w - 1) / 2, (self.h - 1) / 2], device=device).expand(n, 2)
        translations = torch.stack([params["tx"], params["ty"]], 1)
        scale = params["scale"].view(n, 1).expand(n, 2)
        shear = torch.tan(torch.deg2rad(params["shear"]))
        return get_affine_matrix2d(translations, center, scale, params["angle"], sx=shear, sy=torch.zeros_like(shear))

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        matrix = self.matrices(params)[:, :2].to(x.dtype)
        return warp_affine(x.contiguous(), matrix, (self.h, self.w), padding_mode="reflection", align_corners=True)


@AUGMENTATIONS.register("rotate")
def rotate(spec: Any, context: Context) -> AffineWarp:
    """Rotation by an angle uniform in ±degrees."""
    return AffineWarp(context, spec.p, degrees=spec.degrees)


@AUGMENTATIONS.register("translate")
def translate(spec: Any, context: Context) -> AffineWarp:
    """Translation by up to ±fraction of the image size."""
    return AffineWarp(context, spec.p, translate=spec.fraction)


@AUGMENTATIONS.register("affine")
def affine(spec: Any, context: Context) -> AffineWarp:
    """Random affine: rotation, translation, scale (log-uniform) and shear together."""
    return AffineWarp(context, spec.p, spec.degrees, spec.translate, tuple(spec.scale), spec.shear_degrees)


@AUGMENTATIONS.register("resized_crop")
class ResizedCrop(Augmentation):
    """Random resized crop (Szegedy et al. 2015): a box of `scale` of the area and `ratio` aspect,
    resized to the full image — the 'scales' augmentation of the reference texts."""

    def __init__(self, spec: Any, context: Context) -> None:
        self.p, self.area, self.ratio = spec.p, tuple(spec.scale), tuple(spec.ratio)
        _, self.h, self.w = context.image_shape

    def sample(self, n: int, generator: torch.Generator) -> Params:
        on = chosen(n, self.p, generator)
        area = uniform(n, generator, *self.area)
        log_ratio = uniform(n, generator, math.log(self.ratio[0]), math.log(self.ratio[1]))
        box_w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
        box_h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        box_w, box_h = torch.where(on, box_w, 1.0), torch.where(on, box_h, 1.0)
        left = uniform(n, generator) * (1 - box_w)
        top = uniform(n, generator) * (1 - box_h)
        return {"left": left, "top": top, "width": box_w, "height": box_h}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        # affine_grid maps output [-1, 1] to the input box: scale by the box size, shift to its centre
        n = len(x)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = params["width"]
        theta[:, 1, 1] = params["height"]
        theta[:, 0, 2] = 2 * params["left"] + params["width"] - 1
        theta[:, 1, 2] = 2 * params["top"] + params["height"] - 1
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ---------------------------------------------------------------------------- photometric


@AUGMENTATIONS.register("color_jitter")
class ColorJitter(Augmentation):
    """Brightness (additive ±b), contrast (×[1±c]), saturation (×[1±s]) and hue (±h of the circle)."""

    def __init__(self, spec: Any, context: Context) -> None:
        self.p, self.spec = spec.p, spec
        self.rgb = context.image_shape[0] == 3
        if self.p > 0 and not self.rgb and (spec.saturation > 0 or spec.hue > 0):
            raise RecipeError("augment.color_jitter: saturation and hue need RGB images; set them to 0")

    def sample(self, n: int, generator: torch.Generator) -> Params:
        on = chosen(n, self.p, generator).float()
        s = self.spec
        return {
            "brightness": uniform(n, generator, -s.brightness, s.brightness) * on,
            "contrast": 1 + uniform(n, generator, -s.contrast, s.contrast) * on,
            "saturation": 1 + uniform(n, generator, -s.saturation, s.saturation) * on,
            "hue": uniform(n, generator, -s.hue, s.hue) * on * 2 * math.pi,
        }

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        x = adjust_contrast(adjust_brightness(x, params["brightness"]), params["contrast"])
        if self.rgb:
            x = adjust_hue(adjust_saturation(x, params["saturation"]), params["hue"]).clamp(0, 1)
        return x


@AUGMENTATIONS.register("hsv_jitter")
class HsvJitter(Augmentation):
    """The reference's HSV jitter: S, V → S^a·b + c (a ∈ [0.25, 4] log-uniform, b ∈ [0.7, 1.4],
    c ∈ [−0.1, 0.1], one draw per image for all its pixels) and H + d, d ∈ [−0.1, 0.1] of the circle."""

    def __init__(self, spec: Any, context: Context) -> None:
        self.p, self.spec = spec.p, spec
        if self.p > 0:
            needs_rgb("hsv_jitter", context)

    def sample(self, n: int, generator: torch.Generator) -> Params:
        s, on = self.spec, chosen(n, self.p, generator)
        log_low, log_high = math.log(s.power[0]), math.log(s.power[1])

        def pair(low: float, high: float, identity: float) -> torch.Tensor:  # independent for S and V
            values = torch.stack([uniform(n, generator, low, high), uniform(n, generator, low, high)], 1)
            return torch.where(on.view(n, 1), values, identity)

        return {
            "power": torch.exp(pair(log_low, log_high, 0.0)),
            "factor": pair(*s.factor, 1.0),
            "offset": pair(*s.offset, 0.0),
            "hue": torch.where(on, uniform(n, generator, *s.hue_offset), 0.0),
        }

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        hsv = rgb_to_hsv(x.contiguous())
        hue = torch.remainder(hsv[:, :1] + params["hue"].view(-1, 1, 1, 1) * 2 * math.pi, 2 * math.pi)
        sv = hsv[:, 1:].clamp(0, 1) ** params["power"].view(-1, 2, 1, 1)
        sv = (sv * params["factor"].view(-1, 2, 1, 1) + params["offset"].view(-1, 2, 1, 1)).clamp(0, 1)
        return hsv_to_rgb(torch.cat([hue, sv], 1))


@AUGMENTATIONS.register("fancy_pca")
class FancyPca(Augmentation):
    """AlexNet's fancy PCA (Krizhevsky et al. 2012): add [p1 p2 p3]·[α1λ1 α2λ2 α3λ3]ᵀ to every pixel,
    pᵢ, λᵢ the eigenpairs of the training set's RGB covariance, αᵢ ~ N(0, 0.1²) per image per use."""

    def __init__(self, spec: Any, context: Context) -> None:
        self.p, self.std = spec.p, spec.std
        self.context = context

    def sample(self, n: int, generator: torch.Generator) -> Params:
        channels = self.context.image_shape[0]
        on = chosen(n, self.p, generator).float().view(n, 1)
        alpha = torch.randn(n, channels, generator=generator, device=generator.device) * self.std * on
        return {"alpha": alpha}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        stats = self.context.stats
        vectors, values = stats.eigenvectors.to(x.device), stats.eigenvalues.to(x.device)
        shift = (params["alpha"] * values) @ vectors.T  # (n, C): Σ αᵢλᵢpᵢ
        return x + shift.view(len(x), -1, 1, 1)


@AUGMENTATIONS.register("noise")
class GaussianNoise(Augmentation):
    """Additive Gaussian noise N(0, std²) on every pixel of the chosen images (input noise)."""

    def __init__(self, spec: Any, context: Context) -> None:
        self.p, self.std = spec.p, spec.std

    @property
    def enabled(self) -> bool:
        return self.p > 0 and self.std > 0

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {"on": chosen(n, self.p, generator), "seed": torch.randint(0, 2**62, (1,), generator=generator)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        noise_generator = torch.Generator(x.device).manual_seed(int(params["seed"]))
        noise = torch.randn(x.shape, generator=noise_generator, device=x.device, dtype=x.dtype) * self.std
        return x + noise * params["on"].view(-1, 1, 1, 1)


# -------------------------------------------------------------------------------- erasing


def box_masks(top: torch.Tensor, left: torch.Tensor, height: torch.Tensor, width: torch.Tensor,
              h: int, w: int) -> torch.Tensor:  # fmt: skip
    """(n, 1, h, w) boolean masks of axis-aligned boxes given in pixels."""
    rows = torch.arange(h, device=top.device).view(1, h, 1)
    cols = torch.arange(w, device=top.device).view(1, 1, w)
    inside_rows = (rows >= top.view(-1, 1, 1)) & (rows < (top + height).view(-1, 1, 1))
    inside_cols = (cols >= left.view(-1, 1, 1)) & (cols < (left + width).view(-1, 1, 1))
    return (inside_rows & inside_cols).unsqueeze(1)


@AUGMENTATIONS.register("cutout")
class Cutout(Augmentation):
    """Cutout (DeVries & Taylor 2017): a size×size square at a random centre (it may overhang the
    border) filled with the training mean colour, i.e. zero after standardisation."""

    def __init__(self, spec: Any, context: Context) -> None:
        _, self.h, self.w = context.image_shape
        self.p = spec.p
        self.size = max(1, min(self.h, self.w) // 2) if spec.size == "auto" else int(spec.size)
        self.context = context

    def sample(self, n: int, generator: torch.Generator) -> Params:
        device = generator.device
        cy = torch.randint(0, self.h, (n,), generator=generator, device=device)
        cx = torch.randint(0, self.w, (n,), generator=generator, device=device)
        return {"on": chosen(n, self.p, generator), "top": cy - self.size // 2, "left": cx - self.size // 2}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        size = torch.full_like(params["top"], self.size)
        mask = box_masks(params["top"], params["left"], size, size, self.h, self.w) & params["on"].view(-1, 1, 1, 1)
        fill = self.context.stats.mean.to(x.device, x.dtype).view(1, -1, 1, 1)
        return torch.where(mask, fill, x)


@AUGMENTATIONS.register("erasing")
class RandomErasing(Augmentation):
    """Random erasing (Zhong et al. 2020): a box of random area and aspect inside the image, filled
    with uniform noise."""

    def __init__(self, spec: Any, context: Context) -> None:
        _, self.h, self.w = context.image_shape
        self.p, self.area, self.ratio = spec.p, tuple(spec.area), tuple(spec.ratio)

    def sample(self, n: int, generator: torch.Generator) -> Params:
        area = uniform(n, generator, *self.area) * self.h * self.w
        ratio = torch.exp(uniform(n, generator, math.log(self.ratio[0]), math.log(self.ratio[1])))
        height = torch.sqrt(area * ratio).round().clamp(1, self.h).long()
        width = torch.sqrt(area / ratio).round().clamp(1, self.w).long()
        top = (uniform(n, generator) * (self.h - height + 1)).long()
        left = (uniform(n, generator) * (self.w - width + 1)).long()
        seed = torch.randint(0, 2**62, (1,), generator=generator)
        return {"on": chosen(n, self.p, generator), "top": top, "left": left, "height": height, "width": width,
                "seed": seed}  # fmt: skip

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        mask = box_masks(params["top"], params["left"], params["height"], params["width"], self.h, self.w)
        mask = mask & params["on"].view(-1, 1, 1, 1)
        noise = torch.rand(x.shape, generator=torch.Generator(x.device).manual_seed(int(params["seed"])),
                           device=x.device, dtype=x.dtype)  # fmt: skip
        return torch.where(mask, noise, x)


# --------------------------------------------------------------------------------- mixers


class Mixer:
    """Mixes each image with another of the batch; returns images and soft targets (rows sum to 1)."""

    def __init__(self, spec: Any, context: Context) -> None:
        self.p, self.alpha = spec.p, spec.alpha
        _, self.h, self.w = context.image_shape

    @property
    def enabled(self) -> bool:
        return self.p > 0

    def __call__(
        self, x: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if float(uniform(1, generator)) >= self.p:  # one draw per batch (a host sync, once per step)
            return x, targets
        permutation = torch.randperm(len(x), generator=generator, device=generator.device)
        # λ ~ Beta(α, α) from NumPy's global generator, whose state every checkpoint saves
        lam = float(np.random.beta(self.alpha, self.alpha))
        return self.mix(x, targets, permutation, lam, generator)

    def mix(self, x: torch.Tensor, targets: torch.Tensor, permutation: torch.Tensor, lam: float,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        raise NotImplementedError


@AUGMENTATIONS.register("mixup")
class Mixup(Mixer):
    """mixup (Zhang et al. 2018): x = λx + (1−λ)x', y = λy + (1−λ)y', λ ~ Beta(α, α) per batch."""

    def mix(self, x: torch.Tensor, targets: torch.Tensor, permutation: torch.Tensor, lam: float,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return lam * x + (1 - lam) * x[permutation], lam * targets + (1 - lam) * targets[permutation]


@AUGMENTATIONS.register("cutmix")
class CutMix(Mixer):
    """CutMix (Yun et al. 2019): paste a box of area 1−λ from another image; targets mixed by the
    box's actual area."""

    def mix(self, x: torch.Tensor, targets: torch.Tensor, permutation: torch.Tensor, lam: float,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        cut = math.sqrt(1 - lam)
        box_h, box_w = round(self.h * cut), round(self.w * cut)
        centre = uniform(2, generator) * torch.tensor([self.h, self.w], device=generator.device)
        cy, cx = (int(v) for v in centre)
        top, bottom = max(cy - box_h // 2, 0), min(cy + box_h - box_h // 2, self.h)
        left, right = max(cx - box_w // 2, 0), min(cx + box_w - box_w // 2, self.w)
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = x[permutation, :, top:bottom, left:right]
        kept = 1 - (bottom - top) * (right - left) / (self.h * self.w)
        return mixed, kept * targets + (1 - kept) * targets[permutation]


# -------------------------------------------------------------------------------- pipeline


class Augmenter:
    """The recipe's enabled ops in schema order, then the mixers; an identity when none is enabled."""

    def __init__(self, ops: list[Augmentation], mixers: list[Mixer], num_classes: int) -> None:
        self.ops, self.mixers, self.num_classes = ops, mixers, num_classes

    @property
    def soft_targets(self) -> bool:
        return bool(self.mixers)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented images, and targets: the labels, or soft targets (N, C) when a mixer is on."""
        for op in self.ops:
            x = op(x, generator)
        if not self.mixers:
            return x, y
        targets = F.one_hot(y, self.num_classes).to(x.dtype)
        for mixer in self.mixers:
            x, targets = mixer(x, targets, generator)
        return x, targets

    def describe(self) -> str:
        names = [f"{type(op).__name__}(p={op.p:g})" for op in (*self.ops, *self.mixers)]
        return ", ".join(names) or "none"


def create_augmenter(
    spec: AugmentSpec,
    image_shape: tuple[int, int, int],
    flip_safe: bool,
    train_images: torch.Tensor,
    num_classes: int,
) -> Augmenter:
    """Build every op whose section is enabled, in the order the recipe schema lists them."""
    context = Context(image_shape, flip_safe, train_images)
    ops: list[Augmentation] = []
    mixers: list[Mixer] = []
    for name in (n for n in type(spec).model_fields if n in AUGMENTATIONS):
        op = AUGMENTATIONS.get(name)(getattr(spec, name), context)
        if op.enabled:
            (mixers if isinstance(op, Mixer) else ops).append(op)
    return Augmenter(ops, mixers, num_classes)


def flip_averaged_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: log of the mean softmax of each image and its mirror image."""
    probabilities = (model(x).float().softmax(1) + model(x.flip(3)).float().softmax(1)) / 2
    return probabilities.clamp_min(1e-12).log()
