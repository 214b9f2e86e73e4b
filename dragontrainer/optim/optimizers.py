"""Optimisers by name, built from the recipe's optim section over prepared parameter groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dragontrainer.optim.custom import AdaBelief, AdamNoBiasCorrection, DiffGrad
from dragontrainer.recipe import OptimSpec
from dragontrainer.registry import Registry

OptimizerFactory = Callable[[list[dict[str, Any]], OptimSpec, float], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """SGD; with optim.momentum > 0 heavy-ball momentum (v = μv + g; w -= lr·v); optim.nesterov looks ahead."""
    nesterov = spec.nesterov and spec.momentum > 0
    return torch.optim.SGD(groups, lr=lr, momentum=spec.momentum, nesterov=nesterov)


@OPTIMIZERS.register("adagrad")
def adagrad(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """AdaGrad (Duchi et al. 2011): per-parameter steps shrink with the sum of squared gradients."""
    return torch.optim.Adagrad(groups, lr=lr, eps=spec.eps)


@OPTIMIZERS.register("rmsprop")
def rmsprop(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """RMSProp (Hinton): steps divided by a running RMS of gradients (decay `rho`), optional momentum."""
    return torch.optim.RMSprop(groups, lr=lr, alpha=spec.rho, eps=spec.eps, momentum=spec.rmsprop_momentum)


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015), with bias correction unless optim.bias_correction=false."""
    if not spec.bias_correction:
        return AdamNoBiasCorrection(groups, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=0.0)
    return torch.optim.Adam(groups, lr=lr, betas=spec.betas, eps=spec.eps)


@OPTIMIZERS.register("amsgrad")
def amsgrad(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """AMSGrad (Reddi et al. 2018): Adam with a non-decreasing second moment."""
    return torch.optim.Adam(groups, lr=lr, betas=spec.betas, eps=spec.eps, amsgrad=True)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019): weight decay decoupled from the adaptive step."""
    return torch.optim.AdamW(groups, lr=lr, betas=spec.betas, eps=spec.eps)


@OPTIMIZERS.register("nadam")
def nadam(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """NAdam (Dozat 2016): Adam with Nesterov momentum."""
    return torch.optim.NAdam(groups, lr=lr, betas=spec.betas, eps=spec.eps)


@OPTIMIZERS.register("radam")
def radam(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """RAdam (Liu et al. 2020): Adam with the variance of the adaptive rate rectified early on."""
    return torch.optim.RAdam(groups, lr=lr, betas=spec.betas, eps=spec.eps)


@OPTIMIZERS.register("adabelief")
def adabelief(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """AdaBelief (Zhuang et al. 2020): steps scaled by the belief (g − m)² instead of g²."""
    return AdaBelief(groups, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=0.0)


@OPTIMIZERS.register("diffgrad")
def diffgrad(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    """diffGrad (Dubey et al. 2019): Adam slowed by a friction term from the change of the gradient."""
    return DiffGrad(groups, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=0.0)


# `optim.lr: auto`: each family's usual rate per `reference_batch_size` (128) images, with its source.
AUTO_LR: dict[str, tuple[float, str]] = {
    "sgd": (
        0.2,
        "SGD + Nesterov 0.9: 0.1 per 128 (Zagoruyko & Komodakis 2016) to 0.1 per 256 scaled linearly "
        "(Goyal et al. 2017); 0.2 per 128 measured best on the digits with warm-up and cosine",
    ),
    "adagrad": (1e-2, "Duchi et al. 2011; the default of PyTorch and Keras"),
    "rmsprop": (1e-3, "Hinton's lecture 6e; the default of Keras"),
    "adam": (1e-3, "Kingma & Ba 2015"),
    "amsgrad": (1e-3, "Reddi et al. 2018 (Adam's rate)"),
    "adamw": (1e-3, "Loshchilov & Hutter 2019 (Adam's rate)"),
    "nadam": (2e-3, "Dozat 2016"),
    "radam": (1e-3, "Liu et al. 2020"),
    "adabelief": (1e-3, "Zhuang et al. 2020"),
    "diffgrad": (1e-3, "Dubey et al. 2019"),
}


def auto_lr(name: str) -> float:
    """The usual learning rate of optimiser `name` per 128 images (Adam's for an unknown adaptive one)."""
    return AUTO_LR.get(name, AUTO_LR["adam"])[0]


def base_lr(spec: OptimSpec) -> float:
    """`optim.lr` as a number per `reference_batch_size` images: as written, or the family's with `auto`.
    The one place `auto` is resolved; everything that needs the rate (optimiser, advice) calls this."""
    return auto_lr(spec.name) if spec.lr == "auto" else float(spec.lr)


def effective_lr(spec: OptimSpec, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr grows with the batch relative to the reference."""
    if spec.lr_scaling == "linear":
        return base_lr(spec) * batch_size / spec.reference_batch_size
    return base_lr(spec)


def create_optimizer(groups: list[dict[str, Any]], spec: OptimSpec, lr: float) -> torch.optim.Optimizer:
    optimizer = OPTIMIZERS.get(spec.name)(groups, spec, lr)
    for group in optimizer.param_groups:
        group["base_lr"] = lr * group.get("lr_mult", 1.0)  # what the schedule's factor multiplies
    return optimizer
