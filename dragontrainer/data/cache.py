"""The decoded cache: an image folder decoded once, in parallel, into a memory-mapped uint8 array on disk.

```
<cache root>/                  data.cache, else $XDG_CACHE_HOME/dragontrainer (~/.cache/dragontrainer)
  CACHEDIR.TAG                 marks the folder as a cache (backup tools skip it); a folder without it is
                               written into only when it is empty
  <key>/                       a complete cache, never modified: images.npy (N×C×H×W uint8), labels.npy,
                               manifest.json (classes, files, shape, settings)
  <key>.partial/               a build in progress or interrupted: never read as a cache; chunks.json lists
                               the chunks already decoded, so the next build continues from them
  <key>.lock                   one builder per key at a time
```
The key hashes the file list (relative names, sizes, modification times), the class names and the
decode settings (data.image_size, data.cache_size, data.color, data.max_image_pixels): a changed folder
gets a new key and is decoded again, an unchanged one is opened without decoding anything. Chunks of
files are decoded by worker processes (Pillow holds the GIL for part of its work; processes use every
core), each writing its rows straight into the memory-mapped array. Only a complete build is renamed to
`<key>/`; once it is, older caches of the same folder are removed (they are the cache's own files).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import mmap
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dragontrainer.console import text
from dragontrainer.data.image_folder import FolderListing, decode_image, raise_problems
from dragontrainer.errors import DataError
from dragontrainer.recipe import DataSpec
from dragontrainer.resources import array_bytes
from dragontrainer.run import atomic_write_json, atomic_write_text, fsync_dir

CACHE_VERSION = 1
CHUNK_IMAGES = 256  # images per task: a progress tick and a resume point
CHUNK_BYTES = 64 << 20  # a worker's buffer: fewer images per chunk when they are large
RECORD_SECONDS = 2.0  # finished chunks are made durable and recorded at most this often
TAG_NAME = "CACHEDIR.TAG"
TAG = "Signature: 8a477f597d28d172789f06886806bc55\n# dragontrainer's decoded image cache (see bench/ and README)\n"
ENTRY = re.compile(r"^[0-9a-f]{24}(\.partial|\.lock)?$")


@dataclass
class DecodedCache:
    """A complete cache opened read-only: `images` is a view of the mapped file (nothing read yet);
    `rows` reads rows with pread, which the stream loader uses (see RowFile)."""

    path: Path
    images: np.ndarray  # (N, C, H, W) uint8, read-only, backed by the file
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    manifest: dict[str, Any]
    rows: RowFile
    decoded: int = 0  # images this call decoded (0: the cache was reused as it was)
    notes: list[str] = field(default_factory=list)


class RowFile:
    """Rows of the array file read with pread into the caller's buffer.

    Reading through the memory map would count every page touched in the process's resident set
    (with large page-cache folios, up to megabytes per row) until unmapped; pread copies from the
    page cache and leaves the resident set alone, so a streamed epoch over a file larger than memory
    keeps the process's RSS at its buffers."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], channels: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.offset, self.stored = offset, shape  # the file's shape (3 channels even when all gray)
        self.channels = channels  # channels handed out (1 when every image was gray)
        self.row_bytes = int(np.prod(shape[1:]))

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        """out[i] = image rows[i]; `rows` ascending: runs of consecutive rows are read as one."""
        if self.channels != self.stored[1]:
            full = np.empty((len(rows), *self.stored[1:]), dtype=np.uint8)
            self._read_runs(rows, full)
            out[...] = full[:, : self.channels]
            return
        self._read_runs(rows, out)

    def _read_runs(self, rows: np.ndarray, out: np.ndarray) -> None:
        flat = out.reshape(len(rows), -1)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # where a run of consecutive rows begins
        for begin, end in zip(starts, [*starts[1:], len(rows)], strict=True):
            view = memoryview(flat[begin:end]).cast("B")
            position = self.offset + int(rows[begin]) * self.row_bytes
            while len(view):
                got = os.preadv(self.fd, [view], position)
                if got <= 0:
                    raise DataError(f"{self.path}: the decoded cache ended early; delete its folder to decode again")
                view, position = view[got:], position + got


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dragontrainer"


