"""Data sources: each returns an ImageSet of uint8 NCHW images, int64 labels and class names.

Nothing here downloads anything. The embedded default is scikit-learn's `load_digits`; the other
sources read the standard on-disk formats. Every problem with a file is a DataError naming it.
"""

from __future__ import annotations

import gzip
import io
import pickle
import warnings
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from dragontrainer.errors import DataError
from dragontrainer.recipe import DataSpec
from dragontrainer.registry import Registry

SOURCES: Registry[Callable[[DataSpec], ImageSet]] = Registry("data source")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), one name per class."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    flip_safe: bool = True  # False where a mirrored image means something else (digits, letters)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


def load_images(spec: DataSpec) -> ImageSet:
    """Load the source named in the recipe, then resize / convert colour as the recipe asks."""
    if spec.source != "digits" and spec.path is None:
        raise DataError(f"data.path: source {spec.source!r} needs a file or folder path")
    if spec.path is not None and not spec.path.exists():
        raise DataError(f"{spec.path}: no such file or folder (data.path)")
    images = SOURCES.get(spec.source)(spec)
    return finish(images, spec, origin=str(spec.path or spec.source))


def finish(images: ImageSet, spec: DataSpec, origin: str) -> ImageSet:
    """Checks and conversions every source shares: labels in range, size, colour, names."""
    x, y, classes = images.x, images.y, images.classes
    if len(x) == 0:
        raise DataError(f"{origin}: the dataset holds no images")
    if len(x) != len(y):
        raise DataError(f"{origin}: {len(x)} images but {len(y)} labels")
    if spec.class_names is not None:
        classes = list(spec.class_names)
    num_classes = len(classes)
    if y.min() < 0 or y.max() >= num_classes:
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise DataError(f"{origin}: label {bad} is outside 0..{num_classes - 1} ({num_classes} classes)")
    if spec.image_size is not None and x.shape[2:] != (spec.image_size, spec.image_size):
        x = resize_uint8(x, spec.image_size)
    x = convert_color(x, spec.color)
    return ImageSet(np.ascontiguousarray(x), y.astype(np.int64), classes, images.flip_safe)


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


def labels_from_array(y: np.ndarray, origin: str) -> np.ndarray:
    """Integer labels from any numeric array: whole numbers only, no NaN, one per image."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{origin}: labels must be a 1-D array, got shape {y.shape}")
    if y.dtype.kind == "b" or y.dtype.kind not in "iuf":
        raise DataError(f"{origin}: labels must be integers, got dtype {y.dtype}")
    if y.dtype.kind == "f" and (not np.isfinite(y).all() or not np.equal(np.mod(y, 1), 0).all()):
        raise DataError(f"{origin}: labels must be whole numbers, found a non-integer value")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"{origin}: label {int(y.min())} is negative; labels must be 0..C-1")
    return y


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


# ------------------------------------------------------------------------------ digits


@SOURCES.register("digits")
def digits(spec: DataSpec) -> ImageSet:
    """scikit-learn's embedded handwritten digits: 1,797 gray 8×8 images, 10 classes, no download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    return ImageSet(x, y, [str(c) for c in bunch.target_names], flip_safe=False)


# --------------------------------------------------------------------------------- npz


@SOURCES.register("npz")
def npz(spec: DataSpec) -> ImageSet:
    """A NumPy .npz with `x` (N×H×W or N×H×W×C, uint8 or float) and `y` (N ints); optional `classes`."""
    path = spec.path
    assert path is not None
    with path.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":  # an .npz is a zip archive of .npy files
            raise DataError(f"{path}: not a readable .npz file (expected a zip archive written by numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DataError(f"{path}: holds object arrays, which are refused (no pickle is ever loaded)") from None
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r} (found: {', '.join(sorted(arrays)) or 'none'})")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: x must be N×H×W or N×H×W×C with C in (1, 3), got shape {x.shape}")
    x = pixels_to_uint8(x, f"{path}: x")
    y = labels_from_array(arrays["y"], f"{path}: y")
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].tolist()]
    else:
        classes = [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)]
    return ImageSet(x, y, classes)


# ------------------------------------------------------------------------ image folder


