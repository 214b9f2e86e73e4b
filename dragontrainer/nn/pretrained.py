"""Starting from existing weights: a safetensors file, or a PyTorch state dict read with
`torch.load(weights_only=True)` (plain tensors and containers only: a pickle that would run code is
refused). Tensors load by name where the shape matches; the rest (a new head for other classes)
keep their initialisation, and the user is told which."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dragontrainer.errors import DataError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class LoadedWeights:
    loaded: list[str]
    skipped: list[str]  # in the model but absent from the file, or of another shape

    def describe(self) -> str:
        kept = f"; kept initialisation for {', '.join(self.skipped[:4])}{' …' if len(self.skipped) > 4 else ''}"
        return f"{len(self.loaded)} tensors loaded" + (kept if self.skipped else "")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """name -> tensor from a weights file; never executes anything stored in it."""
    if not path.is_file():
        raise DataError(f"{path}: weights file not found (recipe field model.weights)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise DataError(f"{path}: weights must be .safetensors or a PyTorch state dict ({', '.join(TORCH_SUFFIXES)})")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # garbage, not a refused class or function
            raise DataError(f"{path}: not a readable PyTorch weights file (corrupt or not a state dict)") from None
        raise DataError(
            f"{path}: refused — the file holds Python objects other than tensors, and unpickling them could run "
            "code; save a plain state dict (torch.save(model.state_dict(), ...)) or safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__})") from None
    return flatten_state(content, path)


def flatten_state(content: Any, path: Path) -> dict[str, torch.Tensor]:
    """A state dict, possibly wrapped as {'state_dict': ...} or {'model': ...} (training checkpoints)."""
    if isinstance(content, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(content.get(key), dict):
                content = content[key]
                break
        tensors = {str(k): v for k, v in content.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise DataError(f"{path}: no tensors found (expected a state dict: parameter name -> tensor)")


def load_pretrained(model: nn.Module, path: Path) -> LoadedWeights:
    """Copy every tensor whose name and shape match into `model`; at least one must."""
    tensors = read_weights(path)
    state = model.state_dict()
    matched = {k: v for k, v in tensors.items() if k in state and state[k].shape == v.shape}
    if not matched:
        raise DataError(
            f"{path}: none of its {len(tensors)} tensors matches the model's names and shapes "
            f"(e.g. the model has {next(iter(state))}); was it saved from the same model.name and widths?"
        )
    with torch.no_grad():
        for name, tensor in matched.items():
            state[name].copy_(tensor)
    return LoadedWeights(sorted(matched), sorted(set(state) - set(matched)))
