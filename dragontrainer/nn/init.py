"""Weight initialisation by name, applied to every conv and linear layer; biases start at zero.

The reference texts' comparison (zeros vs completely random vs uniform(-1, 1) vs Xavier vs He) is
reproducible with these names; `auto` picks for each layer the scheme that matches its activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dragontrainer.nn.activations import negative_slope
from dragontrainer.recipe import ModelSpec
from dragontrainer.registry import Registry

WEIGHTED = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerInit:
    """What an initialiser may know about a layer: its activation's gain and the recipe's init knobs."""

    spec: ModelSpec
    activation: str  # "linear" for the head
    slope: float | None  # negative slope of a ReLU-family activation, None otherwise

    @property
    def gain(self) -> float:
        if self.slope is not None:
            return math.sqrt(2.0 / (1.0 + self.slope**2))
        if self.activation in ("tanh", "sigmoid"):
            return nn.init.calculate_gain(self.activation)
        return 1.0


InitFn = Callable[[torch.Tensor, LayerInit], None]
INITS: Registry[InitFn] = Registry("init")


def fan_in(weight: torch.Tensor) -> int:
    return weight[0].numel()


@INITS.register("zeros")
def zeros(weight: torch.Tensor, layer: LayerInit) -> None:
    """All weights 0: every unit computes the same thing (the symmetry problem) — for demonstration."""
    nn.init.zeros_(weight)


@INITS.register("constant")
def constant(weight: torch.Tensor, layer: LayerInit) -> None:
    """All weights model.init_value: symmetric like zeros — for demonstration."""
    nn.init.constant_(weight, layer.spec.init_value)


@INITS.register("normal")
def normal(weight: torch.Tensor, layer: LayerInit) -> None:
    """N(0, model.init_std²): the reference's 'small random numbers' (0.01, 0.03 ...)."""
    nn.init.normal_(weight, 0.0, layer.spec.init_std)


@INITS.register("uniform")
def uniform(weight: torch.Tensor, layer: LayerInit) -> None:
    """U(−1, 1): the reference's 'random between −1 and +1' (explodes in deep nets)."""
    nn.init.uniform_(weight, -1.0, 1.0)


@INITS.register("standard_normal")
def standard_normal(weight: torch.Tensor, layer: LayerInit) -> None:
    """N(0, 1): the reference's 'completely random' weights."""
    nn.init.normal_(weight, 0.0, 1.0)


@INITS.register("calibrated")
def calibrated(weight: torch.Tensor, layer: LayerInit) -> None:
    """randn / √fan_in (CS231n 'calibrating the variances'): unit output variance for linear units."""
    nn.init.normal_(weight, 0.0, 1.0 / math.sqrt(fan_in(weight)))


@INITS.register("xavier")
def xavier(weight: torch.Tensor, layer: LayerInit) -> None:
    """Xavier/Glorot uniform, gain of the layer's activation (Glorot & Bengio 2010)."""
    nn.init.xavier_uniform_(weight, gain=layer.gain)


@INITS.register("xavier_normal")
def xavier_normal(weight: torch.Tensor, layer: LayerInit) -> None:
    """Xavier/Glorot normal: std = gain·√(2/(fan_in + fan_out))."""
    nn.init.xavier_normal_(weight, gain=layer.gain)


@INITS.register("he")
def he(weight: torch.Tensor, layer: LayerInit) -> None:
    """He/Kaiming normal (He et al. 2015): std = gain/√fan, gain √(2/(1+slope²)), fan per model.init_mode."""
    nn.init.kaiming_normal_(weight, a=layer.slope or 0.0, mode=layer.spec.init_mode, nonlinearity=_kaiming_name(layer))


@INITS.register("he_uniform")
def he_uniform(weight: torch.Tensor, layer: LayerInit) -> None:
    """He/Kaiming uniform: U(±gain·√(3/fan)), same variance as `he`."""
    nn.init.kaiming_uniform_(weight, a=layer.slope or 0.0, mode=layer.spec.init_mode, nonlinearity=_kaiming_name(layer))


def _kaiming_name(layer: LayerInit) -> str:
    if layer.slope is not None:
        return "leaky_relu"
    return layer.activation if layer.activation in ("tanh", "sigmoid") else "linear"


@INITS.register("orthogonal")
def orthogonal(weight: torch.Tensor, layer: LayerInit) -> None:
    """Orthogonal matrix scaled by the activation's gain (Saxe et al. 2014)."""
    nn.init.orthogonal_(weight, gain=layer.gain)


@INITS.register("lsuv")
def lsuv(weight: torch.Tensor, layer: LayerInit) -> None:
    """LSUV (Mishkin & Matas 2016): orthogonal, then each layer rescaled to unit output variance on a batch."""
    nn.init.orthogonal_(weight)  # the data-dependent rescaling happens in `lsuv_rescale`


@INITS.register("auto")
def auto(weight: torch.Tensor, layer: LayerInit) -> None:
    """He for ReLU-family layers, Xavier for tanh/sigmoid, LeCun (he with gain 1) for the linear head."""
    (he if layer.slope is not None or layer.activation == "linear" else xavier)(weight, layer)


@INITS.register("torch")
def torch_default(weight: torch.Tensor, layer: LayerInit) -> None:
    """PyTorch's own default weights (kaiming uniform with a=√5) — kept for comparison."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def init_model(model: nn.Module, spec: ModelSpec) -> None:
    """Initialise every conv/linear weight with the recipe's scheme and zero every bias; norms keep 1 and 0.

    The head's layers use the linear gain (no activation follows them).
    """
    init = INITS.get(spec.init)
    head = getattr(model, "head", None)
    head_layers = set(head.modules()) if isinstance(head, nn.Module) else set()
    hidden = LayerInit(spec, spec.activation, negative_slope(spec))
    output = LayerInit(spec, "linear", None)
    for module in model.modules():
        if isinstance(module, WEIGHTED):
            init(module.weight, output if module in head_layers else hidden)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


@torch.no_grad()
def lsuv_rescale(model: nn.Module, batch: torch.Tensor, tolerance: float = 0.05, max_iterations: int = 10) -> None:
    """Scale each conv/linear layer, input to output, until its output variance on `batch` is 1 ± tol."""
    was_training = model.training
    model.eval()
    for module in [m for m in model.modules() if isinstance(m, WEIGHTED)]:
        # the variance is read inside the hook: an in-place activation overwrites the output after it
        captured: list[float] = []
        handle = module.register_forward_hook(lambda m, i, out, store=captured: store.append(out.float().var().item()))
        for _ in range(max_iterations):
            captured.clear()
            model(batch)
            variance = captured[0]
            if variance <= 1e-12 or abs(variance - 1.0) < tolerance:
                break
            module.weight.div_(math.sqrt(variance))
        handle.remove()
    model.train(was_training)
