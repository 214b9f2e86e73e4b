"""Weight initialisation by name, applied to every conv and linear layer; biases start at zero."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dragontrainer.nn.activations import gain_name
from dragontrainer.registry import Registry

InitFn = Callable[[nn.Module, str], None]
INITS: Registry[InitFn] = Registry("init")

WEIGHTED = (nn.Conv2d, nn.Linear)


def activation_gain(activation: str) -> float:
    nonlinearity = gain_name(activation)
    return nn.init.calculate_gain(nonlinearity, 0.01 if nonlinearity == "leaky_relu" else None)


@INITS.register("he")
def he(layer: nn.Module, activation: str) -> None:
    """He/Kaiming normal, fan_in, with the gain of the layer's activation (He et al. 2015)."""
    nonlinearity = gain_name(activation)
    slope = 0.01 if nonlinearity == "leaky_relu" else 0.0
    nn.init.kaiming_normal_(layer.weight, a=slope, mode="fan_in", nonlinearity=nonlinearity)


@INITS.register("xavier")
def xavier(layer: nn.Module, activation: str) -> None:
    """Xavier/Glorot uniform with the activation's gain (Glorot & Bengio 2010)."""
    nn.init.xavier_uniform_(layer.weight, gain=activation_gain(activation))


@INITS.register("orthogonal")
def orthogonal(layer: nn.Module, activation: str) -> None:
    """Orthogonal matrix scaled by the activation's gain (Saxe et al. 2014)."""
    nn.init.orthogonal_(layer.weight, gain=activation_gain(activation))


@INITS.register("torch")
def torch_default(layer: nn.Module, activation: str) -> None:
    """PyTorch's own default (kaiming uniform with a=√5) — kept for comparison."""
    layer.reset_parameters()


def init_model(model: nn.Module, scheme: str, activation: str) -> None:
    """Initialise every conv/linear weight with `scheme` and zero every bias; norms keep 1 and 0.

    The head is initialised like any other layer, except with the linear gain (no activation follows).
    """
    init = INITS.get(scheme)
    head = getattr(model, "head", None)
    head_layers = set(head.modules()) if isinstance(head, nn.Module) else set()
    for layer in model.modules():
        if isinstance(layer, WEIGHTED):
            init(layer, "linear" if layer in head_layers else activation)
            if layer.bias is not None and scheme != "torch":
                nn.init.zeros_(layer.bias)
