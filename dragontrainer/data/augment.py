"""Per-batch augmentation on the device: each op samples its randomness, then applies it.

``params = op.sample(n, generator)`` then ``op.apply(x, params)``: pure and replayable, so the same
augmented batch can be reproduced for tests, resume and the report. No per-sample Python.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dragontrainer.recipe import AugmentSpec, CropSpec, FlipSpec
from dragontrainer.registry import Registry

Params = dict[str, torch.Tensor]


class Augmentation:
    """One batch op. `sample` draws every random number the op needs; `apply` is deterministic."""

    def sample(self, n: int, generator: torch.Generator) -> Params:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(len(x), generator))


AUGMENTATIONS: Registry[Callable[..., Augmentation]] = Registry("augmentation")


def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device)


@AUGMENTATIONS.register("hflip")
class HorizontalFlip(Augmentation):
    """Mirror left-right with probability p (auto: 0.5, or off for digits and letters)."""

    def __init__(self, spec: FlipSpec, image_shape: tuple[int, int, int], flip_safe: bool) -> None:
        self.p = (0.5 if flip_safe else 0.0) if spec.p == "auto" else float(spec.p)

    @property
    def enabled(self) -> bool:
        return self.p > 0

    def sample(self, n: int, generator: torch.Generator) -> Params:
        return {"flip": _uniform(n, generator) < self.p}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(3), x)


@AUGMENTATIONS.register("crop")
class PaddedCrop(Augmentation):
    """Pad by `padding` pixels, then crop a random window of the original size (a random shift)."""

    def __init__(self, spec: CropSpec, image_shape: tuple[int, int, int], flip_safe: bool) -> None:
        size = min(image_shape[1:])
        self.p = spec.p
        self.padding = max(1, round(size / 8)) if spec.padding == "auto" else int(spec.padding)
        self.mode = "reflect" if spec.padding_mode == "reflect" and self.padding < size else "constant"

    @property
    def enabled(self) -> bool:
        return self.p > 0 and self.padding > 0

    def sample(self, n: int, generator: torch.Generator) -> Params:
        pad = self.padding
        shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)
        keep = _uniform(n, generator) >= self.p
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


class Augmenter:
    """The recipe's enabled ops in schema order; an identity when none is enabled."""

    def __init__(self, ops: list[Any]) -> None:
        self.ops = ops

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for op in self.ops:
            x = op(x, generator)
        return x

    def describe(self) -> str:
        return ", ".join(f"{type(op).__name__}(p={op.p:g})" for op in self.ops) or "none"


def create_augmenter(spec: AugmentSpec, image_shape: tuple[int, int, int], flip_safe: bool) -> Augmenter:
    """Build every op whose section is enabled, in the order the recipe schema lists them."""
    ops = []
    for name in type(spec).model_fields:
        op = AUGMENTATIONS.get(name)(getattr(spec, name), image_shape, flip_safe)
        if op.enabled:
            ops.append(op)
    return Augmenter(ops)
