"""Parameter groups: weight decay only on weight matrices and conv kernels, chosen by shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class GroupSummary:
    name: str
    tensors: int
    parameters: int
    weight_decay: float

    def __str__(self) -> str:
        return f"{self.name}: {self.tensors} tensors, {self.parameters:,} params, weight_decay={self.weight_decay:g}"


def build_param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict[str, Any]], list[GroupSummary]]:
    """Two groups: `decay` (conv kernels, linear weights) and `no_decay` (biases, norm scales, the
    per-unit gains of weight normalisation).

    Chosen by shape, never by name: a tensor decays when it has more than one value per output unit
    (ndim >= 2 and a row of more than one element). Decaying a norm's scale or a bias only fights the
    normalisation. Frozen parameters (requires_grad=False) are left out.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and param[0].numel() > 1 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    summary = [
        GroupSummary(g["name"], len(g["params"]), sum(p.numel() for p in g["params"]), g["weight_decay"])
        for g in groups
    ]
    return groups, summary
