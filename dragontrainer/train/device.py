"""The device decision, made in one place: which device, and whether kernels must be deterministic."""

from __future__ import annotations

import os

import torch

from dragontrainer.errors import RecipeError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RecipeError(
            f"recipe field train.device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("recipe field train.device: cuda was asked for but no CUDA device is available")
    return device


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """CPU runs are reproducible as they are; on CUDA, `deterministic` trades speed for bitwise repeats."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    # the switch is process-wide (a previous run in this process may have turned it on), and setting it
    # imports the compiler stack (torch._dynamo, ~1.6 s): only when it changes
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)
    # fastest kernels for fixed shapes, not bitwise repeatable
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