@SOURCES.register("image-folder")
def image_folder(spec: DataSpec) -> ImageSet:
    """One sub-folder per class of PNG/JPEG/... files, decoded with Pillow, resized to data.image_size."""
    root = spec.path
    assert root is not None
    if not root.is_dir():
        raise DataError(f"{root}: image-folder expects a folder with one sub-folder per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders found (expected {root}/<class>/<image>.png)")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        members = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        if not members:
            raise DataError(f"{class_dir}: class folder is empty; every class needs at least one image")
        files += members
        labels += [label] * len(members)
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(lambda f: decode_image(f, spec), files))
    arrays = [a for a, _ in decoded]
    check_same_size(arrays, files)
    x = np.stack(arrays).transpose(0, 3, 1, 2)
    if all(is_gray for _, is_gray in decoded):
        x = x[:, :1]  # decoded to RGB, but every file was gray: the three channels are equal
    return ImageSet(x, np.array(labels, dtype=np.int64), [d.name for d in class_dirs])


def decode_image(path: Path, spec: DataSpec) -> tuple[np.ndarray, bool]:
    """Decode one file to an H×W×3 uint8 array (+ whether it was gray); resize if asked."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > spec.max_image_pixels:
                    raise DataError(
                        f"{path}: image has {width * height:,} pixels, above data.max_image_pixels "
                        f"({spec.max_image_pixels:,})"
                    )
                is_gray = image.mode in ("1", "L", "LA", "I", "I;16", "F")
                image = image.convert("RGB")
                if spec.image_size is not None:
                    image = image.resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
                return np.asarray(image, dtype=np.uint8), is_gray
    except DataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({exc})") from None


def check_same_size(arrays: Sequence[np.ndarray], files: Sequence[Path]) -> None:
    first = arrays[0].shape[:2]
    for array, path in zip(arrays, files, strict=True):
        if array.shape[:2] != first:
            raise DataError(
                f"{path}: image is {array.shape[1]}×{array.shape[0]} but {files[0]} is "
                f"{first[1]}×{first[0]}; set data.image_size=S to resize all images to S×S"
            )


# -------------------------------------------------------------------------------- CIFAR

CIFAR_PIXELS = 3 * 32 * 32


@SOURCES.register("cifar")
def cifar(spec: DataSpec) -> ImageSet:
    """CIFAR-10/100 from the binary or the python version; python batches via a restricted unpickler."""
    root = spec.path
    assert root is not None
    root = find_cifar_folder(root)
    parts = {"train": ["train"], "test": ["test"], "all": ["train", "test"]}[spec.part]
    if (root / "batches.meta.txt").exists() or (root / "data_batch_1.bin").exists():
        return cifar10_binary(root, parts)
    if (root / "fine_label_names.txt").exists() or (root / "train.bin").exists():
        return cifar100_binary(root, parts, spec.cifar_labels)
    if (root / "batches.meta").exists() or (root / "data_batch_1").exists():
        return cifar_python(root, parts, cifar100=False, label_kind=spec.cifar_labels)
    if (root / "meta").exists() or (root / "train").exists():
        return cifar_python(root, parts, cifar100=True, label_kind=spec.cifar_labels)
    raise DataError(f"{root}: no CIFAR files found (expected data_batch_1[.bin] or train[.bin])")


def find_cifar_folder(root: Path) -> Path:
    """Accept the extracted folder itself or its parent (cifar-10-batches-py, cifar-100-binary, ...)."""
    if root.is_file():
        raise DataError(f"{root}: cifar expects the extracted folder, not a file")
    children = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("cifar")]
    return children[0] if len(children) == 1 and not any(root.glob("*batch*")) else root


def cifar10_binary(root: Path, parts: list[str]) -> ImageSet:
    names = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    files = [root / n for part in parts for n in names[part]]
    xs, ys = zip(*(read_cifar_records(f, label_bytes=1, label_index=0) for f in files), strict=True)
    classes = read_names(root / "batches.meta.txt", 10)
    return ImageSet(np.concatenate(xs), np.concatenate(ys), classes)


def cifar100_binary(root: Path, parts: list[str], label_kind: str) -> ImageSet:
    files = [root / f"{part}.bin" for part in parts]
    index = 1 if label_kind == "fine" else 0  # each record: coarse label byte, fine label byte
    xs, ys = zip(*(read_cifar_records(f, label_bytes=2, label_index=index) for f in files), strict=True)
    names_file = root / ("fine_label_names.txt" if label_kind == "fine" else "coarse_label_names.txt")
    classes = read_names(names_file, 100 if label_kind == "fine" else 20)
    return ImageSet(np.concatenate(xs), np.concatenate(ys), classes)


def read_cifar_records(path: Path, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-length records: label byte(s) then 3072 pixel bytes (R plane, G plane, B plane)."""
    if not path.is_file():
        raise DataError(f"{path}: CIFAR batch file missing")
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + CIFAR_PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, label_index].astype(np.int64)


