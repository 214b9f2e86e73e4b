"""Normalisation layers by name, for conv feature maps (dims=2) or flat features (dims=1)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dragontrainer.registry import Registry

NORMS: Registry[Callable[[int, int], nn.Module]] = Registry("norm")


@NORMS.register("batch")
def batch_norm(channels: int, dims: int) -> nn.Module:
    """Batch normalisation (Ioffe & Szegedy 2015): per-channel statistics over the batch."""
    return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)


@NORMS.register("group")
def group_norm(channels: int, dims: int) -> nn.Module:
    """Group normalisation (Wu & He 2018), 32 groups or fewer; independent of batch size."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


@NORMS.register("layer")
def layer_norm(channels: int, dims: int) -> nn.Module:
    """Layer normalisation: statistics over all channels (and positions) of one sample."""
    return nn.GroupNorm(1, channels) if dims == 2 else nn.LayerNorm(channels)


@NORMS.register("instance")
def instance_norm(channels: int, dims: int) -> nn.Module:
    """Instance normalisation: per-sample, per-channel statistics (flat features: layer norm)."""
    return nn.InstanceNorm2d(channels, affine=True) if dims == 2 else nn.LayerNorm(channels)


@NORMS.register("weight")
def weight_norm(channels: int, dims: int) -> nn.Module:
    """Weight normalisation (Salimans & Kingma 2016): w = g·v/‖v‖ on every conv/linear, no norm layer."""
    return nn.Identity()  # the reparameterisation is applied to the layers by `apply_weight_norm`


@NORMS.register("none")
def no_norm(channels: int, dims: int) -> nn.Module:
    """No normalisation."""
    return nn.Identity()


def create_norm(name: str, channels: int, dims: int = 2) -> nn.Module:
    return NORMS.get(name)(channels, dims)


def apply_weight_norm(model: nn.Module) -> None:
    """Reparameterise every conv and linear weight as g·v/‖v‖ (one g per output unit)."""
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.utils.parametrizations.weight_norm(module)