def cache_settings(spec: DataSpec) -> dict[str, Any]:
    """The recipe fields that change the decoded pixels (and so the key)."""
    return {
        "image_size": spec.image_size,
        "cache_size": spec.cache_size,
        "color": spec.color,
        "max_image_pixels": spec.max_image_pixels,
    }


def cache_key(listing: FolderListing, spec: DataSpec) -> str:
    """A hash of every file's relative name, size and modification time, the classes and the settings."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, listing.classes, cache_settings(spec)]).encode())
    for path in listing.files:
        try:
            stat = path.stat()
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
        digest.update(os.fsencode(path.relative_to(listing.root)) + b"\0")
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def open_cache(
    listing: FolderListing, spec: DataSpec, *, console: Console | None = None, workers: int | None = None
) -> DecodedCache:
    """The folder's decoded cache: opened as it is when complete, else built (or its build continued)."""
    root = prepare_root(spec.cache or default_root())
    key = cache_key(listing, spec)
    final = root / key
    if not (final / "manifest.json").is_file():
        with build_lock(root / f"{key}.lock", console):
            if not (final / "manifest.json").is_file():  # another process may have finished it meanwhile
                decoded = build_or_say_why(root / f"{key}.partial", final, listing, spec, console, workers)
                prune_superseded(root, key, {"source": str(listing.root), "settings": cache_settings(spec)})
                cache = read_cache(final)
                cache.decoded = decoded
                return cache
    return read_cache(final)


def build_or_say_why(
    partial: Path, final: Path, listing: FolderListing, spec: DataSpec, console: Console | None, workers: int | None
) -> int:
    """`build`, with a failure to write (or a worker lost) as one line; what was done stays for next time."""
    try:
        return build(partial, final, listing, spec, console, workers)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        raise DataError(
            f"{partial}: cannot write the decoded cache ({exc.strerror or exc}); free space or set data.cache=PATH, "
            "then the same command continues the build"
        ) from None
    except BrokenProcessPool:
        raise DataError(
            f"{partial}: a decoding worker process died (out of memory?); the same command continues the build "
            "from its finished chunks"
        ) from None


def prepare_root(root: Path) -> Path:
    """The cache folder, created and tagged; an existing folder that is not a cache is used only if empty."""
    root = root.expanduser()
    try:
        if root.exists() and not root.is_dir():
            raise DataError(f"{root}: data.cache names a file; it must be a folder for decoded caches")
        if not (root / TAG_NAME).is_file():
            if root.is_dir() and any(root.iterdir()):
                raise DataError(
                    f"{root}: data.cache names a folder that holds other files and is not a dragontrainer cache "
                    f"(no {TAG_NAME}); name a new or empty folder"
                )
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / TAG_NAME, TAG)
    except OSError as exc:
        raise DataError(f"{root}: cannot use as the decoded-image cache (data.cache): {exc.strerror}") from None
    return root


@contextmanager
def build_lock(path: Path, console: Console | None) -> Iterator[None]:
    """One builder per key (POSIX lock: released when the holder dies, not inherited by workers)."""
    with path.open("a+b") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if console is not None:
                console.print(f"waiting for another process that is decoding into {text(path.with_suffix(''))}")
            fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------- building


@dataclass(frozen=True)
class ChunkTask:
    number: int
    start: int
    files: list[Path]
    array_path: Path
    offset: int  # where the array's data starts in the file (after the .npy header)
    row_shape: tuple[int, int, int]
    spec: DataSpec
    frame: tuple[int, int] | None  # the (height, width) every image must have, when no size is set


@dataclass(frozen=True)
class ChunkResult:
    number: int
    all_gray: bool
    problems: list[str]


