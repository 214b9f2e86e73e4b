from __future__ import annotations

import torch

from dragontrainer.nn.multitask import SoftSharing, coupling_penalty, create_multitask_model
from dragontrainer.recipe import ModelSpec, MultitaskSpec

SPEC = ModelSpec(name="mlp", widths=[16])


def test_hard_sharing_is_one_trunk_with_stacked_heads() -> None:
    model = create_multitask_model(SPEC, MultitaskSpec(tasks=["a", "b"]), in_channels=1, task_sizes=[10, 2, 2],
                                   image_size=8)  # fmt: skip
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 14)
    assert model.head.weight.shape == (14, 16)  # rows 0-9: task 0's head, 10-11 task 1's, 12-13 task 2's
    assert coupling_penalty(model) is None


def test_soft_sharing_penalty_gradient_matches_the_analytic_form() -> None:
    """λ·Σ_{t<u} ‖θ_t − θ_u‖² has gradient 2λ·Σ_{u≠t}(θ_t − θ_u) for tower t; heads are never coupled."""
    torch.manual_seed(0)
    strength = 0.3
    model = create_multitask_model(SPEC, MultitaskSpec(tasks=["a", "b", "c"], sharing="soft", soft_strength=strength),
                                   in_channels=1, task_sizes=[10, 2, 3], image_size=8)  # fmt: skip
    assert isinstance(model, SoftSharing) and model(torch.zeros(2, 1, 8, 8)).shape == (2, 15)
    penalty = coupling_penalty(model)
    assert penalty is not None
    penalty.backward()
    towers = [dict(tower.named_parameters()) for tower in model.towers]
    coupled = [name for name in towers[0] if not name.startswith("head")]
    assert coupled and {p[0].shape for p in model.coupled} == {towers[0][n].shape for n in coupled}
    expected_value = 0.0
    for name in coupled:
        thetas = [tower[name].detach() for tower in towers]
        for t, theta in enumerate(thetas):
            expected = 2 * strength * sum(theta - other for u, other in enumerate(thetas) if u != t)
            torch.testing.assert_close(towers[t][name].grad, expected)
            expected_value += sum(float((theta - other).pow(2).sum()) for other in thetas[t + 1 :])
    value = float(penalty.detach())
    assert abs(value - strength * expected_value) < 1e-4 * max(1.0, value)
    assert all(tower[n].grad is None for tower in towers for n in tower if n.startswith("head"))
    assert "towers.2.head" in model.stages() and model.stage_prefixes()["towers.0.stem"] == ["towers.0.stem"]