def read_names(path: Path, count: int) -> list[str]:
    if not path.is_file():
        return [str(i) for i in range(count)]
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [n for n in names if n] or [str(i) for i in range(count)]


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only plain containers and numpy arrays; any other global is refused before it runs."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("_codecs", "encode"),  # protocol-2 pickles store bytes as latin-1 text; a pure function
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def restricted_load(path: Path) -> Any:
    """Unpickle a file that may only hold dicts, lists, strings, numbers and numpy arrays."""
    try:
        with path.open("rb") as handle:
            return RestrictedUnpickler(handle, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc}; only plain containers and numpy arrays are allowed") from None
    except Exception as exc:  # any failure decoding untrusted bytes (EOF, overflow, memory, ...) = unreadable
        raise DataError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__})") from None


def cifar_python(root: Path, parts: list[str], cifar100: bool, label_kind: str) -> ImageSet:
    if cifar100:
        names = {"train": ["train"], "test": ["test"]}
        label_key = b"fine_labels" if label_kind == "fine" else b"coarse_labels"
    else:
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key = b"labels"
    xs, ys = [], []
    for name in (n for part in parts for n in names[part]):
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: CIFAR batch file missing")
        batch = restricted_load(path)
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise DataError(f"{path}: expected a dict with b'data' and {label_key!r}")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
            raise DataError(f"{path}: data must be uint8 N×3072, got {data.dtype} {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels_from_array(np.asarray(batch[label_key]), f"{path}: labels"))
    meta_name, meta_key = ("meta", b"fine_label_names" if label_kind == "fine" else b"coarse_label_names")
    if not cifar100:
        meta_name, meta_key = "batches.meta", b"label_names"
    classes = cifar_python_names(root / meta_name, meta_key, int(max(y.max() for y in ys)) + 1)
    return ImageSet(np.concatenate(xs), np.concatenate(ys), classes)


def cifar_python_names(path: Path, key: bytes, count: int) -> list[str]:
    if not path.is_file():
        return [str(i) for i in range(count)]
    meta = restricted_load(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list):
        return [str(i) for i in range(count)]
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


# --------------------------------------------------------------------------- MNIST IDX

IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
IDX_PARTS = {"train": ("train",), "test": ("t10k", "test"), "all": ("train", "t10k", "test")}


@SOURCES.register("mnist-idx")
def mnist_idx(spec: DataSpec) -> ImageSet:
    """IDX files, gzipped or not: MNIST, Fashion-MNIST, KMNIST, EMNIST (transposed back upright)."""
    root = spec.path
    assert root is not None
    pairs = find_idx_pairs(root, IDX_PARTS[spec.part])
    xs, ys = [], []
    for images_path, labels_path in pairs:
        x = read_idx(images_path, "images")
        y = read_idx(labels_path, "labels").astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"{images_path}: {len(x)} images but {labels_path.name} has {len(y)} labels")
        if "emnist" in images_path.name.lower():
            x = x.transpose(0, 2, 1)  # EMNIST stores images column-major
        xs.append(x[:, None])
        ys.append(y)
    y = np.concatenate(ys)
    return ImageSet(np.concatenate(xs), y, [str(c) for c in range(int(y.max()) + 1)], flip_safe=False)


def find_idx_pairs(root: Path, prefixes: Sequence[str]) -> list[tuple[Path, Path]]:
    """(images, labels) file pairs for the wanted parts, e.g. train-images-idx3-ubyte.gz + labels."""
    if not root.is_dir():
        raise DataError(f"{root}: mnist-idx expects a folder holding *-images-idx3-ubyte[.gz] files")
    pairs = []
    for images in sorted(root.glob("*images*idx3*")):
        stem = images.name.lower()
        if not any(f"{p}-" in stem or stem.startswith(p) for p in prefixes):
            continue
        labels_name = images.name.replace("images", "labels").replace("idx3", "idx1")
        labels = root / labels_name
        if not labels.exists():
            raise DataError(f"{images}: matching label file {labels_name} not found")
        pairs.append((images, labels))
    if not pairs:
        raise DataError(f"{root}: no IDX image files for part(s) {', '.join(prefixes)} (data.part)")
    return pairs


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse one IDX file (big-endian header: magic, dimension sizes) of unsigned bytes."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[kind]:
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{IDX_MAGIC[kind]:08x} for IDX {kind}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, but its header {dims} implies {expected}")
    return np.frombuffer(io.BytesIO(raw).getbuffer()[header:], dtype=np.uint8).reshape(dims).copy()