def build(
    partial: Path, final: Path, listing: FolderListing, spec: DataSpec, console: Console | None, workers: int | None
) -> int:
    """Decode the chunks `partial` still lacks, then rename it to `final`; returns the images decoded."""
    if listing.problems:
        raise_problems(listing.root, list(listing.problems))
    shape, frame = stored_shape(listing, spec)
    array_path, chunks_path = partial / "images.npy", partial / "chunks.json"
    done = completed_chunks(chunks_path, array_path, shape)
    if not done:
        start_partial(partial, shape, listing, spec)
    offset = map_array(array_path)[1]
    chunk = max(1, min(CHUNK_IMAGES, CHUNK_BYTES // array_bytes(shape[1:], 1)))
    tasks = [
        ChunkTask(n, start, listing.files[start : start + chunk], array_path, offset, shape[1:], spec, frame)
        for n, start in enumerate(range(0, len(listing.files), chunk))
        if str(n) not in done
    ]
    decoded, problems, recorded = 0, [], time.monotonic()
    left = len(listing.files) - sum(len(t.files) for t in tasks)
    with decode_progress(console, len(listing.files), left) as bar, array_path.open("rb") as array:
        for task, result in run_tasks(tasks, workers):
            bar.advance(bar.task_ids[0], len(task.files))
            decoded += len(task.files)
            if result.problems:
                problems += result.problems
                continue
            done[str(result.number)] = result.all_gray
            if time.monotonic() - recorded > RECORD_SECONDS:
                record_chunks(array, chunks_path, done)
                recorded = time.monotonic()
        record_chunks(array, chunks_path, done)
    if problems:
        raise_problems(listing.root, problems)
    finish(partial, final, listing, spec, shape, all(done.values()))
    return decoded


def record_chunks(array: BinaryIO, chunks_path: Path, done: dict[str, bool]) -> None:
    """The finished chunks, written only after their rows are on disk (one fsync for many chunks, from
    this process while the workers go on decoding, instead of a synchronous flush in each worker)."""
    os.fsync(array.fileno())
    atomic_write_json(chunks_path, done)


def stored_shape(listing: FolderListing, spec: DataSpec) -> tuple[tuple[int, int, int, int], tuple[int, int] | None]:
    """(N, C, H, W) of the array; without a size, the first image's size (all must share it)."""
    channels = 1 if spec.color == "gray" else 3
    side = spec.cache_size or spec.image_size
    if side is not None:
        return (len(listing.files), channels, side, side), None
    pixels, _ = decode_image(listing.files[0], spec)
    height, width = pixels.shape[:2]
    return (len(listing.files), channels, height, width), (height, width)


def completed_chunks(chunks_path: Path, array_path: Path, shape: tuple[int, ...]) -> dict[str, bool]:
    """Chunks an interrupted build finished, when its array has the expected shape; else none."""
    try:
        done = json.loads(chunks_path.read_text(encoding="utf-8"))
        if tuple(np.load(array_path, mmap_mode="r").shape) == shape and isinstance(done, dict):
            return {str(k): bool(v) for k, v in done.items()}
    except (OSError, ValueError):
        pass
    return {}


def start_partial(partial: Path, shape: tuple[int, ...], listing: FolderListing, spec: DataSpec) -> None:
    if partial.exists():
        shutil.rmtree(partial)  # the cache's own unusable leftover (its chunks list is missing or stale)
    partial.mkdir()
    atomic_write_json(partial / "source.json", {"source": str(listing.root), "settings": cache_settings(spec)})
    np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8, shape=shape).flush()


def run_tasks(tasks: list[ChunkTask], workers: int | None) -> Iterator[tuple[ChunkTask, ChunkResult]]:
    """Each chunk decoded by a worker process (in this process when there is one chunk or one core)."""
    workers = min(workers or len(os.sched_getaffinity(0)), len(tasks))
    if workers <= 1:
        for task in tasks:
            yield task, decode_chunk(task)
        return
    context = multiprocessing.get_context("fork")  # workers use numpy and Pillow only: no torch state to fear
    with ProcessPoolExecutor(workers, mp_context=context, initializer=die_with_parent) as pool:
        futures = {pool.submit(decode_chunk, task): task for task in tasks}
        for future in as_completed(futures):
            yield futures[future], future.result()


def die_with_parent() -> None:
    """A worker ends when the builder is killed (SIGKILL leaves no chance to stop it otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def decode_chunk(task: ChunkTask) -> ChunkResult:
    """Decode one chunk's files into a buffer, then write it to its rows of the array file with one
    pwrite (the chunk's rows are contiguous; made durable by `record_chunks`)."""
    images = np.zeros((len(task.files), *task.row_shape), dtype=np.uint8)
    all_gray, problems = True, []
    for row, path in enumerate(task.files):
        try:
            pixels, is_gray = decode_image(path, task.spec, short_side=task.spec.cache_size)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if task.frame is not None and pixels.shape[:2] != task.frame:
            height, width = task.frame
            problems.append(
                f"{path}: image is {pixels.shape[1]}×{pixels.shape[0]} but the first image is {width}×{height}; "
                "set data.image_size=S (or data.cache_size) to resize all images"
            )
            continue
        images[row] = channels_first(pixels, task.spec.color)
        all_gray &= is_gray
    if not problems:  # a chunk with problems is not recorded: nothing to write
        write_all(task.array_path, memoryview(images).cast("B"), task.offset + task.start * images[0].nbytes)
    return ChunkResult(task.number, all_gray, problems)


def write_all(path: Path, data: memoryview, position: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        while len(data):
            written = os.pwrite(fd, data, position)
            data, position = data[written:], position + written
    finally:
        os.close(fd)


def channels_first(pixels: np.ndarray, color: str) -> np.ndarray:
    """H×W×3 -> 3×H×W, or 1×H×W luma with data.color=gray (the weights `convert_color` uses)."""
    if color == "gray":
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.round(pixels.astype(np.float32) @ weights).astype(np.uint8)[None]
    return pixels.transpose(2, 0, 1)


def finish(
    partial: Path, final: Path, listing: FolderListing, spec: DataSpec, shape: tuple[int, ...], all_gray: bool
) -> None:
    np.save(partial / "labels.npy", listing.labels)
    manifest = {
        "version": CACHE_VERSION,
        "source": str(listing.root),
        "shape": list(shape),
        "all_gray": all_gray,
        "classes": listing.classes,
        "settings": cache_settings(spec),
        "notes": listing.notes(),
        "files": [str(p.relative_to(listing.root)) for p in listing.files],
    }
    atomic_write_json(partial / "manifest.json", manifest)  # last: its presence marks the cache complete
    os.replace(partial, final)
    fsync_dir(final.parent)
    (final / "chunks.json").unlink(missing_ok=True)


@contextmanager
def decode_progress(console: Console | None, total: int, completed: int) -> Iterator[Progress]:
    """A progress bar on a terminal; nothing when quiet (no console) or not a terminal."""
    quiet = console is None or not console.is_terminal
    columns = (TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=quiet, transient=True) as bar:
        bar.add_task("decode", total=total, completed=completed)
        yield bar


def prune_superseded(root: Path, key: str, origin: dict[str, Any]) -> None:
    """Remove the cache's own older entries for the same folder and settings (the folder changed since);
    entries of other settings stay (a comparison of image sizes reuses each)."""
    for entry in root.iterdir():
        match = ENTRY.match(entry.name)
        if not match or entry.name.startswith(key) or match.group(1) == ".lock":
            continue
        record = entry / ("source.json" if match.group(1) else "manifest.json")
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
            if {k: recorded.get(k) for k in origin} != origin:
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        (root / f"{entry.name.removesuffix('.partial')}.lock").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- reading


def read_cache(path: Path) -> DecodedCache:
    """Map a complete cache read-only; a damaged one is a DataError naming it."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        labels = np.load(path / "labels.npy", allow_pickle=False)
        images, offset = map_array(path / "images.npy")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: damaged decoded cache ({exc}); delete this folder to decode again") from None
    if list(images.shape) != manifest.get("shape") or len(labels) != len(images):
        raise DataError(f"{path}: damaged decoded cache (shape differs from manifest.json); delete this folder")
    stored = images.shape
    if manifest.get("all_gray") and manifest["settings"]["color"] == "auto":
        images = images[:, :1]  # decoded as RGB, but every file was gray: the channels are equal
    rows = RowFile(path / "images.npy", offset, stored, images.shape[1])
    return DecodedCache(path, images, labels.astype(np.int64), list(manifest["classes"]), manifest, rows,
                        notes=list(manifest.get("notes", [])))  # fmt: skip


def map_array(path: Path) -> tuple[np.ndarray, int]:
    """A uint8 .npy file as a read-only memory-mapped array, and where its data starts in the file."""
    with path.open("rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
        if dtype != np.uint8 or fortran:
            raise ValueError(f"{path.name} is {dtype}{' Fortran-ordered' if fortran else ''}, expected C-ordered uint8")
        if shape and np.prod(shape) == 0:
            return np.zeros(shape, dtype=np.uint8), offset
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    images = np.frombuffer(mapping, dtype=np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)
    return images, offset
