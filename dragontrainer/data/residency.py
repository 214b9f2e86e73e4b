"""Where the training images live, decided in one place (`choose_residency`):

- device: each split is one uint8 tensor on the device, batches are slices of it (data/loader.py);
- stream: the images stay on disk in the decoded cache (image folders, data/cache.py) or in host memory
  (the other sources, which their readers load whole), and a background thread reads each batch
  (data/stream.py).

`data.resident: auto` keeps the images resident when their decoded size takes at most RESIDENT_SHARE
of the memory available (host memory on CPU, which then holds them twice: decoded and split; device
memory on CUDA), else streams; the choice and its reason are printed and written to data.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console

from dragontrainer.data.cache import DecodedCache, open_cache, stored_shape
from dragontrainer.data.image_folder import list_folder
from dragontrainer.data.loader import DeviceLoader
from dragontrainer.data.memo import load_images_once
from dragontrainer.data.sources import ImageSet, resolve_source
from dragontrainer.data.stream import StreamLoader
from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import DataSpec
from dragontrainer.resources import array_bytes, available_memory, gib

RESIDENT_SHARE = 0.5  # room left for the model, activations, the optimiser and everyone else
FIT_BYTES = 64 << 20  # streamed: preprocessing statistics from at most this many bytes of training images


@dataclass(frozen=True)
class Residency:
    mode: Literal["device", "stream"]
    reason: str
    decoded_bytes: int

    def record(self) -> dict[str, Any]:
        """The fields data.json keeps."""
        return {"resident": self.mode, "resident_reason": self.reason, "decoded_bytes": self.decoded_bytes}

    def line(self) -> str:
        return f"data: {'streamed' if self.mode == 'stream' else 'resident on the device'} ({self.reason})"


def choose_residency(spec: DataSpec, decoded_bytes: int, device: torch.device, *, room: int | None = None) -> Residency:
    """device or stream, from data.resident, data.cache_size and (auto) the decoded size vs the memory
    available; `room` overrides the measured memory (tests, benchmarks)."""
    if spec.resident == "device":
        if spec.cache_size is not None:
            raise RecipeError(
                "recipe field data.resident: device cannot crop images stored at data.cache_size; "
                "set data.resident=stream (or auto), or drop data.cache_size"
            )
        return Residency("device", "data.resident=device", decoded_bytes)
    if spec.resident == "stream":
        return Residency("stream", "data.resident=stream", decoded_bytes)
    if spec.cache_size is not None:
        reason = f"data.cache_size={spec.cache_size}: training crops within the stored images"
        return Residency("stream", reason, decoded_bytes)
    where = "host" if device.type == "cpu" else device.type
    if room is None:
        room = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    need = decoded_bytes * (2 if device.type == "cpu" else 1)  # CPU: the decoded set plus its split copies
    share = f"{gib(need)} of {gib(room)} {where} memory available"
    if need <= RESIDENT_SHARE * room:
        return Residency("device", f"auto: decoded images take {share}", decoded_bytes)
    return Residency("stream", f"auto: decoded images would take {share}, above {RESIDENT_SHARE:.0%}", decoded_bytes)


@dataclass
class LoadedImages:
    """The images as a resident set or a streamable array (a memory-mapped cache), with the decision."""

    images: ImageSet
    residency: Residency
    read_rows: Callable[[np.ndarray, np.ndarray], None] | None = None  # a decoded cache's RowFile.read


def load_for_training(
    spec: DataSpec, device: torch.device, console: Console | None = None, *, room: int | None = None
) -> LoadedImages:
    """Image folders are sized before decoding anything and, when streamed, decoded into the cache
    instead of into memory; other sources are loaded (their readers read whole files), then decided."""
    source, notes = resolve_source(spec)
    if source == "image-folder" and spec.path is not None:
        listing = list_folder(spec.path)
        if listing.files and not listing.problems:
            residency = choose_residency(spec, array_bytes(stored_shape(listing, spec)[0], 1), device, room=room)
            if residency.mode == "stream":
                cache = open_cache(listing, spec, console=console)
                classes = named_classes(spec, cache.classes, cache.labels, str(spec.path))
                crop = spec.image_size if spec.cache_size is not None else None
                images = ImageSet(cache.images, cache.labels, classes, notes=[*notes, *cache.notes], crop=crop)
                return LoadedImages(images, residency, cache.rows.read)
    images = load_images_once(spec)
    return LoadedImages(images, choose_residency(spec, images.x.nbytes, device, room=room))


def named_classes(spec: DataSpec, classes: list[str], labels: np.ndarray, origin: str) -> list[str]:
    """data.class_names replaces the folder names when given (it must name every class)."""
    if spec.class_names is None:
        return classes
    if len(spec.class_names) != len(classes):
        raise DataError(
            f"{origin}: data.class_names names {len(spec.class_names)} classes, the folder has {len(classes)}"
        )
    return list(spec.class_names)


def fit_sample(train_rows: np.ndarray, row_bytes: int, seed: int) -> np.ndarray:
    """Positions (into the training split) of the images preprocessing statistics are fitted on when
    streaming: all of them when they fit in FIT_BYTES, else a seeded random subset, sorted for reading."""
    count = max(1, min(len(train_rows), FIT_BYTES // max(row_bytes, 1)))
    if count == len(train_rows):
        return np.arange(len(train_rows))
    picked = np.random.default_rng(seed).choice(len(train_rows), size=count, replace=False)
    return np.sort(picked)


def split_loader(
    loaded: LoadedImages, index: np.ndarray, batch_size: int, *, shuffle: bool, device: torch.device,
    seed: int = 0, balance: str = "none", switch_epoch: int | None = None, shard: tuple[int, int] = (0, 1),
) -> DeviceLoader | StreamLoader:  # fmt: skip
    """The loader of one split (`index` into the images) for the residency chosen: uint8 tensors on the
    device, or rows streamed from the cache / host memory (centre- or random-cropped with data.cache_size).
    `shard=(rank, world)`: each batch is this rank's part of the global batch (DDP)."""
    images = loaded.images
    if loaded.residency.mode == "device":
        rows = torch.from_numpy(np.asarray(index))
        x, y = torch.from_numpy(images.x)[rows].to(device), torch.from_numpy(images.y)[rows].to(device)
        return DeviceLoader(x, y, batch_size, shuffle=shuffle, seed=seed, balance=balance, switch_epoch=switch_epoch,
                            shard=shard)  # fmt: skip
    return StreamLoader(
        images.x, images.y, index, batch_size, shuffle=shuffle, device=device, seed=seed, balance=balance,
        switch_epoch=switch_epoch, crop=images.crop, read_rows=loaded.read_rows, shard=shard,
    )  # fmt: skip


