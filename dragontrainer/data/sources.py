"""Data sources: each returns an ImageSet of uint8 NCHW images, int64 labels and class names.

Nothing here downloads anything. The embedded default is scikit-learn's `load_digits`; the other
sources read the standard on-disk formats (`image_folder.py`, `archives.py`). Every problem with a
file is a DataError naming it; sizes a file declares are checked before anything is allocated.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dragontrainer.errors import DataError
from dragontrainer.recipe import DataSpec
from dragontrainer.registry import Registry
from dragontrainer.resources import array_bytes, check_fits, count_classes

SOURCES: Registry[Callable[[DataSpec], ImageSet]] = Registry("data source")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), one name per class."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    flip_safe: bool = True  # False where a mirrored image means something else (digits, letters)
    notes: list[str] = field(default_factory=list)  # what loading inferred or skipped, told to the user once
    official_test: np.ndarray | None = None  # MNIST/CIFAR: True for images of the official test files
    # npz label arrays beyond one label per image: "y" -> an N×T matrix (T columns), "<task>" -> the N labels
    # of array y_<task>; `y` above is then the first column (or the first y_<task>) for the split
    task_labels: dict[str, np.ndarray] | None = None
    task_classes: dict[str, list[str]] | None = None  # npz classes_<task>: class names of a named task
    crop: int | None = None  # stored larger (data.cache_size): the network sees crop×crop images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape the network sees: (C, H, W) of an image, or of its crop."""
        if self.crop is not None:
            return (self.x.shape[1], self.crop, self.crop)
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


def load_images(spec: DataSpec) -> ImageSet:
    """Load the source named in the recipe (or inferred from data.path), then resize / convert colour."""
    source, notes = resolve_source(spec)
    images = SOURCES.get(source)(spec)
    images.notes[:0] = notes
    return finish(images, spec, origin=str(spec.path or source))


def resolve_source(spec: DataSpec) -> tuple[str, list[str]]:
    """The source to read: as given, or inferred from the path (`auto`); never silently the digits."""
    if spec.path is not None and not spec.path.exists():
        raise DataError(f"{spec.path}: no such file or folder (data.path)")
    if spec.source == "auto":
        if spec.path is None:
            return "digits", []
        source = guess_source(spec.path)
        return source, [f"data.source inferred from {spec.path}: {source} (set data.source to override)"]
    if spec.source == "digits" and spec.path is not None:
        raise DataError(
            f"data.path={spec.path} was given with data.source=digits, which reads no file; "
            "drop data.source (it is inferred from the path) or set it to npz, image-folder, cifar or mnist-idx"
        )
    if spec.source != "digits" and spec.path is None:
        raise DataError(f"data.path: source {spec.source!r} needs a file or folder path")
    return spec.source, []


def guess_source(path: Path) -> str:
    """The data source a path looks like: .npz file, IDX files, CIFAR batches, or class folders."""
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise DataError(f"{path}: cannot tell the data format; set data.source (npz, image-folder, cifar, mnist-idx)")
    names = [p.name for p in path.iterdir()] if path.is_dir() else []
    if any("idx3" in n for n in names):
        return "mnist-idx"
    cifar_marks = {"data_batch_1", "data_batch_1.bin", "train.bin", "batches.meta", "batches.meta.txt", "meta"}
    if cifar_marks & set(names) or any(n.startswith("cifar-") and (path / n).is_dir() for n in names):
        return "cifar"
    return "image-folder"


def finish(images: ImageSet, spec: DataSpec, origin: str) -> ImageSet:
    """Checks and conversions every source shares: labels in range, size, colour, names."""
    x, y, classes = images.x, images.y, images.classes
    if len(x) == 0:
        raise DataError(f"{origin}: the dataset holds no images")
    if len(x) != len(y):
        raise DataError(f"{origin}: {len(x)} images but {len(y)} labels")
    if min(x.shape[2:]) == 0:
        raise DataError(f"{origin}: images are {x.shape[3]}×{x.shape[2]} pixels; they need at least one pixel")
    if spec.class_names is not None:
        classes = list(spec.class_names)
    num_classes = len(classes)
    if y.min() < 0 or y.max() >= num_classes:
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise DataError(f"{origin}: label {bad} is outside 0..{num_classes - 1} ({num_classes} classes)")
    if spec.image_size is not None and x.shape[2:] != (spec.image_size, spec.image_size):
        size = spec.image_size
        check_fits(
            array_bytes((len(x), x.shape[1], size, size), 1) * 2, f"data.image_size={size} for {len(x):,} images"
        )
        x = resize_uint8(x, size)
    x = convert_color(x, spec.color)
    return ImageSet(np.ascontiguousarray(x), y.astype(np.int64), classes, images.flip_safe, images.notes,
                    images.official_test, images.task_labels, images.task_classes)  # fmt: skip


