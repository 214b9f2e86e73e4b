"""Optimisers by name, built from the recipe's optim section over prepared parameter groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dragontrainer.recipe import OptimSpec
from dragontrainer.registry import Registry

OptimizerFactory = Callable[[list[dict[str, Any]], OptimSpec, float], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (v = μv + g; w -= lr·v) and optional Nesterov look-ahead."""
    nesterov = spec.nesterov and spec.momentum > 0
    return torch.optim.SGD(groups, lr=lr, momentum=spec.momentum, nesterov=nesterov)


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """Adam with bias correction (Kingma & Ba 2015); weight decay as L2 in the gradient."""
    return torch.optim.Adam(groups, lr=lr, betas=spec.betas, eps=spec.eps)


def effective_lr(spec: OptimSpec, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr grows with the batch relative to the reference."""
    if spec.lr_scaling == "linear":
        return spec.lr * batch_size / spec.reference_batch_size
    return spec.lr


def create_optimizer(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    optimizer = OPTIMIZERS.get(spec.name)(groups, spec, lr)
    for group in optimizer.param_groups:
        group["base_lr"] = lr * group.get("lr_mult", 1.0)  # what the schedule's factor multiplies
    return optimizer
