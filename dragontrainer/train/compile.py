"""The compile decision, made in one place: whether the training forward runs through torch.compile.

`train.compile`: false | true | auto (on for CUDA only: on CPU the first compile costs tens of seconds and
rarely repays them on small nets). torch.compile compiles lazily, at the first call, so a failure (no C++
compiler, an operation the compiler does not support) surfaces inside the first training step: the
forward then falls back to the plain module with one message instead of ending the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from torch import nn

from dragontrainer.console import text


def wants_compile(setting: bool | str, device: torch.device) -> bool:
    return setting is True or (setting == "auto" and device.type == "cuda")


class CompiledForward:
    """The training forward: torch.compile's when it works, the module's own after the first failure.
    The module itself is left unwrapped, so checkpoints, monitors and evaluation see plain parameter names."""

    def __init__(self, model: nn.Module, console: Console | None, compiler: Callable[[nn.Module], Any] = torch.compile):
        self.model = model
        self.console = console
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        try:
            self.compiled = compiler(model)
        except Exception as exc:  # any compiler failure means: train uncompiled
            self.fall_back(exc)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model(inputs)
        try:
            return self.compiled(inputs)
        except Exception as exc:  # the model's own errors re-raise uncompiled
            self.fall_back(exc)
            return self.model(inputs)

    def fall_back(self, exc: Exception) -> None:
        self.compiled = None
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        if self.console is not None:
            self.console.print(
                f"[yellow]train.compile: torch.compile failed ({type(exc).__name__}: {text(first_line)}); "
                "training continues uncompiled[/]"
            )


def training_forward(
    model: nn.Module, setting: bool | str, device: torch.device, console: Console | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable the loop's training step runs the model through."""
    return CompiledForward(model, console) if wants_compile(setting, device) else model
