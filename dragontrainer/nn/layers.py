"""Layers the zoo needs that torch does not ship."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropConnectLinear(nn.Linear):
    """Linear layer with DropConnect (Wan et al. 2013): in training each weight is zeroed with
    probability p and the survivors scaled by 1/(1−p), a fresh mask every forward; plain at test."""

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        mask = torch.empty_like(self.weight).bernoulli_(1 - self.p)
        return F.linear(x, self.weight * mask / (1 - self.p), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropconnect p={self.p}"


def head_linear(in_features: int, out_features: int, dropconnect: float) -> nn.Linear:
    return (
        DropConnectLinear(in_features, out_features, dropconnect)
        if dropconnect > 0
        else nn.Linear(in_features, out_features)
    )
