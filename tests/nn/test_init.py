"""Initialisers checked by the empirical statistics of large tensors against their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dragontrainer.nn.init import INITS, init_model, lsuv_rescale
from dragontrainer.nn.models import create_model
from dragontrainer.recipe import ModelSpec

FAN_IN, FAN_OUT = 800, 1200


def initialised(init: str, activation: str = "relu", **spec: object) -> torch.Tensor:
    torch.manual_seed(0)
    layer = nn.Linear(FAN_IN, FAN_OUT)
    init_model(nn.Sequential(layer), ModelSpec(init=init, activation=activation, **spec))
    assert torch.count_nonzero(layer.bias) == 0
    return layer.weight.detach()


@pytest.mark.parametrize(
    ("init", "activation", "spec", "expected_std"),
    [
        ("he", "relu", {}, math.sqrt(2 / FAN_IN)),
        ("he", "relu", {"init_mode": "fan_out"}, math.sqrt(2 / FAN_OUT)),
        ("he", "leaky_relu", {"leaky_slope": 1 / 5.5}, math.sqrt(2 / (1 + (1 / 5.5) ** 2) / FAN_IN)),
        ("he", "rrelu", {}, math.sqrt(2 / (1 + (2 / 11) ** 2) / FAN_IN)),
        ("he_uniform", "relu", {}, math.sqrt(2 / FAN_IN)),
        ("xavier", "tanh", {}, 5 / 3 * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("xavier_normal", "sigmoid", {}, math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("calibrated", "relu", {}, 1 / math.sqrt(FAN_IN)),
        ("normal", "relu", {"init_std": 0.03}, 0.03),
        ("standard_normal", "relu", {}, 1.0),
        ("uniform", "relu", {}, 1 / math.sqrt(3)),
        ("orthogonal", "relu", {}, math.sqrt(2) / math.sqrt(FAN_OUT)),
        ("auto", "tanh", {}, 5 / 3 * math.sqrt(2 / (FAN_IN + FAN_OUT))),
        ("auto", "relu", {}, math.sqrt(2 / FAN_IN)),
    ],
)
def test_empirical_std_matches_the_formula(init: str, activation: str, spec: dict, expected_std: float) -> None:
    weight = initialised(init, activation, **spec)
    assert abs(weight.mean().item()) < 0.05 * expected_std + 1e-4
    assert weight.std().item() == pytest.approx(expected_std, rel=0.02)


def test_uniform_range_and_symmetric_inits() -> None:
    weight = initialised("uniform")
    assert weight.min() >= -1 and weight.max() <= 1 and weight.min() < -0.99
    assert torch.count_nonzero(initialised("zeros")) == 0
    assert torch.all(initialised("constant", init_value=0.5) == 0.5)


def test_head_uses_linear_gain() -> None:
    torch.manual_seed(0)
    model = create_model(ModelSpec(name="mlp", widths=[512]), in_channels=1, num_classes=400, image_size=16)
    assert model.head.weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.05)


def test_lsuv_gives_unit_output_variance_per_layer() -> None:
    torch.manual_seed(0)
    spec = ModelSpec(name="vgg", widths=[16, 32], depth=2, norm="none", init="lsuv")
    model = create_model(spec, in_channels=3, num_classes=10, image_size=16)
    batch = torch.randn(64, 3, 16, 16) * 3 + 1
    lsuv_rescale(model, batch)
    variances = []
    hooks = [m.register_forward_hook(lambda m, i, o: variances.append(o.var().item()))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]  # fmt: skip
    model.eval()
    model(batch)
    for h in hooks:
        h.remove()
    assert len(variances) == 5 and all(abs(v - 1) < 0.1 for v in variances), variances


def test_every_init_is_registered_with_a_description() -> None:
    assert {"zeros", "constant", "normal", "uniform", "standard_normal", "calibrated", "xavier", "xavier_normal",
            "he", "he_uniform", "orthogonal", "lsuv", "auto"} <= set(INITS.names())  # fmt: skip
