"""The standard binary formats: CIFAR-10/100 (binary and python versions) and MNIST-style IDX files.

Sizes are checked before allocation: an IDX header's dimensions are multiplied in Python integers and
compared with the file (and, gzipped, at most that many bytes are decompressed); a CIFAR python batch
is unpickled from its bytes by a restricted unpickler, so a declared length cannot exceed the file.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dragontrainer.data.sources import SOURCES, ImageSet, labels_from_array, numbered_classes
from dragontrainer.errors import DataError
from dragontrainer.recipe import DataSpec
from dragontrainer.resources import check_fits

CIFAR_PIXELS = 3 * 32 * 32


@SOURCES.register("cifar")
def cifar(spec: DataSpec) -> ImageSet:
    """CIFAR-10/100 from the binary or the python version; python batches via a restricted unpickler."""
    root = spec.path
    assert root is not None
    root = find_cifar_folder(root)
    if spec.part == "official":
        return with_official_test(lambda part: cifar(spec.model_copy(update={"path": root, "part": part})))
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
    has_batches = any(p.is_file() and ("batch" in p.name or p.name in ("train", "train.bin")) for p in root.iterdir())
    return children[0] if len(children) == 1 and not has_batches else root


def with_official_test(load_part: Callable[[str], ImageSet]) -> ImageSet:
    """The training files, plus the official test files marked as the run's test split (when present)."""
    train = load_part("train")
    try:
        test = load_part("test")
    except DataError as exc:
        train.notes.append(f"no official test part ({exc}); the run has no test split unless data.test_fraction > 0")
        return train
    mask = np.concatenate([np.zeros(len(train.y), bool), np.ones(len(test.y), bool)])
    classes = train.classes if len(train.classes) >= len(test.classes) else test.classes
    return ImageSet(np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y]), classes, train.flip_safe,
                    [*train.notes, *test.notes], official_test=mask)  # fmt: skip


def present_batches(root: Path, names: list[str], notes: list[str]) -> list[str]:
    """The training batches that exist; fewer than all is allowed, with a note (none is an error)."""
    found = [n for n in names if (root / n).is_file()]
    if not found:
        raise DataError(f"{root}: no CIFAR training batches ({names[0]} ... {names[-1]}) found")
    if len(found) < len(names):
        notes.append(f"{root}: {len(found)} of {len(names)} CIFAR training batches found ({', '.join(found)})")
    return found


def cifar10_binary(root: Path, parts: list[str]) -> ImageSet:
    notes: list[str] = []
    names = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    if "train" in parts:
        names["train"] = present_batches(root, names["train"], notes)
    files = [root / n for part in parts for n in names[part]]
    xs, ys = zip(*(read_cifar_records(f, label_bytes=1, label_index=0) for f in files), strict=True)
    classes = read_names(root / "batches.meta.txt", 10)
    return ImageSet(np.concatenate(xs), np.concatenate(ys), classes, notes=notes)


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
        data = path.read_bytes()  # declared lengths inside the pickle can then never exceed the file
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refusing to load"):
            raise DataError(f"{path}: {exc}; only plain containers and numpy arrays are allowed") from None
        raise DataError(f"{path}: not a readable CIFAR python batch ({exc})") from None
    except Exception as exc:  # any failure decoding untrusted bytes (EOF, overflow, memory, ...) = unreadable
        raise DataError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__})") from None


def cifar_python(root: Path, parts: list[str], cifar100: bool, label_kind: str) -> ImageSet:
    if cifar100:
        names = {"train": ["train"], "test": ["test"]}
        label_key = b"fine_labels" if label_kind == "fine" else b"coarse_labels"
    else:
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key = b"labels"
    notes: list[str] = []
    if "train" in parts and not cifar100:
        names["train"] = present_batches(root, names["train"], notes)
    xs, ys = [], []
    for name in (n for part in parts for n in names[part]):
        path = root / name
        if not path.is_file():
            raise DataError(f"{path}: CIFAR batch file missing")
        batch = restricted_load(path)
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise DataError(f"{path}: expected a dict with b'data' and {label_key!r}")
        try:
            data = np.asarray(batch[b"data"])
        except (ValueError, TypeError, OverflowError):
            raise DataError(f"{path}: b'data' must be a uint8 N×3072 array, got a ragged or mixed list") from None
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_PIXELS:
            raise DataError(f"{path}: data must be uint8 N×3072, got {data.dtype} {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels_from_array(np.asarray(batch[label_key]), f"{path}: labels"))
    meta_name, meta_key = ("meta", b"fine_label_names" if label_kind == "fine" else b"coarse_label_names")
    if not cifar100:
        meta_name, meta_key = "batches.meta", b"label_names"
    classes = cifar_python_names(root / meta_name, meta_key, len(numbered_classes(np.concatenate(ys), str(root))))
    return ImageSet(np.concatenate(xs), np.concatenate(ys), classes, notes=notes)


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
    if spec.part == "official":
        return with_official_test(lambda part: mnist_idx(spec.model_copy(update={"part": part})))
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
    return ImageSet(np.concatenate(xs), y, numbered_classes(y, str(root)), flip_safe=False)


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
    """Parse one IDX file (big-endian header: magic, dimension sizes) of unsigned bytes. The header's
    size is checked against the file and the memory before the body is read (or decompressed)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4:
                raise DataError(f"{path}: too short to be an IDX file ({len(head)} bytes)")
            magic = int.from_bytes(head, "big")
            if magic != IDX_MAGIC[kind]:
                raise DataError(
                    f"{path}: wrong magic number 0x{magic:08x}, expected 0x{IDX_MAGIC[kind]:08x} for IDX {kind}"
                )
            ndim = magic & 0xFF
            raw_dims = handle.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path}: the IDX header is cut short")
            dims = [int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            count, header = math.prod(dims), 4 + 4 * ndim
            if count == 0:
                raise DataError(f"{path}: its header {dims} declares no data (a dimension is 0)")
            if opener is open and path.stat().st_size != header + count:
                raise DataError(f"{path}: {path.stat().st_size} bytes, but its header {dims} implies {header + count}")
            check_fits(count, f"{path}: its header {dims}")
            body = handle.read(count)
            if len(body) != count or handle.read(1):
                held = "fewer" if len(body) != count else "more"
                raise DataError(f"{path}: its header {dims} implies {header + count} bytes, but it holds {held}")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()
