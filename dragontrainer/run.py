"""The run folder: paths, atomic writes, JSON-lines appends, a lock, and provenance.

```
runs/<name>/recipe.yaml  provenance.json  data.json  preprocess.safetensors  metrics.jsonl (+ .csv)  result.json
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
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from dragontrainer.console import printable
from dragontrainer.errors import RunError
from dragontrainer.recipe import Recipe


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename over `path`.

    mkstemp creates the file 0600; it gets the mode `open()` would give (0666 less the umask).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text; a name that was not UTF-8 on disk (surrogate escapes) is written escaped, as \\xNN."""
    atomic_write_bytes(path, printable(text).encode("utf-8"))


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
        self.created: list[Path] = []  # files this process created, in order (cleanup removes only these)
        self.created_dirs: list[Path] = []  # folders this process created, outermost first

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
        """A new run folder: one this process creates, or an existing empty one. A folder holding
        anything else is refused — a run never writes over, or cleans up, files it did not make."""
        path = recipe.run.dir or unique_path(recipe.run.root / default_name(recipe))
        check_usable_folder(path, what="run.dir")
        run = cls(path)
        run.created_dirs = make_folder(path, what="run folder")
        if not os.access(path, os.W_OK):
            raise RunError(f"{path}: the run folder is not writable")
        run_recipe = recipe.model_copy(update={"run": recipe.run.model_copy(update={"dir": path})})
        run.write_text("recipe.yaml", run_recipe.to_yaml())
        run.write_json("provenance.json", provenance())
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(Path(path))
        if not run.recipe_path.is_file():
            raise RunError(f"{path}: not a run folder (no recipe.yaml)")
        return run

    # ------------------------------------------------------------- writing, tracked

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Atomically write a file of the run; remembered if new, so a failed start can remove it."""
        path = self.file(name)
        self._track(path)
        atomic_write_bytes(path, data)
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, printable(text).encode("utf-8"))

    def write_json(self, name: str, value: Any) -> Path:
        return self.write_text(name, json.dumps(value, indent=2) + "\n")

    def _track(self, path: Path) -> None:
        if not path.exists() and path not in self.created:
            self.created.append(path)

    def discard_if_unstarted(self) -> None:
        """Remove what this process created when training never wrote a checkpoint or a metrics line.

        Bad data found at start-up then leaves no half-made run behind. Only paths this process
        created are removed (never anything by name), and folders only when they are empty.
        """
        if self.checkpoints.exists() or self.metrics_path.exists():
            return
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        self.created.clear()
        for folder in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
        self.created_dirs = []

    def remove_stale_temporaries(self) -> list[Path]:
        """Temporary files and checkpoint folders a killed process left behind (only our own naming
        scheme: `.NAME.XXXXXXXX.tmp`, as written by `atomic_write_bytes` and `save_checkpoint`)."""
        removed = []
        for folder in (self.path, self.checkpoints, *self.checkpoints.glob("*/")):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if not TEMPORARY_NAME.fullmatch(entry.name):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def recipe(self) -> Recipe:
        return Recipe.load(self.recipe_path)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Only one process may write a run folder at a time; a second is refused, not interleaved."""
        self._track(self.path / ".lock")
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
        self._track(path)
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
        self.write_metrics_csv()

    def write_metrics_csv(self) -> None:
        """metrics.csv, one row per epoch: a view of metrics.jsonl, rewritten whenever that changes."""
        from dragontrainer.monitor.metrics_csv import write_metrics_csv

        write_metrics_csv(self)

    def keep_stats_through(self, step: int) -> None:
        """Drop monitor lines recorded after optimiser step `step` (and any torn line)."""
        if self.stats_path.exists():
            kept = [r for r in self.stats() if r.get("step", 0) <= step]
            atomic_write_text(self.stats_path, "".join(json.dumps(r) + "\n" for r in kept))


TEMPORARY_NAME = re.compile(r"\.[^/]+\.[A-Za-z0-9_]{8}\.tmp")


def check_usable_folder(path: Path, *, what: str) -> None:
    """A folder we may write into: absent, or an existing empty folder. Anything else is the user's."""
    if path.is_symlink() and not path.exists():
        raise RunError(f"{path}: a broken symbolic link; choose another {what}")
    if not path.exists():
        return
    if not path.is_dir():
        raise RunError(f"{path}: exists and is not a folder; choose another {what}")
    try:
        empty = next(path.iterdir(), None) is None
    except OSError as exc:
        raise RunError(f"{path}: cannot be read ({exc.strerror})") from None
    if empty:
        return
    if (path / "recipe.yaml").is_file():
        raise RunError(f"{path}: a run already exists here; continue it with `dragon resume {path}` or set run.dir")
    raise RunError(f"{path}: not empty and not a dragontrainer run; choose another {what}")


def open_plan_folder(
    out: Path, plan: dict[str, Any], *, file_name: str, kind: str, same: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any] | None:
    """An orchestrator's folder (comparison, ensemble, fine-tuning study): the saved plan when `out` holds
    the same one (so the command continues), None after starting a new or empty folder with `plan`;
    a different plan, an unreadable one or anybody else's files are refused untouched."""
    path = out / file_name
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RunError(f"{path}: not readable JSON; choose another --out") from None
        if not isinstance(saved, dict) or not (same(saved) if same else saved == plan):
            raise RunError(f"{out}: holds a different {kind}; choose another --out")
        return saved
    check_usable_folder(out, what="--out")
    make_folder(out, what=f"{kind} folder")
    atomic_write_json(path, plan)
    return None


def make_folder(path: Path, *, what: str) -> list[Path]:
    """mkdir -p that returns the folders it created (outermost first), for exact cleanup."""
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{path}: cannot create the {what} ({exc.strerror})") from None
    return list(reversed(missing))


def unique_path(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when runs started in the same second."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def default_name(recipe: Recipe) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = recipe.model.name.rpartition(":")[2]  # package.module:factory -> factory
    data = recipe.data.source if recipe.data.source != "auto" else (recipe.data.path or Path("digits")).stem
    return f"{stamp}-{model}-{data}"


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
