from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dragontrainer import Recipe, train
from dragontrainer.nn.layers import DropConnectLinear
from dragontrainer.nn.models import create_model
from dragontrainer.optim.regularizers import clip_gradients, create_penalty, project_max_norm
from dragontrainer.recipe import ModelSpec, RegularizeSpec


def test_penalties_closed_forms() -> None:
    w = [torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0]])]
    assert create_penalty(RegularizeSpec(penalty="l2", strength=0.1))(w).item() == pytest.approx(0.05 * 14)
    assert create_penalty(RegularizeSpec(penalty="l1", strength=0.1))(w).item() == pytest.approx(0.6)
    net = create_penalty(RegularizeSpec(penalty="elastic_net", strength=0.1, l1_ratio=0.25))(w).item()
    assert net == pytest.approx(0.1 * (0.25 * 6 + 0.75 * 0.5 * 14))
    assert create_penalty(RegularizeSpec(penalty="l2", strength=0.0))(w) is None


def test_l2_gradient_is_weight_decay() -> None:
    w = torch.randn(3, 4, requires_grad=True)
    create_penalty(RegularizeSpec(penalty="l2", strength=0.3))([w]).backward()
    torch.testing.assert_close(w.grad, 0.3 * w.detach())


def test_max_norm_projects_rows_onto_the_ball_and_leaves_short_rows() -> None:
    linear = torch.randn(20, 50) * 3
    conv = torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last) * 3
    short = torch.full((1, 4), 0.1)
    before = short.clone()
    project_max_norm([linear, conv, short], max_norm=3.0)
    assert linear.norm(dim=1).max() <= 3.0 + 1e-5 and conv.reshape(8, -1).norm(dim=1).max() <= 3.0 + 1e-5
    assert torch.allclose(linear.norm(dim=1).max(), torch.tensor(3.0))
    assert torch.equal(short, before)


def test_gradient_clipping_by_norm_and_value() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    clip_gradients([p], RegularizeSpec(clip_grad_norm=1.0))
    assert p.grad.norm().item() == pytest.approx(1.0)
    p.grad = torch.tensor([3.0, -4.0, 0.5, 0.0])
    clip_gradients([p], RegularizeSpec(clip_grad_value=1.0))
    assert p.grad.tolist() == [1.0, -1.0, 0.5, 0.0]


def test_dropconnect_drops_weights_at_rate_p_and_is_plain_at_test() -> None:
    torch.manual_seed(0)
    layer = DropConnectLinear(400, 300, p=0.3)
    x = torch.eye(400)  # row i of the output is column i of the (masked) weight, plus bias
    out = layer.train()(x) - layer.bias
    dropped = (out == 0).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.01)
    kept = out != 0
    torch.testing.assert_close(out[kept], (layer.weight.t() / 0.7)[kept])
    torch.testing.assert_close(layer.eval()(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_spatial_dropout_and_dropconnect_are_built_from_the_recipe() -> None:
    spec = ModelSpec(name="vgg", widths=[8, 16], depth=1, spatial_dropout=0.2, dropconnect=0.4)
    model = create_model(spec, in_channels=1, num_classes=3, image_size=8)
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in model.modules()) == 2
    assert isinstance(model.head[-1], DropConnectLinear) and model.head[-1].p == 0.4


def test_gradient_accumulation_matches_the_large_batch(tmp_path: Path) -> None:
    common = ["model.name=mlp", "model.widths=[32]", "model.norm=none", "train.epochs=2", "augment.crop.p=0",
              "schedule.warmup_epochs=0", "train.label_smoothing=0"]  # fmt: skip
    big = train(Recipe.load(overrides=[*common, "train.batch_size=128", f"run.dir={tmp_path / 'big'}"]))
    small = train(
        Recipe.load(overrides=[*common, "train.batch_size=64", "train.accumulate_steps=2", f"run.dir={tmp_path / 's'}"])
    )
    a = load_file(str(big.run_dir / "checkpoints/last/model.safetensors"))
    b = load_file(str(small.run_dir / "checkpoints/last/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert [r["step"] for r in big.history] == [r["step"] for r in small.history]


def test_max_norm_holds_after_real_training(tmp_path: Path) -> None:
    overrides = ["model.name=mlp", "model.widths=[64]", "train.epochs=2", "regularize.max_norm=0.5",
                 "regularize.penalty=l1", "regularize.strength=1e-4", f"run.dir={tmp_path / 'r'}"]  # fmt: skip
    result = train(Recipe.load(overrides=overrides))
    weights = load_file(str(result.run_dir / "checkpoints/last/model.safetensors"))
    for name, w in weights.items():
        if name.endswith("weight") and w.ndim >= 2:
            assert w.reshape(w.shape[0], -1).norm(dim=1).max() <= 0.5 + 1e-5, name
