"""Hostile and careless data: sizes a file declares are checked before anything is allocated, label
sets cannot blow up the head, odd images are handled, and every outcome is one clear line."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragontrainer.cli import main
from dragontrainer.data.sources import load_images
from dragontrainer.errors import DataError, RecipeError
from dragontrainer.recipe import DataSpec
from tests.conftest import TINY, make_cifar10_python, make_image_folder, make_npz


def npy_bytes(shape: tuple[int, ...], dtype: str = "|u1", body: bytes = b"\0" * 16) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


def lying_npz(path: Path, x_shape: tuple[int, ...], compressed: bool = False) -> Path:
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        archive.writestr("x.npy", npy_bytes(x_shape))
        archive.writestr("y.npy", npy_bytes((2,), "<i8", np.array([0, 1]).tobytes()))
    return path


@pytest.mark.parametrize("shape", [(10**12, 28, 28), (2**40, 2**40, 2**40), (3, 4, 4)])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_members_that_declare_more_than_they_hold(tmp_path: Path, shape: tuple, compressed: bool) -> None:
    path = lying_npz(tmp_path / "lie.npz", shape, compressed)
    with pytest.raises(DataError, match=r"array 'x' declares shape .* but its member holds only"):
        load_images(DataSpec(source="npz", path=path))


def idx_file(path: Path, dims: list[int], body: bytes = b"", gz: bool = False) -> None:
    raw = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + body
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dims", [[60000, 28, 28], [2**32 - 1] * 3, [0xFFFFFFFF, 1, 1], [1, 0xFFFFFFFF, 0xFFFFFFFF]])
def test_idx_headers_are_checked_before_the_body_is_read(tmp_path: Path, gz: bool, dims: list[int]) -> None:
    root = tmp_path / "idx"
    root.mkdir()
    suffix = ".gz" if gz else ""
    idx_file(root / f"train-images-idx3-ubyte{suffix}", dims, b"\0" * 100, gz)
    (root / f"train-labels-idx1-ubyte{suffix}").write_bytes(
        (gzip.compress if gz else bytes)(bytes([0, 0, 8, 1, 0, 0, 0, 2, 0, 1]))
    )
    with pytest.raises(DataError, match=r"header .* implies|needs about"):
        load_images(DataSpec(source="mnist-idx", path=root))


def test_a_gzip_stream_is_decompressed_only_as_far_as_its_header_says(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    root.mkdir()
    idx_file(root / "train-images-idx3-ubyte.gz", [2, 2, 2], b"\0" * 8 + b"\0" * 50_000_000, gz=True)  # a zip bomb
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 0, 1])))
    with pytest.raises(DataError, match="implies 24 bytes, but it holds more"):
        load_images(DataSpec(source="mnist-idx", path=root))


@pytest.mark.parametrize("label", [10**6, 2**63 - 1, 2**62])
def test_a_huge_label_is_an_error_naming_it_not_a_huge_head(tmp_path: Path, label: int) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 4, 4), np.uint8), y=np.array([0, 1, 2, label], dtype=np.uint64))
    with pytest.raises(DataError, match=f"label {label}"):
        load_images(DataSpec(source="npz", path=tmp_path / "a.npz"))


def test_float_labels_beyond_int64_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([0.0, 1e300]))
    with pytest.raises(DataError, match="is not a class index"):
        load_images(DataSpec(source="npz", path=tmp_path / "a.npz"))


@pytest.mark.parametrize("data", [[[1, 2], [3]], [b"x", 1], "text"])
def test_cifar_python_batches_with_ragged_or_odd_data(tmp_path: Path, data: object) -> None:
    root = make_cifar10_python(tmp_path / "c")
    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match="data_batch_3"):
        load_images(DataSpec(source="cifar", path=root))


def test_cifar_python_declared_lengths_cannot_exceed_the_file(tmp_path: Path) -> None:
    root = make_cifar10_python(tmp_path / "c")
    (root / "data_batch_2").write_bytes(b"\x80\x02B" + (2**31 - 1).to_bytes(4, "little") + b"abc")  # BINBYTES 2 GB
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR python batch"):
        load_images(DataSpec(source="cifar", path=root))


def test_image_size_and_widths_that_cannot_fit_are_refused_with_the_estimate(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.image_size=4096 for 1,797 images needs about .* GiB, but only"):
        load_images(DataSpec(image_size=4096))
    from dragontrainer.api import train

    with pytest.raises(RecipeError, match=r"model.widths .* training needs about .* but only"):
        train(overrides=["model.widths=[100000,100000]", f"run.dir={tmp_path / 'r'}"])
    assert not (tmp_path / "r").exists()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        values = np.array([[0, 4096, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
        Image.fromarray(values).save(root / name / "x.png")
    images = load_images(DataSpec(source="image-folder", path=root))
    assert images.x.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(images.x[0, 0, 0], [0, 16, 128, 255])


def test_stray_files_are_skipped_and_counted_and_all_problems_reported_at_once(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs")
    (root / "class_0" / "README.txt").write_text("notes")
    (root / "class_1" / ".DS_Store").write_bytes(b"\0\0")
    (root / "class_1" / "Thumbs.db").write_bytes(b"\0")
    images = load_images(DataSpec(source="image-folder", path=root))
    assert len(images.y) == 12 and "skipped 3 file(s) that are not images" in images.notes[0]
    (root / "class_0" / "bad.png").write_bytes(b"not a png")
    (root / "class_2" / "worse.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 problems: .*bad.png: not a readable image.*worse.jpg"):
        load_images(DataSpec(source="image-folder", path=root))


def test_the_source_is_inferred_from_the_path_and_digits_refuses_a_path(tmp_path: Path) -> None:
    images = load_images(DataSpec(path=make_npz(tmp_path / "a.npz")))
    assert images.x.shape == (40, 1, 8, 8) and "inferred" in images.notes[0] and "npz" in images.notes[0]
    assert len(load_images(DataSpec(path=make_image_folder(tmp_path / "f"))).y) == 12
    with pytest.raises(DataError, match="data.source=digits, which reads no file"):
        load_images(DataSpec(source="digits", path=tmp_path / "a.npz"))


def test_zero_sized_images_and_one_class_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "z.npz", x=np.zeros((4, 0, 5), np.uint8), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match="need at least one pixel"):
        load_images(DataSpec(source="npz", path=tmp_path / "z.npz"))
    np.savez(tmp_path / "one.npz", x=np.zeros((20, 4, 4), np.uint8), y=np.zeros(20, np.int64))
    for command in ("doctor", "train"):
        assert main([command, f"data.path={tmp_path / 'one.npz'}", *TINY]) == 2
        assert "at least two classes" in capsys.readouterr().err


def test_names_with_markup_and_non_utf8_bytes_train_report_and_print(tmp_path: Path, capsys) -> None:
    root = make_image_folder(tmp_path / "imgs", classes=2)
    latin1 = os.fsdecode(b"caf\xe9")  # a folder name that is not UTF-8
    (root / "class_0").rename(root / latin1)
    (root / "class_1").rename(root / "[red]x")
    run_dir = tmp_path / "runs" / "a[/]b"
    code = main(["train", f"data.path={root}", "data.image_size=8", *TINY, f"run.dir={run_dir}", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run_dir / "data.json").read_text())["classes"] == ["[red]x", latin1]  # lossless
    assert (run_dir / "report.html").read_text(encoding="utf-8")
    assert main(["report", str(run_dir)]) == 0
    assert main(["predict", str(run_dir), str(next((root / latin1).iterdir()))]) == 0
    out = capsys.readouterr().out
    assert "caf\\xe9" in out or "[red]x" in out


@pytest.mark.parametrize("item", ["seed=-1", "seed=99999999999999999999", "data.split_seed=4294967296"])
def test_seeds_outside_what_the_rngs_accept(item: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", item, "--quiet"]) == 2
    assert "recipe field" in capsys.readouterr().err


def test_an_idx_header_with_a_zero_dimension_is_empty_not_a_crash(tmp_path: Path) -> None:
    """Found by the bounded property test: [0, 3e9, 3e9] multiplies to 0 bytes but no array has that shape."""
    root = tmp_path / "idx"
    root.mkdir()
    idx_file(root / "train-images-idx3-ubyte", [0, 3_036_988_439, 3_037_012_561])
    (root / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 0]))
    with pytest.raises(DataError, match="declares no data"):
        load_images(DataSpec(source="mnist-idx", path=root))
