from __future__ import annotations

import pytest
import torch

from dragontrainer.errors import RecipeError
from dragontrainer.nn.activations import ACTIVATIONS
from dragontrainer.nn.models import MODELS, create_model
from dragontrainer.nn.norms import NORMS
from dragontrainer.recipe import ModelSpec


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_every_model_trains_a_step_without_nan(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(ModelSpec(name=name), in_channels=channels, num_classes=5, image_size=size)
    x = torch.randn(4, channels, size, size)
    logits = model(x)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert next(iter(model.stages())) == "stem" and list(model.stages())[-1] == "head"


@pytest.mark.parametrize("activation", ACTIVATIONS.names())
@pytest.mark.parametrize("norm", NORMS.names())
def test_any_activation_and_norm_by_name(activation: str, norm: str) -> None:
    spec = ModelSpec(name="vgg", widths=[8, 16], depth=1, activation=activation, norm=norm, dropout=0.2)
    out = create_model(spec, in_channels=3, num_classes=3, image_size=8)(torch.randn(2, 3, 8, 8))
    assert torch.isfinite(out).all()


def test_depth_and_widths_shape_the_network() -> None:
    small = create_model(
        ModelSpec(name="resnet", widths=[8, 16], depth=1), in_channels=3, num_classes=10, image_size=32
    )
    big = create_model(ModelSpec(name="resnet", widths=[8, 16], depth=3), in_channels=3, num_classes=10, image_size=32)
    assert len(small.blocks) == 2 and len(small.blocks[1]) == 1 and len(big.blocks[1]) == 3
    vgg = create_model(ModelSpec(name="vgg", widths=[4, 8, 16], depth=2), in_channels=1, num_classes=2, image_size=8)
    convs = [m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16]


def test_lenet_needs_four_widths() -> None:
    with pytest.raises(RecipeError, match="lenet takes 4 widths"):
        create_model(ModelSpec(name="lenet", widths=[6, 16]), in_channels=1, num_classes=10, image_size=28)


def test_zero_init_residual_makes_blocks_start_as_identity() -> None:
    model = create_model(ModelSpec(name="resnet", widths=[8], depth=2), in_channels=3, num_classes=2, image_size=8)
    block = model.blocks[0][1]
    x = torch.relu(torch.randn(2, 8, 8, 8))
    model.eval()
    torch.testing.assert_close(block(x), x)


def test_weight_norm_keeps_the_function_at_init_and_adds_undecayed_gains() -> None:
    from dragontrainer.optim.param_groups import build_param_groups

    torch.manual_seed(0)
    plain = create_model(
        ModelSpec(name="vgg", widths=[8, 16], depth=1, norm="none"), in_channels=3, num_classes=4, image_size=8
    )
    torch.manual_seed(0)
    normed = create_model(
        ModelSpec(name="vgg", widths=[8, 16], depth=1, norm="weight"), in_channels=3, num_classes=4, image_size=8
    )
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(normed(x), plain(x), atol=1e-5, rtol=1e-4)
    gains = [p for n, p in normed.named_parameters() if n.endswith("original0")]
    assert len(gains) == 3  # stem conv, the second stage's conv, the head
    groups, _ = build_param_groups(normed, 5e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert not any(id(g) in decayed for g in gains)
