"""Optimisers: torch-backed entries against torch itself; hand-written ones against NumPy
transcriptions of the papers' equations on a small ill-conditioned quadratic."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from dragontrainer.optim.optimizers import OPTIMIZERS, create_optimizer
from dragontrainer.recipe import OptimSpec

SCALES = np.array([1.0, 10.0, 0.1, 3.0])  # loss = ½ Σ s_i x_i²  ->  g = s·x
START = np.array([1.0, -2.0, 3.0, 0.5])


def run_ours(name: str, steps: int = 25, lr: float = 0.05, **spec: object) -> np.ndarray:
    x = torch.nn.Parameter(torch.tensor(START, dtype=torch.float64))
    opt = create_optimizer([{"params": [x], "weight_decay": 0.0}], OptimSpec(name=name, **spec), lr)
    scales = torch.tensor(SCALES)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * scales * x**2).sum().backward()
        opt.step()
    return x.detach().numpy()


TORCH_REFERENCES: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr, eps=1e-8),
    "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr, alpha=0.99, eps=1e-8),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "amsgrad": lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
    "nadam": lambda p, lr: torch.optim.NAdam(p, lr=lr),
    "radam": lambda p, lr: torch.optim.RAdam(p, lr=lr),
}


@pytest.mark.parametrize("name", sorted(TORCH_REFERENCES))
def test_torch_backed_optimisers_follow_torch(name: str) -> None:
    x = torch.nn.Parameter(torch.tensor(START, dtype=torch.float64))
    opt = TORCH_REFERENCES[name]([x], 0.05)
    for _ in range(25):
        opt.zero_grad()
        (0.5 * torch.tensor(SCALES) * x**2).sum().backward()
        opt.step()
    np.testing.assert_allclose(run_ours(name), x.detach().numpy(), rtol=1e-12)


def reference_adabelief(steps: int, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    x, m, s = START.copy(), np.zeros(4), np.zeros(4)
    for t in range(1, steps + 1):
        g = SCALES * x
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        x = x - lr * (m / (1 - b1**t)) / (np.sqrt(s / (1 - b2**t)) + eps)
    return x


def reference_diffgrad(steps: int, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> np.ndarray:
    x, m, v, previous = START.copy(), np.zeros(4), np.zeros(4), np.zeros(4)
    for t in range(1, steps + 1):
        g = SCALES * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        xi = 1 / (1 + np.exp(-np.abs(previous - g)))
        previous = g
        x = x - lr * xi * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return x


def reference_adam_without_bias_correction(steps: int, lr: float, b1: float = 0.9, b2: float = 0.999) -> np.ndarray:
    x, m, v = START.copy(), np.zeros(4), np.zeros(4)
    for _ in range(steps):
        g = SCALES * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        x = x - lr * m / (np.sqrt(v) + 1e-8)
    return x


def test_adabelief_follows_the_paper() -> None:
    np.testing.assert_allclose(run_ours("adabelief"), reference_adabelief(25, 0.05), rtol=1e-10)


def test_diffgrad_follows_the_paper() -> None:
    np.testing.assert_allclose(run_ours("diffgrad"), reference_diffgrad(25, 0.05), rtol=1e-10)


def test_adam_without_bias_correction_takes_huge_first_steps() -> None:
    ours = run_ours("adam", steps=1, bias_correction=False)
    np.testing.assert_allclose(ours, reference_adam_without_bias_correction(1, 0.05), rtol=1e-10)
    first_step = np.abs(ours - START)
    corrected = np.abs(run_ours("adam", steps=1) - START)
    # m/√v = 0.1·g/√(0.001·g²) ≈ 3.16: the uncorrected first step is √(1−β2)/(1−β1)... ≈ 3.2× Adam's
    np.testing.assert_allclose(first_step / corrected, 0.1 / np.sqrt(0.001), rtol=1e-4)


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimiser_descends_and_respects_param_group_decay(name: str) -> None:
    final = run_ours(name, steps=60, lr=0.02)
    assert (0.5 * SCALES * final**2).sum() < (0.5 * SCALES * START**2).sum()
    decayed = torch.nn.Parameter(torch.ones(3))
    plain = torch.nn.Parameter(torch.ones(3))
    opt = create_optimizer(
        [{"params": [decayed], "weight_decay": 0.5}, {"params": [plain], "weight_decay": 0.0}],
        OptimSpec(name=name),
        0.1,
    )
    (decayed.sum() * 0 + plain.sum() * 0).backward()  # zero gradients: only weight decay moves
    opt.step()
    assert torch.equal(plain.detach(), torch.ones(3))
    assert (decayed.detach() < 1).all(), name


def test_auto_learning_rate_comes_from_the_optimiser_family() -> None:
    from dragontrainer.optim.optimizers import AUTO_LR, OPTIMIZERS, base_lr, effective_lr
    from dragontrainer.recipe import Recipe

    assert Recipe.load().optim.lr == "auto"
    assert set(AUTO_LR) == set(OPTIMIZERS.names())
    assert all(source for _, source in AUTO_LR.values())
    assert base_lr(Recipe.load().optim) == 0.2  # the digits default keeps its rate
    assert base_lr(Recipe.load(overrides=["optim.name=adam"]).optim) == 1e-3
    assert base_lr(Recipe.load(overrides=["optim.name=adagrad"]).optim) == 1e-2
    assert base_lr(Recipe.load(overrides=["optim.name=adam", "optim.lr=0.02"]).optim) == 0.02  # as written
    assert effective_lr(Recipe.load(overrides=["optim.name=adamw"]).optim, 256) == 2e-3  # linear scaling
    assert Recipe.load(overrides=["optim.lr=auto"]).to_yaml().count("lr: auto") == 1
