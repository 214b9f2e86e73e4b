"""Several ranks on this machine from Python: `train(recipe, nproc=N)` and `resume(run, nproc=N)` run
`python -m dragontrainer train|resume ...` under torchrun (standalone rendezvous) and read the result back
from the run folder, which the parent names before the ranks start (so it knows where to look)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dragontrainer.errors import RecipeError, RunError
from dragontrainer.recipe import Recipe
from dragontrainer.run import RunDir, check_usable_folder, default_name, unique_path
from dragontrainer.train.callbacks import Callback
from dragontrainer.train.checkpoint import checkpoint_folder
from dragontrainer.train.distributed import check_nproc, launch
from dragontrainer.train.outcomes import TrainResult


def train_ranks(
    recipe: Recipe, nproc: int, *, callbacks: Sequence[Callback] = (), progress: bool = False
) -> TrainResult:
    """Train `recipe` with `nproc` ranks into a new run folder; the result as `train` returns it."""
    refuse_callbacks(callbacks, nproc)
    check_nproc(nproc, recipe.train.device)
    path = recipe.run.dir or unique_path(recipe.run.root / default_name(recipe))
    check_usable_folder(path, what="run.dir")
    pinned = recipe.with_overrides({"run.dir": str(path)})
    with tempfile.TemporaryDirectory(prefix="dragon-ranks-") as folder:
        recipe_file = Path(folder) / "recipe.yaml"
        recipe_file.write_text(pinned.to_yaml(), encoding="utf-8")
        code = launch(["train", str(recipe_file), *([] if progress else ["--quiet"])], nproc)
    return collect(path, code, nproc)


def resume_ranks(
    run_dir: str | Path, overrides: Sequence[str], nproc: int, *, callbacks: Sequence[Callback] = (),
    progress: bool = False,
) -> TrainResult:  # fmt: skip
    """Continue a run with `nproc` ranks (any number: the sample order does not depend on it)."""
    refuse_callbacks(callbacks, nproc)
    run = RunDir.open(run_dir)
    check_nproc(nproc, run.recipe().train.device)
    code = launch(["resume", str(run.path), *overrides, *([] if progress else ["--quiet"])], nproc)
    return collect(run.path, code, nproc)


def refuse_callbacks(callbacks: Sequence[Callback], nproc: int) -> None:
    if callbacks:
        raise RecipeError(
            f"nproc={nproc}: Python callbacks cannot travel to the ranks' processes; launch your script with "
            "torchrun instead (every rank calls train(recipe, callbacks=...) itself)"
        )


def collect(path: Path, code: int, nproc: int) -> TrainResult:
    """The finished run's result.json and history as a TrainResult; a failed launch is one line."""
    result_file = Path(path) / "result.json"
    if code != 0 or not result_file.is_file():
        resumable = checkpoint_folder(Path(path) / "checkpoints" / "last") is not None
        raise RunError(
            f"{path}: the {nproc}-rank run stopped (torchrun exit code {code}); what the ranks printed is above"
            + (f"; continue it with: dragon resume {path} --nproc {nproc}" if resumable else "")
        )
    summary = json.loads(result_file.read_text(encoding="utf-8"))
    summary["run_dir"] = Path(summary["run_dir"])
    return TrainResult(**summary, history=RunDir(Path(path)).history())
