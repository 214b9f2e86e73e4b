"""Penalties added to the loss, and constraints applied after each optimiser step.

Penalties apply to weight tensors only (ndim ≥ 2: conv kernels, linear weights), like weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dragontrainer.recipe import RegularizeSpec
from dragontrainer.registry import Registry

Penalty = Callable[[Sequence[torch.Tensor]], torch.Tensor | None]
PENALTIES: Registry[Callable[[RegularizeSpec], Penalty]] = Registry("penalty")


@PENALTIES.register("none")
def no_penalty(spec: RegularizeSpec) -> Penalty:
    """No penalty in the loss."""
    return lambda weights: None


@PENALTIES.register("l2")
def l2(spec: RegularizeSpec) -> Penalty:
    """L2 in the loss: ½λ·Σw² (its gradient λw is classic weight decay for SGD)."""
    return lambda weights: 0.5 * spec.strength * sum(w.pow(2).sum() for w in weights)


@PENALTIES.register("l1")
def l1(spec: RegularizeSpec) -> Penalty:
    """L1 in the loss: λ·Σ|w|, which drives many weights to exactly zero (sparse)."""
    return lambda weights: spec.strength * sum(w.abs().sum() for w in weights)


@PENALTIES.register("elastic_net")
def elastic_net(spec: RegularizeSpec) -> Penalty:
    """Elastic net: λ·(r·Σ|w| + (1−r)·½Σw²), r = regularize.l1_ratio."""
    r = spec.l1_ratio
    return lambda weights: spec.strength * sum(r * w.abs().sum() + (1 - r) * 0.5 * w.pow(2).sum() for w in weights)


def create_penalty(spec: RegularizeSpec) -> Penalty:
    if spec.strength == 0:
        return no_penalty(spec)
    return PENALTIES.get(spec.penalty)(spec)


@torch.no_grad()
def project_max_norm(weights: Sequence[torch.Tensor], max_norm: float) -> None:
    """Max-norm constraint (Srivastava et al. 2014): every unit's incoming weight vector (a row of a
    linear weight, one filter of a conv) is scaled back onto the ball ‖w‖₂ ≤ c when it leaves it."""
    for weight in weights:
        rows = weight.view(weight.shape[0], -1) if weight.is_contiguous() else weight.reshape(weight.shape[0], -1)
        norms = rows.norm(dim=1, keepdim=True)
        scale = (max_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        shape = (-1,) + (1,) * (weight.ndim - 1)
        weight.mul_(scale.view(shape))


def clip_gradients(parameters: Sequence[torch.Tensor], spec: RegularizeSpec) -> None:
    if spec.clip_grad_value is not None:
        torch.nn.utils.clip_grad_value_(parameters, spec.clip_grad_value)
    if spec.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, spec.clip_grad_norm)
