"""Networks with one output block per task (Caruana 1997; Ruder 2017, "An overview of multi-task learning").

Both kinds return the tasks' logits side by side, (N, Σ C_t), so the loop, checkpoints and exports see one
tensor; `train/multitask.py` cuts it per task.

- hard parameter sharing: one trunk, one linear head per task. The heads are stacked into the zoo model's
  last linear layer (rows [o_t, o_t + C_t) are task t's head): the same parameters as T separate heads,
  computed in one matrix product, and every stage name (stem, blocks, head) stays addressable.
- soft parameter sharing: one whole tower per task; the towers are tied only by an L2 penalty between
  their corresponding parameters (Duong et al. 2015), λ·Σ_{t<u} ‖θ_t − θ_u‖² (heads excluded).
"""

from __future__ import annotations

import torch
from torch import nn

from dragontrainer.nn.models import Network, create_model
from dragontrainer.recipe import ModelSpec, MultitaskSpec


class SoftSharing(nn.Module):
    """One tower per task, each a zoo model with its task's number of outputs; `stages()` lists every
    tower's stages as `towers.<t>.<stage>` so transfer rules and monitors still address them."""

    def __init__(self, towers: list[nn.Module], strength: float) -> None:
        super().__init__()
        self.towers = nn.ModuleList(towers)
        self.strength = strength
        self.coupled = coupled_parameters(self.towers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([tower(x) for tower in self.towers], dim=1)

    def stages(self) -> dict[str, nn.Module]:
        return {f"towers.{t}.{name}": self.get_submodule(f"towers.{t}.{names[0]}")
                for t, tower in enumerate(self.towers) for name, names in tower_prefixes(tower).items()}  # fmt: skip

    def stage_prefixes(self) -> dict[str, list[str]]:
        return {f"towers.{t}.{name}": [f"towers.{t}.{n}" for n in names]
                for t, tower in enumerate(self.towers) for name, names in tower_prefixes(tower).items()}  # fmt: skip

    def coupling_penalty(self) -> torch.Tensor | None:
        """λ·Σ_{t<u} ‖θ_t − θ_u‖² over the coupled parameters; its gradient for tower t is 2λ·Σ_{u≠t}(θ_t − θ_u)."""
        if self.strength == 0 or not self.coupled:
            return None
        total = torch.zeros((), device=self.coupled[0][0].device)
        for group in self.coupled:
            for t in range(len(group)):
                for u in range(t + 1, len(group)):
                    total = total + (group[t] - group[u]).pow(2).sum()
        return self.strength * total


def coupled_parameters(towers: nn.ModuleList) -> list[list[nn.Parameter]]:
    """For each parameter name every tower has with the same shape (the heads are never coupled: they
    answer different questions), the towers' tensors in tower order."""
    named = [dict(tower.named_parameters()) for tower in towers]
    heads = tuple(f"{prefix}." for prefix in tower_prefixes(towers[0]).get("head", ["head"]))
    groups = []
    for name, first in named[0].items():
        if name.startswith(heads):
            continue
        group = [params.get(name) for params in named]
        if all(p is not None and p.shape == first.shape for p in group):
            groups.append(group)
    return groups


def tower_prefixes(tower: nn.Module) -> dict[str, list[str]]:
    """A tower's stage name -> module names (zoo models and torchvision-layout ResNets name them)."""
    method = getattr(tower, "stage_prefixes", None)
    return method() if callable(method) else {}


def create_multitask_model(
    spec: ModelSpec, multitask: MultitaskSpec, *, in_channels: int, task_sizes: list[int], image_size: int
) -> nn.Module:
    """Hard sharing: the zoo model with Σ C_t outputs (one stacked head per task); soft: one tower per task."""
    if multitask.sharing == "hard":
        return create_model(spec, in_channels=in_channels, num_classes=sum(task_sizes), image_size=image_size)
    towers: list[nn.Module] = [
        create_model(spec, in_channels=in_channels, num_classes=size, image_size=image_size) for size in task_sizes
    ]
    return SoftSharing(towers, multitask.soft_strength)


def coupling_penalty(model: nn.Module) -> torch.Tensor | None:
    """The soft-sharing penalty of `model`, or None for any other network."""
    return model.coupling_penalty() if isinstance(model, SoftSharing) else None


__all__ = ["Network", "SoftSharing", "coupled_parameters", "coupling_penalty", "create_multitask_model"]
