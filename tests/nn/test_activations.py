from __future__ import annotations

import pytest
import torch

from dragontrainer.nn.activations import ACTIVATIONS, ReferenceRReLU, create_activation
from dragontrainer.recipe import ModelSpec


def test_rrelu_follows_the_reference_not_torch() -> None:
    torch.manual_seed(0)
    act = ReferenceRReLU(3.0, 8.0)
    x = -torch.ones(200_000)
    slopes = -act.train()(x)
    a = 1 / slopes
    assert a.min() >= 3.0 and a.max() <= 8.0
    assert a.mean().item() == pytest.approx(5.5, rel=0.01)  # a ~ U(3, 8)
    assert a.std().item() == pytest.approx(5 / 12**0.5, rel=0.02)
    assert torch.allclose(-act.eval()(x), torch.full_like(x, 2 / 11))
    positive = torch.rand(100)
    assert torch.equal(act.train()(positive), positive)


def test_leaky_slope_from_the_recipe_and_prelu_per_channel() -> None:
    leaky = create_activation(ModelSpec(activation="leaky_relu", leaky_slope=0.01), 4)
    assert leaky(torch.tensor([-100.0])).item() == pytest.approx(-1.0)
    prelu = create_activation(ModelSpec(activation="prelu"), 6)
    assert sum(p.numel() for p in prelu.parameters()) == 6


@pytest.mark.parametrize("name", ACTIVATIONS.names())
def test_every_activation_keeps_shape_and_is_finite(name: str) -> None:
    act = create_activation(ModelSpec(activation=name), 3)
    x = torch.randn(2, 3, 4, 4) * 10
    out = act(x.clone())
    assert out.shape == x.shape and torch.isfinite(out).all()
