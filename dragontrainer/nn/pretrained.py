"""Starting from existing weights: a safetensors file, or a PyTorch state dict read with
`torch.load(weights_only=True)` (plain tensors and containers only: a pickle that would run code is
refused). Tensors load by name where the shape matches; the rest (a new head for other classes)
keep their initialisation, and the user is told which."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dragontrainer.errors import DataError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class LoadedWeights:
    """The key-mapping report: which tensors of the file went where."""

    loaded: list[str]
    skipped: list[str]  # in the model but absent from the file, or of another shape
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # "name: file (3, 64) vs model (10, 64)"
    renamed: str | None = None  # a prefix stripped from the file's names ("module." from DataParallel)
    adapted: list[str] = field(default_factory=list)  # first conv: RGB kernels summed for gray input

    def describe(self) -> str:
        kept = f"; kept initialisation for {', '.join(self.skipped[:4])}{' …' if len(self.skipped) > 4 else ''}"
        return f"{len(self.loaded)} tensors loaded" + (kept if self.skipped else "")

    def report(self) -> str:
        """matched / missing / unexpected / shape-mismatched, with a few names of each."""

        def some(names: list[str]) -> str:
            return f" ({', '.join(names[:3])}{' …' if len(names) > 3 else ''})" if names else ""

        lines = [
            f"matched {len(self.loaded)}",
            f"missing {len(self.missing)}{some(self.missing)}",
            f"unexpected {len(self.unexpected)}{some(self.unexpected)}",
            f"shape-mismatched {len(self.mismatched)}{some(self.mismatched)}",
        ]
        if self.renamed:
            lines.append(f"prefix {self.renamed!r} stripped")
        if self.adapted:
            lines.append(f"adapted {', '.join(self.adapted)}")
        return "; ".join(lines)


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


WRAPPER_PREFIXES = ("module.", "model.", "backbone.")  # DataParallel / Lightning / detection wrappers


def weights_file(path: Path) -> Path:
    """A weights file, or a run folder's best (else last) checkpoint weights."""
    if path.is_dir():
        for folder in ("best", "last"):
            candidate = path / "checkpoints" / folder / "model.safetensors"
            if candidate.is_file():
                return candidate
        raise DataError(f"{path}: a folder but not a run with a checkpoint (model.weights)")
    return path


def strip_wrapper_prefix(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Names saved from a wrapped model (`module.conv1.weight`) mapped back to the model's own."""
    if any(k in state for k in tensors):
        return tensors, None
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            return {k.removeprefix(prefix): v for k, v in tensors.items()}, prefix
    return tensors, None


def adapt_input_channels(name: str, tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """A first conv saved for RGB loaded into a gray model: the kernels summed over the colour channels
    (a gray image is R = G = B, so the response is unchanged)."""
    rgb_to_gray = tensor.ndim == 4 and target.ndim == 4 and tensor.shape[1] == 3 and target.shape[1] == 1
    if rgb_to_gray and tensor.shape[0] == target.shape[0] and tensor.shape[2:] == target.shape[2:]:
        return tensor.sum(dim=1, keepdim=True)
    return None


def load_pretrained(model: nn.Module, path: Path) -> LoadedWeights:
    """Copy every tensor whose name and shape match into `model` (at least one must); `path` may be a
    weights file or a run folder. The returned report says what matched and what did not."""
    source = weights_file(Path(path))
    state = model.state_dict()
    tensors, renamed = strip_wrapper_prefix(read_weights(source), state)
    matched, mismatched, adapted = {}, [], []
    for name, tensor in tensors.items():
        if name not in state:
            continue
        if state[name].shape == tensor.shape:
            matched[name] = tensor
        elif (converted := adapt_input_channels(name, tensor, state[name])) is not None:
            matched[name] = converted
            adapted.append(f"{name} (RGB summed to gray)")
        else:
            mismatched.append(f"{name}: file {tuple(tensor.shape)} vs model {tuple(state[name].shape)}")
    if not matched:
        raise DataError(
            f"{source}: none of its {len(tensors)} tensors matches the model's names and shapes "
            f"(e.g. the model has {next(iter(state))}); was it saved from the same model.name and widths?"
        )
    with torch.no_grad():
        for name, tensor in matched.items():
            state[name].copy_(tensor)
    return LoadedWeights(
        loaded=sorted(matched),
        skipped=sorted(set(state) - set(matched)),
        missing=sorted(set(state) - set(tensors)),
        unexpected=sorted(set(tensors) - set(state)),
        mismatched=mismatched,
        renamed=renamed,
        adapted=adapted,
    )
