"""The precision decision, made in one place: which dtype autocast runs the model in."""

from __future__ import annotations

import torch


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA by default (no loss scaling needed); full precision on CPU."""
    if amp == "on" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
