"""The image-folder source: one sub-folder per class of PNG/JPEG/... files, decoded with Pillow.

Files whose suffix is not an image suffix (README.txt, .DS_Store, Thumbs.db) are skipped and counted;
a file that claims to be an image and is not is an error — and every such problem of the folder is
reported at once (up to MAX_PROBLEMS), not one per run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dragontrainer.data.sources import IMAGE_SUFFIXES, SOURCES, ImageSet
from dragontrainer.errors import DataError
from dragontrainer.recipe import DataSpec
from dragontrainer.resources import array_bytes, check_fits

MAX_PROBLEMS = 10
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class FolderListing:
    """The image files of a class-folder tree, in a fixed order, with their labels (nothing decoded)."""

    root: Path
    files: list[Path]
    labels: np.ndarray
    classes: list[str]
    skipped: list[Path]
    problems: list[str]

    def notes(self) -> list[str]:
        if not self.skipped:
            return []
        names = ", ".join(sorted({p.name for p in self.skipped})[:5])
        return [f"{self.root}: skipped {len(self.skipped)} file(s) that are not images ({names})"]


def list_folder(root: Path) -> FolderListing:
    """The files an image folder holds: one sub-folder per class, sorted; non-image files skipped."""
    if not root.is_dir():
        raise DataError(f"{root}: image-folder expects a folder with one sub-folder per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders found (expected {root}/<class>/<image>.png)")
    files, labels, skipped, problems = [], [], [], []
    for label, class_dir in enumerate(class_dirs):
        members = sorted(p for p in class_dir.iterdir() if p.is_file())
        images = [p for p in members if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("._")]
        kept = set(images)  # a set: a class folder of 100,000 files is listed in a blink, not minutes
        skipped += [p for p in members if p not in kept]
        if not images:
            what = f"holds no image files ({len(members)} other files)" if members else "is empty"
            problems.append(f"{class_dir}: class folder {what}; every class needs at least one image")
        files += images
        labels += [label] * len(images)
    classes = [d.name for d in class_dirs]
    return FolderListing(root, files, np.array(labels, dtype=np.int64), classes, skipped, problems)


@SOURCES.register("image-folder")
def image_folder(spec: DataSpec) -> ImageSet:
    """One sub-folder per class of PNG/JPEG/... files, decoded with Pillow, resized to data.image_size."""
    assert spec.path is not None
    listing = list_folder(spec.path)
    files, problems = listing.files, list(listing.problems)
    if files and spec.image_size is not None:
        check_fits(array_bytes((len(files), 3, spec.image_size, spec.image_size), 1), f"{len(files):,} images")
    decoded = decode_all(files, spec, problems)
    if problems:
        raise_problems(listing.root, problems)
    arrays = [a for a, _ in decoded]
    check_same_size(arrays, files)
    x = np.stack(arrays).transpose(0, 3, 1, 2)
    if all(is_gray for _, is_gray in decoded):
        x = x[:, :1]  # decoded to RGB, but every file was gray: the three channels are equal
    return ImageSet(x, listing.labels, listing.classes, notes=listing.notes())


def decode_all(files: Sequence[Path], spec: DataSpec, problems: list[str]) -> list[tuple[np.ndarray, bool]]:
    """Decode every file (4 threads: Pillow releases the GIL); problems are collected, not raised one by one.
    The first image's size bounds the memory the whole folder needs, checked before decoding the rest."""
    if not files:
        return []

    def attempt(path: Path) -> tuple[np.ndarray, bool] | None:
        try:
            return decode_image(path, spec)
        except DataError as exc:
            problems.append(str(exc))
            return None

    first = attempt(files[0])
    if first is not None:
        check_fits(
            first[0].nbytes * len(files) * 2, f"{len(files):,} images of {first[0].shape[1]}×{first[0].shape[0]}"
        )
    with ThreadPoolExecutor(max_workers=4) as pool:
        rest = list(pool.map(attempt, files[1:]))
    return [d for d in [first, *rest] if d is not None]


def raise_problems(root: Path, problems: list[str]) -> None:
    problems.sort()  # decoded by threads: a stable order
    shown = "; ".join(problems[:MAX_PROBLEMS])
    more = f"; and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
    if len(problems) == 1:
        raise DataError(problems[0])
    raise DataError(f"{root}: {len(problems)} problems: {shown}{more}")


def decode_image(path: Path, spec: DataSpec, *, short_side: int | None = None) -> tuple[np.ndarray, bool]:
    """Decode one file to an H×W×3 uint8 array (+ whether it was gray); resize if asked: to
    data.image_size square, or with `short_side` (the decoded cache's data.cache_size) the shorter
    side to that size and the centre square cut out, so photos of any aspect keep their proportions.
    16-bit and float images are scaled to 8 bits (not clipped at 255)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. palette transparency: harmless here
            with Image.open(path) as image:
                width, height = image.size
                if width * height > spec.max_image_pixels:
                    raise DataError(
                        f"{path}: image has {width * height:,} pixels, above data.max_image_pixels "
                        f"({spec.max_image_pixels:,})"
                    )
                if width == 0 or height == 0:
                    raise DataError(f"{path}: image has no pixels ({width}×{height})")
                is_gray = image.mode in ("1", "L", "LA", *HIGH_BIT_MODES)
                image = to_eight_bit(image) if image.mode in HIGH_BIT_MODES else image
                image = image.convert("RGB")
                if short_side is not None:
                    image = resize_short_side(image, short_side)
                elif spec.image_size is not None:
                    image = image.resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
                return np.asarray(image, dtype=np.uint8), is_gray
    except DataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__})") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None


def decode_for_network(path: Path, spec: DataSpec) -> np.ndarray:
    """An H×W×3 image as the network saw it in evaluation: resized to data.image_size, or, for a run whose
    images were stored at data.cache_size, the shorter side at cache_size and the centre image_size crop."""
    if spec.cache_size is None or spec.image_size is None:
        return decode_image(path, spec)[0]
    pixels = decode_image(path, spec, short_side=spec.cache_size)[0]
    top = (spec.cache_size - spec.image_size) // 2
    return np.ascontiguousarray(pixels[top : top + spec.image_size, top : top + spec.image_size])


def resize_short_side(image: Any, size: int) -> Any:
    """The shorter side scaled to `size` (bilinear), then the centred size×size square."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))


def to_eight_bit(image: object) -> object:
    """A 16-bit (or 32-bit integer / float) gray image as 8-bit 'L', scaled by its format's range."""
    from PIL import Image

    values = np.asarray(image)
    if image.mode == "F":  # type: ignore[attr-defined]
        scaled = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
    else:
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0  # type: ignore[attr-defined]
        scaled = values.astype(np.float64) * (255.0 / top)
    return Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8), mode="L")


def check_same_size(arrays: Sequence[np.ndarray], files: Sequence[Path]) -> None:
    first = arrays[0].shape[:2]
    for array, path in zip(arrays, files, strict=True):
        if array.shape[:2] != first:
            raise DataError(
                f"{path}: image is {array.shape[1]}×{array.shape[0]} but {files[0]} is "
                f"{first[1]}×{first[0]}; set data.image_size=S to resize all images to S×S"
            )