def resize_uint8(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 NCHW batch, in chunks to bound memory."""
    out = np.empty((len(x), x.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(x), 4096):
        chunk = torch.from_numpy(x[start : start + 4096]).float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 4096] = resized.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def convert_color(x: np.ndarray, color: str) -> np.ndarray:
    """gray -> rgb repeats the channel; rgb -> gray uses ITU-R 601 luma weights; auto keeps."""
    channels = x.shape[1]
    if color == "rgb" and channels == 1:
        return np.repeat(x, 3, axis=1)
    if color == "gray" and channels == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
        return np.round((x.astype(np.float32) * weights).sum(1, keepdims=True)).astype(np.uint8)
    return x


LABEL_LIMIT = 2**62  # integers beyond this cannot be labels (and would overflow int64 on conversion)


def labels_from_array(y: np.ndarray, origin: str) -> np.ndarray:
    """Integer labels from any numeric array: whole numbers only, no NaN, one per image."""
    try:
        y = np.asarray(y)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DataError(f"{origin}: labels must be a flat list of integers ({type(exc).__name__})") from None
    if y.ndim != 1:
        raise DataError(f"{origin}: labels must be a 1-D array, got shape {y.shape}")
    if y.dtype.kind == "b" or y.dtype.kind not in "iuf":
        raise DataError(f"{origin}: labels must be integers, got dtype {y.dtype}")
    if y.dtype.kind == "f" and (not np.isfinite(y).all() or not np.equal(np.mod(y, 1), 0).all()):
        raise DataError(f"{origin}: labels must be whole numbers, found a non-integer value")
    if len(y) and y.min() < 0:
        raise DataError(f"{origin}: label {y.min():.0f} is negative; labels must be 0..C-1")
    if len(y) and y.max() >= LABEL_LIMIT:
        largest = int(y.max()) if y.dtype.kind in "iu" else f"{y.max():.0f}"
        raise DataError(f"{origin}: label {largest} is not a class index; labels must be 0..C-1")
    return y.astype(np.int64)


def pixels_to_uint8(x: np.ndarray, origin: str) -> np.ndarray:
    """uint8 stays; floats in [0, 1] are scaled by 255, other floats clipped to [0, 255]."""
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "iuf":
        raise DataError(f"{origin}: pixels must be numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        bad_image = int(np.nonzero(~finite.reshape(len(x), -1).all(axis=1))[0][0])
        raise DataError(f"{origin}: pixels contain {int((~finite).sum())} NaN/Inf values (first in image {bad_image})")
    if len(x) and x.max() <= 1.0 and x.min() >= 0.0:
        x = x * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def numbered_classes(y: np.ndarray, origin: str) -> list[str]:
    """Class names '0'..'C-1' for labelled data without names (bounded: see `count_classes`)."""
    return [str(c) for c in range(count_classes(y, origin))]


# ------------------------------------------------------------------------------ digits


@SOURCES.register("digits")
def digits(spec: DataSpec) -> ImageSet:
    """scikit-learn's embedded handwritten digits: 1,797 gray 8×8 images, 10 classes, no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    return ImageSet(x, y, [str(c) for c in bunch.target_names], flip_safe=False)


@SOURCES.register("auto")
def auto(spec: DataSpec) -> ImageSet:
    """Inferred from data.path: a .npz file, IDX files, CIFAR batches or class folders; no path: digits."""
    raise AssertionError("resolved by load_images")  # pragma: no cover - listed for `dragon components`


# --------------------------------------------------------------------------------- npz


@SOURCES.register("npz")
def npz(spec: DataSpec) -> ImageSet:
    """A NumPy .npz with `x` (N×H×W or N×H×W×C, uint8 or float) and `y` (N ints); optional `classes`.
    Several labels per image: `y` as an N×T matrix, or named arrays `y_<task>` (see `read_task_labels`)."""
    path = spec.path
    assert path is not None
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":  # an .npz is a zip archive of .npy files
            raise DataError(f"{path}: not a readable .npz file (expected a zip archive written by numpy.savez)")
    arrays = read_npz(path)
    named_tasks = [key for key in arrays if key.startswith("y_")]
    for key in ("x", "y"):
        if key not in arrays and not (key == "y" and named_tasks):
            raise DataError(f"{path}: missing array {key!r} (found: {', '.join(sorted(arrays)) or 'none'})")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: x must be N×H×W or N×H×W×C with C in (1, 3), got shape {x.shape}")
    x = pixels_to_uint8(x, f"{path}: x")
    task_labels = read_task_labels(arrays, len(x), path)
    if task_labels is None:
        y = labels_from_array(arrays["y"], f"{path}: y")
    else:  # the split is stratified on the first column (or the first named task)
        first = next(iter(task_labels.values()))
        y = first if first.ndim == 1 else first[:, 0]
    named = "classes" in arrays and (task_labels is None or "y" in task_labels)
    classes = [str(c) for c in arrays["classes"].tolist()] if named else numbered_classes(y, f"{path}: y")
    task_classes = {key[len("classes_") :]: [str(c) for c in arrays[key].tolist()]
                    for key in arrays if key.startswith("classes_")}  # fmt: skip
    return ImageSet(x, y, classes, task_labels=task_labels, task_classes=task_classes or None)


def read_task_labels(arrays: dict[str, np.ndarray], num_images: int, path: Path) -> dict[str, np.ndarray] | None:
    """Labels beyond one per image: `y` as an N×T integer matrix (T label columns, or a 0/1 multi-label
    matrix) and/or named arrays `y_<task>` of N integer labels each. None for a plain 1-D `y`."""
    named = {key[2:]: value for key, value in arrays.items() if key.startswith("y_")}
    if not named and ("y" not in arrays or np.ndim(arrays["y"]) == 1):
        return None
    tasks: dict[str, np.ndarray] = {}
    if "y" in arrays:
        y = np.asarray(arrays["y"])
        if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] == 0):
            raise DataError(f"{path}: y must be N labels or an N×T matrix of labels, got shape {y.shape}")
        tasks["y"] = labels_from_array(y.reshape(-1), f"{path}: y").reshape(y.shape)
    for name, labels in named.items():
        if not name:
            raise DataError(f"{path}: array 'y_' has no task name (name label arrays y_<task>, e.g. y_parity)")
        tasks[name] = labels_from_array(labels, f"{path}: y_{name}")
    for name, labels in tasks.items():
        if len(labels) != num_images:
            array = "y" if name == "y" else f"y_{name}"
            raise DataError(f"{path}: {array} holds {len(labels)} labels but x holds {num_images} images")
    return tasks


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the archive, after checking each member's declared shape against its stored size
    and the memory available (a 10-byte member may not claim to be a 10¹²-element array)."""
    declared = npz_member_sizes(path)
    check_fits(sum(declared.values()), f"{path}: its arrays")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(f"{path}: holds object arrays, which are refused (no pickle is ever loaded)") from None
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


def npz_member_sizes(path: Path) -> dict[str, int]:
    """Bytes each .npy member declares in its header, read without loading (or decompressing) its data."""
    sizes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                        version, np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(member)
                    stored = info.file_size - member.tell()  # the data after the header
                name = info.filename.removesuffix(".npy")
                if dtype.hasobject:
                    raise DataError(f"{path}: array {name!r} holds object arrays: refused (no pickle is ever loaded)")
                nbytes = array_bytes(shape, dtype.itemsize)
                if nbytes > stored:
                    raise DataError(
                        f"{path}: array {name!r} declares shape {tuple(shape)} ({nbytes:,} bytes) but its member "
                        f"holds only {stored:,} bytes"
                    )
                sizes[name] = nbytes
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise DataError(f"{path}: an array header is not valid ({exc})") from None
    return sizes


import dragontrainer.data.archives  # noqa: E402  (registers cifar, mnist-idx)
import dragontrainer.data.image_folder  # noqa: E402  (registers image-folder)


def __getattr__(name: str) -> object:
    """decode_image / decode_for_network, re-exported lazily: image_folder imports this module, so a
    name import here would fail whenever image_folder is imported first (the decoded cache does)."""
    if name in ("decode_image", "decode_for_network"):
        return getattr(dragontrainer.data.image_folder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
