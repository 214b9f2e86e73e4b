"""Checkpoints: model weights as safetensors, optimiser tensors as safetensors, the rest as JSON.

A checkpoint is a folder (`checkpoints/last/`) written whole into a temporary folder and swapped in
by rename, so a crash leaves either the previous checkpoint or the new one, never a mix.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dragontrainer.errors import RunError, shorten
from dragontrainer.run import current_umask, fsync_dir
from dragontrainer.run_files import CheckpointState, checked_json, read_tensors

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def save_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]
) -> None:
    """Write model, optimiser and JSON state into `folder`, atomically replacing any previous one."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{folder.parent}: cannot create the checkpoint folder ({exc.strerror})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700: give it the mode mkdir would
        _save_tensors(tmp / MODEL_FILE, model.state_dict())
        if optimizer is not None:
            tensors, structure = split_optimizer_state(optimizer.state_dict())
            _save_tensors(tmp / OPTIMIZER_FILE, tensors)
            state = {**state, "optimizer": structure}
        _write_synced(tmp / STATE_FILE, json.dumps(state).encode("utf-8"))
        fsync_dir(tmp)
        old = folder.parent / f".{folder.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunError(
            f"{folder}: cannot write the checkpoint ({exc.strerror or exc}); the previous checkpoint is intact"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_folder(folder: Path) -> Path | None:
    """The folder to read: `folder`, or the previous one if a crash hit between the two renames."""
    if (folder / STATE_FILE).is_file():
        return folder
    old = folder.parent / f".{folder.name}.old"
    return old if (old / STATE_FILE).is_file() else None


def load_state(folder: Path) -> dict[str, Any]:
    found = checkpoint_folder(folder)
    if found is None:
        raise RunError(f"{folder}: no checkpoint here")
    return checked_json(found / STATE_FILE, CheckpointState)  # validated: a bad file is one line naming it


def load_model_weights(folder: Path, model: torch.nn.Module) -> None:
    found = checkpoint_folder(folder)
    if found is None:
        raise RunError(f"{folder}: no checkpoint here")
    tensors = _load_tensors(found / MODEL_FILE)
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in tensors.items()})
    except RuntimeError as exc:
        raise RunError(
            f"{found / MODEL_FILE}: weights do not fit the recipe's model ({str(exc).splitlines()[0]})"
        ) from None


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, structure: dict[str, Any]) -> None:
    found = checkpoint_folder(folder)
    assert found is not None
    tensors = _load_tensors(found / OPTIMIZER_FILE)
    try:
        optimizer.load_state_dict(join_optimizer_state(tensors, structure))
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise RunError(
            f"{found}: the optimiser state does not fit the recipe's optimiser ({shorten(exc, 120)})"
        ) from None


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimiser state -> (tensors for safetensors, JSON-able structure with everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        plain[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain[str(index)][key] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in structure["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": structure["param_groups"]}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    path.chmod(0o666 & ~current_umask())  # safetensors creates it 0600
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
