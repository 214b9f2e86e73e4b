"""Activations by name. Each factory gets the model section and the channel count (PReLU learns one
slope per channel) and returns a fresh module."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dragontrainer.recipe import ModelSpec
from dragontrainer.registry import Registry

ACTIVATIONS: Registry[Callable[[ModelSpec, int], nn.Module]] = Registry("activation")


@ACTIVATIONS.register("relu")
def relu(spec: ModelSpec, channels: int) -> nn.Module:
    """max(0, x): the default; cheap, no saturation for x > 0, but units can die."""
    return nn.ReLU(inplace=True)


@ACTIVATIONS.register("leaky_relu")
def leaky_relu(spec: ModelSpec, channels: int) -> nn.Module:
    """x for x > 0, model.leaky_slope·x otherwise (the reference table's a=100, 5.5 mean 1/100, 1/5.5)."""
    return nn.LeakyReLU(spec.leaky_slope, inplace=True)


@ACTIVATIONS.register("prelu")
def prelu(spec: ModelSpec, channels: int) -> nn.Module:
    """Parametric ReLU (He et al. 2015): one learned negative slope per channel, starting at 0.25."""
    return nn.PReLU(num_parameters=channels, init=0.25)


class ReferenceRReLU(nn.Module):
    """Randomized leaky ReLU as the reference texts define it (Xu et al. 2015):
    y = x for x ≥ 0, else x/a with a ~ U(lower, upper) drawn per element in training;
    at test time the fixed slope 2/(lower + upper) (2/11 for the default 3 and 8).

    torch.nn.RReLU parameterises the slope itself as U(lower, upper), hence this module.
    """

    def __init__(self, lower: float = 3.0, upper: float = 8.0) -> None:
        super().__init__()
        self.lower, self.upper = lower, upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            a = torch.empty_like(x).uniform_(self.lower, self.upper)
            return torch.where(x >= 0, x, x / a)
        return torch.where(x >= 0, x, x * (2.0 / (self.lower + self.upper)))

    def extra_repr(self) -> str:
        return f"a ~ U({self.lower:g}, {self.upper:g}), test slope {2 / (self.lower + self.upper):.4f}"


@ACTIVATIONS.register("rrelu")
def rrelu(spec: ModelSpec, channels: int) -> nn.Module:
    """Randomized leaky ReLU of the reference: slope 1/a, a ~ U(3, 8) in training, 2/11 at test."""
    return ReferenceRReLU(spec.rrelu_lower, spec.rrelu_upper)


@ACTIVATIONS.register("elu")
def elu(spec: ModelSpec, channels: int) -> nn.Module:
    """Exponential linear unit: smooth, negative outputs push mean activations toward zero."""
    return nn.ELU(inplace=True)


@ACTIVATIONS.register("gelu")
def gelu(spec: ModelSpec, channels: int) -> nn.Module:
    """Gaussian error linear unit, x·Φ(x)."""
    return nn.GELU()


@ACTIVATIONS.register("silu")
def silu(spec: ModelSpec, channels: int) -> nn.Module:
    """x·sigmoid(x) (swish)."""
    return nn.SiLU(inplace=True)


@ACTIVATIONS.register("tanh")
def tanh(spec: ModelSpec, channels: int) -> nn.Module:
    """Hyperbolic tangent: zero-centred but saturates, so gradients vanish in deep nets."""
    return nn.Tanh()


@ACTIVATIONS.register("sigmoid")
def sigmoid(spec: ModelSpec, channels: int) -> nn.Module:
    """Logistic sigmoid: saturates and is not zero-centred (the reference texts advise against it)."""
    return nn.Sigmoid()


def create_activation(spec: ModelSpec, channels: int) -> nn.Module:
    return ACTIVATIONS.get(spec.activation)(spec, channels)


def negative_slope(spec: ModelSpec) -> float | None:
    """The slope on the negative side for the ReLU family (for init gains), None for the others."""
    slopes = {
        "relu": 0.0,
        "leaky_relu": spec.leaky_slope,
        "prelu": 0.25,
        "rrelu": 2.0 / (spec.rrelu_lower + spec.rrelu_upper),
        "elu": 0.0,
        "gelu": 0.0,
        "silu": 0.0,
    }
    return slopes.get(spec.activation)