def fit_images(loaded: LoadedImages, train: np.ndarray, seed: int) -> torch.Tensor:
    """Training images (CPU uint8) that preprocessing statistics are fitted on: all of them when resident;
    when streamed, a seeded sample of at most FIT_BYTES (centre crops with data.cache_size)."""
    images = loaded.images
    if loaded.residency.mode == "device":
        return torch.from_numpy(images.x)[torch.from_numpy(np.asarray(train))]
    reader = StreamLoader(images.x, images.y, train, 1, shuffle=False, crop=images.crop, read_rows=loaded.read_rows)
    picked = fit_sample(np.asarray(train), int(np.prod(images.image_shape)), seed)
    return reader.take(picked)[0]


def whole_set_loader(
    spec: DataSpec, device: torch.device, batch_size: int
) -> tuple[ImageSet, DeviceLoader | StreamLoader]:
    """Every image of a data source in file order, for scoring a run on other data (`dragon eval RUN --data`)."""
    loaded = load_for_training(spec, device)
    index = np.arange(len(loaded.images.y))
    return loaded.images, split_loader(loaded, index, batch_size, shuffle=False, device=device)


def cache_images(spec: DataSpec, console: Console | None = None) -> DecodedCache:
    """Decode data.path (an image folder) into the decoded cache now, or find it there unchanged:
    what a streamed run does first (`dragon cache`)."""
    source, _ = resolve_source(spec)
    if source != "image-folder" or spec.path is None:
        raise DataError(
            f"{spec.path or source}: the decoded cache holds image folders; {source} files are read whole "
            "(data.resident=stream streams them from host memory)"
        )
    return open_cache(list_folder(spec.path), spec, console=console)


def image_digests(loader: DeviceLoader | StreamLoader, chunk: int = 1024) -> np.ndarray:
    """A 16-byte BLAKE2 digest of each image of a loader, read `chunk` images at a time: duplicate
    checks on streamed data without holding it (the doctor's split overlap)."""
    import hashlib

    digests = np.empty(loader.num_images, dtype="S16")
    for start in range(0, loader.num_images, chunk):
        images = loader.take(torch.arange(start, min(start + chunk, loader.num_images)))[0].cpu().numpy()
        for offset, image in enumerate(images):
            digests[start + offset] = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
    return digests
