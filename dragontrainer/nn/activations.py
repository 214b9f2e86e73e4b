"""Activations by name. Each factory returns a fresh module (some hold parameters or state)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dragontrainer.registry import Registry

ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")


@ACTIVATIONS.register("relu")
def relu() -> nn.Module:
    """max(0, x): the default; cheap, no saturation for x > 0, but units can die."""
    return nn.ReLU(inplace=True)


@ACTIVATIONS.register("leaky_relu")
def leaky_relu() -> nn.Module:
    """x for x > 0, 0.01·x otherwise: ReLU that cannot die."""
    return nn.LeakyReLU(0.01, inplace=True)


@ACTIVATIONS.register("elu")
def elu() -> nn.Module:
    """Exponential linear unit: smooth, negative outputs push mean activations toward zero."""
    return nn.ELU(inplace=True)


@ACTIVATIONS.register("gelu")
def gelu() -> nn.Module:
    """Gaussian error linear unit, x·Φ(x)."""
    return nn.GELU()


@ACTIVATIONS.register("silu")
def silu() -> nn.Module:
    """x·sigmoid(x) (swish)."""
    return nn.SiLU(inplace=True)


@ACTIVATIONS.register("tanh")
def tanh() -> nn.Module:
    """Hyperbolic tangent: zero-centred but saturates, so gradients vanish in deep nets."""
    return nn.Tanh()


@ACTIVATIONS.register("sigmoid")
def sigmoid() -> nn.Module:
    """Logistic sigmoid: saturates and is not zero-centred (the reference texts advise against it)."""
    return nn.Sigmoid()


def create_activation(name: str) -> nn.Module:
    return ACTIVATIONS.get(name)()


def gain_name(name: str) -> str:
    """The nonlinearity name torch.nn.init.calculate_gain knows for this activation."""
    known = {"relu", "leaky_relu", "tanh", "sigmoid", "linear"}
    return name if name in known else "relu"  # smooth ReLU-likes (elu, gelu, silu) use the ReLU gain
