"""Ensemble members: which weights of which run folders, and each one loaded as a predictor.

A member is a run folder plus the weights to use: `best` (a run, a search trial, a CV fold, any model),
a snapshot file (`train.snapshots`), or a weight average (`swa`/`ema`, shown beside the ensemble for
comparison, never combined). Members must agree on classes and input shape.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dragontrainer.errors import DataError, RunError
from dragontrainer.train.snapshots import snapshot_files

AVERAGES = ("swa", "ema")


@dataclass(frozen=True)
class MemberSpec:
    """`weights`: best | swa | ema | snapshots/<file>; `role`: member (combined) or average (compared)."""

    name: str
    run_dir: str
    weights: str = "best"
    role: str = "member"

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        record = asdict(self)
        if relative_to is not None:
            record["run_dir"] = os.path.relpath(Path(self.run_dir).resolve(), relative_to.resolve())
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any], relative_to: Path | None = None) -> MemberSpec:
        run_dir = Path(record["run_dir"])
        if relative_to is not None and not run_dir.is_absolute():
            run_dir = relative_to / run_dir
        return cls(record["name"], str(run_dir), record.get("weights", "best"), record.get("role", "member"))


def is_run(path: Path) -> bool:
    return (path / "recipe.yaml").is_file()


def runs_in(path: Path) -> list[Path]:
    """A run folder itself, the runs of a `dragon compare` folder, or the run folders inside a folder."""
    if is_run(path):
        return [path]
    summary = path / "summary.json"
    if summary.is_file():
        runs = json.loads(summary.read_text(encoding="utf-8")).get("runs", [])
        found = [Path(r["run_dir"]) for r in runs if "run_dir" in r]
        return [p if p.is_absolute() or p.exists() else path / p for p in found]
    if path.is_dir():
        children = sorted(p for p in path.iterdir() if is_run(p))
        if children:
            return children
    raise RunError(f"{path}: not a run folder, a comparison folder or a folder of runs")


def top_trials(search_dir: Path, top: int) -> list[Path]:
    """The run folders of the `top` best COMPLETE trials of `dragon search` (lower value is better);
    a cross-validated trial gives all its fold runs (`run_dirs`)."""
    trials_file = search_dir / "trials.json"
    if not trials_file.is_file():
        raise RunError(f"{search_dir}: no trials.json (not a dragon search folder)")
    try:
        trials = json.loads(trials_file.read_text(encoding="utf-8"))
        done = [t for t in trials if t.get("state") == "COMPLETE" and isinstance(t.get("value"), (int, float))]
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise RunError(f"{trials_file}: not a list of trials ({exc})") from None
    done = [t for t in done if math.isfinite(t["value"])]
    if not done:
        raise RunError(f"{trials_file}: no COMPLETE trial with a value yet")
    chosen = sorted(done, key=lambda t: (t["value"], t.get("number", 0)))[:top]
    return [search_dir / d for t in chosen for d in (t.get("run_dirs") or [t["run_dir"]])]


def collect_members(
    paths: list[str | Path], *, search: str | Path | None = None, top: int = 5, snapshots: list[str | Path] = ()
) -> list[MemberSpec]:
    """Every member the user named, in order, plus each run's weight averages for comparison."""
    runs: list[Path] = []
    for path in paths:
        runs += runs_in(Path(path))
    if search is not None:
        runs += top_trials(Path(search), top)
    specs = [MemberSpec(member_name(run), str(run)) for run in runs]
    for run in map(Path, snapshots):
        if not is_run(run):
            raise RunError(f"{run}: not a run folder (no recipe.yaml)")
        files = snapshot_files(run)
        if not files:
            raise RunError(f"{run}: no snapshots; train with train.snapshots=cycles or every_k")
        specs += [MemberSpec(f"{member_name(run)}@{f.stem}", str(run), f"snapshots/{f.name}") for f in files]
    if not specs:
        raise RunError("dragon ensemble: no members; name run folders, --search DIR or --snapshots RUN")
    seen: set[tuple[str, str]] = set()
    unique = []
    for spec in specs:
        key = (str(Path(spec.run_dir).resolve()), spec.weights)
        if key not in seen:
            seen.add(key)
            unique.append(spec)
    for run in dict.fromkeys(Path(s.run_dir) for s in unique):
        for kind in AVERAGES:
            if (run / "checkpoints" / kind / "state.json").is_file():
                unique.append(MemberSpec(f"{member_name(run)} ({kind})", str(run), kind, role="average"))
    return unique


def member_name(run: Path) -> str:
    parts = Path(run).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 and parts[-2] not in ("runs", ".") else parts[-1]


# ------------------------------------------------------------------------------------ loading


def load_member(spec: MemberSpec, device: str = "auto") -> Any:
    """The member's run with the chosen weights in its model (a `LoadedRun`)."""
    from safetensors.torch import load_file

    from dragontrainer.api import load_run
    from dragontrainer.train.checkpoint import load_model_weights

    loaded = load_run(spec.run_dir, device=device)
    if spec.weights.startswith("snapshots/"):
        file = loaded.run.checkpoints / spec.weights
        if not file.is_file():
            raise RunError(f"{file}: snapshot missing")
        tensors = load_file(str(file))
        loaded.model.load_state_dict({k: v.to(loaded.device) for k, v in tensors.items()})
    elif spec.weights in AVERAGES:
        load_model_weights(loaded.run.checkpoints / spec.weights, loaded.model)
    loaded.model.eval()
    return loaded


def check_agreement(specs: list[MemberSpec], loaded: list[Any]) -> None:
    """Members must predict the same classes from the same input shape: one line naming the odd one."""
    first, reference = specs[0], loaded[0]
    for spec, member in zip(specs[1:], loaded[1:], strict=True):
        if list(member.classes) != list(reference.classes):
            raise DataError(
                f"ensemble members disagree on classes: {spec.run_dir} has {shorten(member.classes)} but "
                f"{first.run_dir} has {shorten(reference.classes)}"
            )
        if tuple(member.image_shape) != tuple(reference.image_shape):
            raise DataError(
                f"ensemble members disagree on input shape: {spec.run_dir} takes {list(member.image_shape)} but "
                f"{first.run_dir} takes {list(reference.image_shape)}"
            )


def shorten(classes: list[str]) -> str:
    return "[" + ", ".join(map(str, classes[:6])) + (", …" if len(classes) > 6 else "") + f"] ({len(classes)})"


@torch.inference_mode()
def member_logits(loaded: Any, x: torch.Tensor) -> torch.Tensor:
    """Logits (float32, CPU) of uint8 images, in batches, with the member's own preprocessing and TTA."""
    from dragontrainer.data.augment import flip_averaged_logits

    outputs = []
    batch = loaded.recipe.train.eval_batch_size
    for start in range(0, len(x), batch):
        inputs = loaded.preprocessor.apply(x[start : start + batch].to(loaded.device))
        tta = loaded.recipe.augment.tta_flip
        logits = flip_averaged_logits(loaded.model, inputs) if tta else loaded.model(inputs)
        outputs.append(logits.float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0, len(loaded.classes))
