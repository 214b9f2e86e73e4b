"""The run folder: paths, atomic writes, JSON-lines appends, a lock, and provenance.

```
runs/<name>/recipe.yaml  provenance.json  data.json  preprocess.safetensors  metrics.jsonl  result.json
runs/<name>/checkpoints/{last,best}/{model.safetensors, optimizer.safetensors, state.json}
```
Every file is written atomically (temporary file, flush, fsync, rename), so a killed run never
leaves a half-written file behind; a torn last line of a .jsonl file is dropped when read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from dragontrainer.errors import RunError
from dragontrainer.recipe import Recipe


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line; a torn (unterminated or unparsable) last line is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class RunDir:
    """One training run's folder. Create with `RunDir.create(recipe)`, reopen with `RunDir.open(path)`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # ---------------------------------------------------------------------- paths

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def file(self, name: str) -> Path:
        return self.path / name

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, recipe: Recipe) -> RunDir:
        """A new, empty run folder; an existing run there is refused (resume it instead)."""
        path = recipe.run.dir or unique_path(recipe.run.root / default_name(recipe))
        if (path / "recipe.yaml").exists():
            raise RunError(f"{path}: a run already exists here; continue it with `dragon resume {path}` or set run.dir")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"{path}: cannot create the run folder ({exc.strerror})") from None
        if not os.access(path, os.W_OK):
            raise RunError(f"{path}: the run folder is not writable")
        run = cls(path)
        run_recipe = recipe.model_copy(update={"run": recipe.run.model_copy(update={"dir": path})})
        atomic_write_text(run.recipe_path, run_recipe.to_yaml())
        atomic_write_json(run.file("provenance.json"), provenance())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(Path(path))
        if not run.recipe_path.is_file():
            raise RunError(f"{path}: not a run folder (no recipe.yaml)")
        return run

    def discard_if_unstarted(self) -> None:
        """Remove a run folder this process just created when training never wrote a checkpoint.

        Bad data found at start-up then leaves no half-made run behind; anything else stays.
        """
        if self.checkpoints.exists() or self.metrics_path.exists():
            return
        for name in (
            "recipe.yaml",
            "provenance.json",
            "data.json",
            "preprocess.safetensors",
            "init.safetensors",
            "augment_samples.safetensors",
            "param_groups.json",
            "stats.jsonl",
            ".lock",
        ):
            (self.path / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def recipe(self) -> Recipe:
        return Recipe.load(self.recipe_path)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Only one process may write a run folder at a time; a second is refused, not interleaved."""
        handle = (self.path / ".lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunError(f"{self.path}: another dragon process is writing this run folder") from None
        try:
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    # ------------------------------------------------------------------- metrics

    @property
    def stats_path(self) -> Path:
        return self.path / "stats.jsonl"

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.append_lines(self.metrics_path, [record])

    def append_stats(self, records: list[dict[str, Any]]) -> None:
        self.append_lines(self.stats_path, records)

    def append_lines(self, path: Path, records: list[dict[str, Any]]) -> None:
        """Append lines in one write and fsync: a line is either wholly there or (torn) dropped on resume."""
        if not records:
            return
        try:
            with path.open("a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(r) + "\n" for r in records))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise RunError(f"{path}: cannot append ({exc.strerror})") from None

    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def stats(self) -> list[dict[str, Any]]:
        return read_jsonl(self.stats_path)

    def keep_metrics_through(self, epoch: int) -> None:
        """Drop lines of epochs after `epoch` (and any torn line): the state a checkpoint matches."""
        kept = [r for r in self.history() if r.get("epoch", 0) <= epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def keep_stats_through(self, step: int) -> None:
        """Drop monitor lines recorded after optimiser step `step` (and any torn line)."""
        if self.stats_path.exists():
            kept = [r for r in self.stats() if r.get("step", 0) <= step]
            atomic_write_text(self.stats_path, "".join(json.dumps(r) + "\n" for r in kept))


def unique_path(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when runs started in the same second."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def default_name(recipe: Recipe) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{recipe.model.name}-{recipe.data.source}"


def provenance() -> dict[str, Any]:
    """What produced the run: command line, versions of Python and the packages that shape results."""
    packages = {}
    for name in ("dragontrainer", "torch", "numpy", "kornia", "scikit-learn", "pillow", "pydantic"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
    }
