from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from dragontrainer.data.sources import load_images
from dragontrainer.errors import DataError
from dragontrainer.recipe import DataSpec
from tests.conftest import (
    PlantMarker,
    idx_bytes,
    make_cifar10_binary,
    make_cifar10_python,
    make_idx,
    make_image_folder,
    make_npz,
)


def spec(source: str, path: Path | None = None, **extra: object) -> DataSpec:
    return DataSpec(source=source, path=path, **extra)


def test_digits_is_embedded_uint8_nchw() -> None:
    images = load_images(spec("digits"))
    assert images.x.shape == (1797, 1, 8, 8) and images.x.dtype == np.uint8
    assert images.y.dtype == np.int64 and images.classes == [str(i) for i in range(10)]
    assert images.x.max() == 255 and not images.flip_safe


def test_npz_gray_and_float_color(tmp_path: Path) -> None:
    images = load_images(spec("npz", make_npz(tmp_path / "a.npz")))
    assert images.x.shape == (40, 1, 8, 8) and images.classes == ["0", "1", "2", "3"]
    x = np.random.default_rng(0).random((6, 5, 5, 3)).astype(np.float32)
    np.savez(tmp_path / "b.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]), classes=np.array(["a", "b", "c"]))
    images = load_images(spec("npz", tmp_path / "b.npz"))
    assert images.x.shape == (6, 3, 5, 5) and images.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(images.x[0, 0], np.round(x[0, :, :, 0] * 255).astype(np.uint8))


def test_npz_resize_and_color_conversion(tmp_path: Path) -> None:
    images = load_images(spec("npz", make_npz(tmp_path / "a.npz"), image_size=16, color="rgb"))
    assert images.x.shape == (40, 3, 16, 16)


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": np.zeros((3, 4, 4), np.uint8)}, "missing array 'y'"),
        ({"x": np.full((2, 4, 4), np.nan, np.float32), "y": np.array([0, 1])}, "NaN/Inf"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, -1])}, "label -1 is negative"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0.5, 1.0])}, "whole numbers"),
        (
            {"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 3]), "classes": np.array(["a", "b"])},
            "label 3 is outside 0..1",
        ),
        ({"x": np.zeros((2, 4), np.uint8), "y": np.array([0, 1])}, "x must be N×H×W"),
        ({"x": np.zeros((3, 4, 4), np.uint8), "y": np.array([0, 1])}, "3 images but 2 labels"),
    ],
)
def test_npz_bad_input(tmp_path: Path, arrays: dict, fragment: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=fragment):
        load_images(spec("npz", tmp_path / "bad.npz"))


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "evil.npz", x=np.array([PlantMarker(marker)], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="object arrays"):
        load_images(spec("npz", tmp_path / "evil.npz"))
    assert not marker.exists()


def test_image_folder_png_and_jpeg(tmp_path: Path) -> None:
    images = load_images(spec("image-folder", make_image_folder(tmp_path / "png")))
    assert images.x.shape == (12, 3, 12, 12) and images.classes == ["class_0", "class_1", "class_2"]
    assert list(images.y) == [0] * 4 + [1] * 4 + [2] * 4
    images = load_images(spec("image-folder", make_image_folder(tmp_path / "jpg", fmt="JPEG"), image_size=6))
    assert images.x.shape == (12, 3, 6, 6)


def test_image_folder_gray_files_give_one_channel(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((5, 5), 40 * i, np.uint8), mode="L").save(tmp_path / c / f"{i}.png")
    assert load_images(spec("image-folder", tmp_path)).x.shape == (4, 1, 5, 5)


