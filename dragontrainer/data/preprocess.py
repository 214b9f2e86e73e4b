"""Preprocessing fitted on the training split only, saved with the run, applied identically later."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dragontrainer.recipe import PreprocessSpec
from dragontrainer.registry import Registry


class Preprocessor:
    """Maps uint8 NCHW images to float32 network inputs; `state_dict` is what the run saves."""

    def fit(self, x: torch.Tensor) -> Preprocessor:
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None


PREPROCESSORS: Registry[Callable[[], Preprocessor]] = Registry("preprocess")


@PREPROCESSORS.register("none")
class Unit(Preprocessor):
    """Pixels scaled to [0, 1]; nothing fitted."""


@PREPROCESSORS.register("standardize")
class Standardize(Preprocessor):
    """Per-channel zero mean and unit std (statistics of the training split, pixels in [0, 1])."""

    def __init__(self) -> None:
        self.mean = torch.zeros(1)
        self.std = torch.ones(1)

    def fit(self, x: torch.Tensor) -> Standardize:
        # float64 sums: a float32 running sum over millions of pixels loses digits
        pixels = x.double().div(255.0).transpose(0, 1).reshape(x.shape[1], -1)
        self.mean = pixels.mean(1).float()
        self.std = pixels.std(1).float().clamp_min(1e-6)  # a constant channel must not divide by 0
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        return (x.float().div(255.0) - mean) / std

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean, self.std = state["mean"], state["std"]


def create_preprocessor(spec: PreprocessSpec) -> Preprocessor:
    return PREPROCESSORS.get(spec.name)()