def test_image_folder_bad_inputs(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d")
    (root / "class_1" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(DataError, match=r"class_1/2.png: (not a readable image|corrupt)"):
        load_images(spec("image-folder", root))
    (root / "class_1" / "2.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"2.png"):
        load_images(spec("image-folder", root))


def test_image_folder_empty_class_and_non_image(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty: class folder is empty"):
        load_images(spec("image-folder", root))
    (root / "empty").rmdir()
    (root / "class_0" / "notes.txt").write_text("hello")  # a stray file is skipped, and said so
    assert "skipped 1 file(s) that are not images (notes.txt)" in load_images(spec("image-folder", root)).notes[0]
    (root / "class_0" / "notes.png").write_text("hello")  # a file that claims to be an image and is not
    with pytest.raises(DataError, match="notes.png: not a readable image"):
        load_images(spec("image-folder", root))


def test_image_folder_mixed_sizes_need_a_resize(tmp_path: Path) -> None:
    from PIL import Image

    root = make_image_folder(tmp_path / "d")
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(root / "class_2" / "odd.png")
    with pytest.raises(DataError, match="set data.image_size=S"):
        load_images(spec("image-folder", root))
    assert load_images(spec("image-folder", root, image_size=8)).x.shape == (13, 3, 8, 8)


def test_image_folder_pixel_limit(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d")
    with pytest.raises(DataError, match="above data.max_image_pixels"):
        load_images(spec("image-folder", root, max_image_pixels=100))


def test_cifar10_binary_and_python_agree_on_layout(tmp_path: Path) -> None:
    binary = load_images(spec("cifar", make_cifar10_binary(tmp_path / "cifar-10-batches-bin"), part="train"))
    assert binary.x.shape == (100, 3, 32, 32) and binary.classes[0] == "airplane"
    assert len(load_images(spec("cifar", tmp_path / "cifar-10-batches-bin", part="all")).y) == 120
    python = load_images(spec("cifar", make_cifar10_python(tmp_path / "py" / "cifar-10-batches-py"), part="test"))
    assert python.x.shape == (20, 3, 32, 32) and python.classes[3] == "c3"


def test_cifar100_binary_fine_and_coarse(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    record = np.zeros((4, 2 + 3072), np.uint8)
    record[:, 0] = [0, 1, 2, 3]  # coarse
    record[:, 1] = [10, 11, 12, 13]  # fine
    (root / "train.bin").write_bytes(record.tobytes())
    assert list(load_images(spec("cifar", root)).y) == [10, 11, 12, 13]
    assert list(load_images(spec("cifar", root, cifar_labels="coarse")).y) == [0, 1, 2, 3]


def test_cifar_wrong_length_and_malicious_pickle(tmp_path: Path) -> None:
    root = make_cifar10_binary(tmp_path / "bin")
    (root / "data_batch_3.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(DataError, match="not a whole number of 3073-byte CIFAR records"):
        load_images(spec("cifar", root))
    root = make_cifar10_python(tmp_path / "py")
    marker = tmp_path / "pwned"
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": PlantMarker(marker)}))
    with pytest.raises(DataError, match="refusing to load pathlib"):
        load_images(spec("cifar", root))
    assert not marker.exists()


def test_mnist_idx_gz_and_plain(tmp_path: Path) -> None:
    images = load_images(spec("mnist-idx", make_idx(tmp_path / "gz")))
    assert images.x.shape == (30, 1, 28, 28) and images.classes == [str(i) for i in range(10)]
    plain = make_idx(tmp_path / "plain", n=20, prefix="t10k", gz=False)
    assert load_images(spec("mnist-idx", plain, part="test")).x.shape == (20, 1, 28, 28)


def test_mnist_idx_bad_magic_and_count(tmp_path: Path) -> None:
    root = make_idx(tmp_path / "a", gz=False)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(29, np.uint8)))
    with pytest.raises(DataError, match="30 images but train-labels-idx1-ubyte has 29 labels"):
        load_images(spec("mnist-idx", root))
    (root / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x05" + b"\0" * 20)
    with pytest.raises(DataError, match="wrong magic number 0x00000805"):
        load_images(spec("mnist-idx", root))
    (root / "x").mkdir()
    gz = make_idx(tmp_path / "b")
    (gz / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + b"\0" * 12)[:-4])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_images(spec("mnist-idx", gz))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_images(spec("npz", tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="needs a file or folder path"):
        load_images(spec("npz"))


def test_cifar_parent_folder_and_missing_batches(tmp_path: Path) -> None:
    root = make_cifar10_binary(tmp_path / "parent" / "cifar-10-batches-bin")
    images = load_images(spec("cifar", tmp_path / "parent", part="train"))
    assert len(images.y) == 100 and images.notes == []
    (root / "data_batch_4.bin").unlink()
    (root / "data_batch_5.bin").unlink()
    images = load_images(spec("cifar", tmp_path / "parent", part="train"))
    assert len(images.y) == 60 and "3 of 5 CIFAR training batches found" in images.notes[0]


@pytest.mark.parametrize("kind", ["mnist", "cifar"])
def test_official_test_files_become_the_test_split(tmp_path: Path, kind: str) -> None:
    from dragontrainer.data.split import split_for

    if kind == "mnist":
        root = make_idx(tmp_path / "idx", n=40)
        make_idx(root, n=20, prefix="t10k")
        source, train_count, test_count = "mnist-idx", 40, 20
    else:
        root, source, train_count, test_count = make_cifar10_binary(tmp_path / "c"), "cifar", 100, 20
    data = spec(source, root)
    images = load_images(data)
    assert images.official_test is not None and int(images.official_test.sum()) == test_count
    split = split_for(images.y, data, images.official_test)
    assert sorted(split.test) == list(range(train_count, train_count + test_count))
    assert len(split.train) + len(split.val) == train_count and not set(split.val) & set(split.test)
    only_train = load_images(spec(source, root, part="train"))
    assert only_train.official_test is None and len(only_train.y) == train_count


# ------------------------------------------------------------------ several labels per image (multi-task)


def task_npz(path: Path, **labels: np.ndarray) -> Path:
    x = np.random.default_rng(0).integers(0, 255, size=(12, 6, 6), dtype=np.uint8)
    np.savez(path, x=x, **labels)
    return path


def test_npz_label_matrix_and_named_label_arrays_are_read(tmp_path: Path) -> None:
    y = np.stack([np.arange(12) % 3, np.arange(12) % 2], axis=1)
    images = load_images(spec("npz", task_npz(tmp_path / "m.npz", y=y)))
    assert images.task_labels is not None and images.task_labels["y"].shape == (12, 2)
    assert images.y.tolist() == y[:, 0].tolist() and images.classes == ["0", "1", "2"]  # split on column 0
    named = load_images(spec("npz", task_npz(tmp_path / "n.npz", y_digit=y[:, 0], y_odd=y[:, 1].astype(float),
                                             classes_odd=np.array(["even", "odd"]))))  # fmt: skip
    assert list(named.task_labels) == ["digit", "odd"] and named.task_labels["odd"].dtype == np.int64
    assert named.y.tolist() == y[:, 0].tolist() and named.task_classes == {"odd": ["even", "odd"]}
    plain = load_images(spec("npz", make_npz(tmp_path / "plain.npz")))
    assert plain.task_labels is None  # one label per image: the single-task path, untouched


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"y": np.zeros((12, 2, 2), dtype=int)}, "y must be N labels or an N×T matrix"),
        ({"y_a": np.arange(12) % 2, "y_b": np.arange(11) % 2}, "y_b holds 11 labels but x holds 12 images"),
        ({"y": np.stack([np.arange(12) % 2] * 2, 1)[:10]}, "y holds 10 labels but x holds 12 images"),
        ({"y": np.full((12, 2), 0.5)}, "y: labels must be whole numbers"),
        ({"y_a": np.arange(12) % 2, "y_b": np.full(12, 1.5)}, "y_b: labels must be whole numbers"),
        ({"y_": np.arange(12) % 2}, "array 'y_' has no task name"),
    ],
)
def test_bad_task_labels_are_one_line_errors(tmp_path: Path, labels: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(DataError, match=message) as caught:
        load_images(spec("npz", task_npz(tmp_path / "bad.npz", **labels)))
    assert "\n" not in str(caught.value)
